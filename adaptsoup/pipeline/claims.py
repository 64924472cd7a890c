"""Claims on the units of work in a run directory that several jobs may share.

Several jobs can work in one run directory: the shards of ``adapt --shard I/N``, a requeued array task, or
two ``adapt --resume RUN`` started by hand.  Before a job makes a unit (an inter-training run, an
ingredient, a decoder warm-up, the soups) it *claims* it: ``claims/<name>.json`` names the job (its label,
a random token, host, pid and the pid's start time).  All claim decisions are made under one lock
(``claims/.lock``), and every claim file is written whole (temporary file, then rename), so a job killed at
any point leaves either no claim or a complete one, never an empty file.

A claim held by another job is taken over only when that job is provably gone:

* on this host, its process is not running, or its pid now belongs to a process started at another time
  (a reused pid), or it is this process and the job that made the claim has ended (a crash in the same
  Python process);
* on another host, its heartbeat is stale: every live job touches its claims every ``HEARTBEAT_S``
  seconds (a daemon thread), and a claim untouched for ``STALE_S`` seconds belongs to a dead job.

Otherwise the unit is the other job's: this job moves on (or, for what every job needs, waits for it).
A unit's output written atomically is its durable "finished" marker: the ``done`` test a claim is given
is checked again after the claim is won, under the lock, so work written and released in between is never
made twice.  The soups, which have no single output file, get a marker file, ``claims/<name>.done``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptsoup.core.io import file_lock, write_atomic, write_json_atomic

HEARTBEAT_S = float(os.environ.get("ADAPTSOUP_CLAIM_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("ADAPTSOUP_CLAIM_STALE_S", 600))

FINISH = "finish"  # the claim of the job that writes the soups, evaluation, mixes and TTA

# What :meth:`Claims.claim` found.
NEW = "new"  # nobody held the unit: it is this job's now
TAKEN_OVER = "taken over"  # a dead job held it: this job resumes from its state file
MINE = "mine"  # this job already held it
OTHER = "other"  # a live job holds it: nothing was changed
DONE = "done"  # the unit is finished: nothing to do


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None where
    there is no ``/proc`` or no such process.  With the pid it names one process: pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(record: dict, heartbeat_age_s: float, *, host: str, pid: int, live_tokens: set[str],
                 stale_s: float = STALE_S) -> bool:
    """Whether the job that wrote the claim ``record`` may still be working (see the module docstring).

    ``heartbeat_age_s`` is the seconds since the claim file was last touched; ``host`` and ``pid`` are this
    process's, ``live_tokens`` the jobs still open in it.  An unreadable or empty record is a dead job's."""
    if not record.get("pid"):
        return False
    if record.get("host") != host:
        return heartbeat_age_s <= stale_s
    if record["pid"] == pid:
        return record.get("token") in live_tokens
    if not pid_running(record["pid"]):
        return False
    started = record.get("pid_start")
    return started is None or process_start(record["pid"]) in (None, started)


def read_claim(path: Path) -> dict:
    """A claim's record ({} if there is none or it is unreadable)."""
    try:
        record = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class _Heartbeat:
    """One daemon thread per process touching every claim its open jobs hold, while they hold it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[Path, str] = {}  # claim file -> token of the job holding it
        self.live: set[str] = set()  # tokens of the jobs open in this process
        self.thread: threading.Thread | None = None

    def hold(self, path: Path, token: str) -> None:
        with self.lock:
            self.held[path] = token
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="adaptsoup-claims", daemon=True)
                self.thread.start()

    def drop(self, path: Path) -> None:
        with self.lock:
            self.held.pop(path, None)

    def beat(self) -> None:
        """Touch every claim still held by the job that made it (never one another job has taken over)."""
        with self.lock:
            held = dict(self.held)
        for path, token in held.items():
            if read_claim(path).get("token") == token:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            self.beat()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's jobs and thread are not this process's (the lock may have been held)."""
        self.lock, self.held, self.live, self.thread = threading.Lock(), {}, set(), None


HEARTBEAT = _Heartbeat()
os.register_at_fork(after_in_child=HEARTBEAT.forget_after_fork)


@dataclass
class Claims:
    """One job's claims in the run directory ``root`` (``label``: its shard, or ``all``).

    Open while the job runs; :meth:`close` when it ends, however it ends, so that a later job in the same
    process may take over what it left."""

    root: Path
    label: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    stale_s: float = STALE_S

    def __post_init__(self) -> None:
        self.dir = Path(self.root) / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        with HEARTBEAT.lock:
            HEARTBEAT.live.add(self.token)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def record(self) -> dict:
        pid = os.getpid()
        return {"owner": self.label, "token": self.token, "host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job": os.environ.get("SLURM_JOB_ID")}

    def claim(self, name: str, done: Callable[[], bool] | None = None) -> str:
        """Try to claim ``name``: NEW, TAKEN_OVER, MINE, OTHER or DONE (``done()`` true before or after the claim is won)."""
        done = done or (lambda: False)
        path = self.path(name)
        if not path.exists() and done():  # the common case of a finished unit: no lock needed
            return DONE
        with file_lock(self.dir / ".lock"):
            outcome = NEW
            if path.exists():
                held = read_claim(path)
                if held.get("token") == self.token:
                    outcome = MINE
                elif self._alive(held, path):
                    return DONE if done() else OTHER  # a live job that wrote the unit releases its claim itself
                else:
                    outcome = TAKEN_OVER
            if done():  # finished, by a job that died before releasing its claim, or while this one waited for the lock
                if outcome != NEW:
                    path.unlink(missing_ok=True)  # a dead job's stale claim (or this job's own) on a finished unit
                    HEARTBEAT.drop(path)
                return DONE
            write_json_atomic(path, self.record())
        HEARTBEAT.hold(path, self.token)
        return outcome

    def _alive(self, held: dict, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        with HEARTBEAT.lock:
            live = set(HEARTBEAT.live)
        return holder_alive(held, age, host=socket.gethostname(), pid=os.getpid(), live_tokens=live, stale_s=self.stale_s)

    def release(self, name: str) -> None:
        """Drop this job's claim on ``name`` (once what it names is written); another job's is left alone."""
        path = self.path(name)
        HEARTBEAT.drop(path)
        with file_lock(self.dir / ".lock"):
            if read_claim(path).get("token") == self.token:
                path.unlink(missing_ok=True)

    def mark_done(self, name: str) -> None:
        """Record durably that ``name`` is finished (``claims/<name>.done``), then release it."""
        write_atomic(self.dir / f"{name}.done", lambda tmp: tmp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z\n")))
        self.release(name)

    def is_done(self, name: str) -> bool:
        return (self.dir / f"{name}.done").is_file()

    def describe(self, name: str) -> str:
        held = read_claim(self.path(name))
        return (f"claimed by {'shard ' + held['owner'] if held.get('owner', 'all') != 'all' else 'another job'} "
                f"(host {held.get('host', '?')}, pid {held.get('pid', '?')}, since {held.get('since', '?')})")

    def close(self) -> None:
        """The job has ended: claims it still holds (a crash) may be taken over by the next job, here or elsewhere."""
        with HEARTBEAT.lock:
            HEARTBEAT.live.discard(self.token)
            for path in [p for p, t in HEARTBEAT.held.items() if t == self.token]:
                del HEARTBEAT.held[path]
