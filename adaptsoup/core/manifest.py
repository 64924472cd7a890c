"""Run manifests: what was run, with what, on what, and what came out — enough to reproduce and resume."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from adaptsoup.core.io import file_lock, write_json_atomic

TRACKED_PACKAGES = ("adaptsoup", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "onnx", "onnxruntime")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(path: str | os.PathLike | None = None) -> bool | None:
    """Whether tracked files differ from the commit (untracked files ignored); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=path or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_state() -> dict[str, Any]:
    """The code a run starts from: its commit and whether the checkout had uncommitted changes. Taken when a
    long run *starts*, so that commits made while it runs are not credited with its results."""
    return {"commit": git_commit(), "dirty": git_dirty()}


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(),
        "git_commit": git_commit(),
    }


def tree_state(source_dirty: bool | None) -> str:
    """How a report names the state of the checkout a run started from (unrecorded in older results)."""
    if source_dirty is None:
        return "checkout state not recorded"
    return "with uncommitted changes" if source_dirty else "clean checkout"


def provenance_lines(result: dict[str, Any]) -> list[str]:
    """A benchmark report's opening lines: the command, the commit it started from and whether the checkout
    had uncommitted changes (always said, so a dirty run is never mistaken for the commit's), the machine,
    the wall time, then any notes kept with the result."""
    machine = result.get("machine", {})
    lines = [f"Command: `{result.get('command', '')}`  ",
             f"Commit {result.get('commit')} ({tree_state(result.get('source_dirty'))}), {machine.get('cpu')} "
             f"({machine.get('cpu_count')} cores), wall time {result['wall_time_s'] / 60:.1f} min."]
    for note in result.get("notes", []):  # what a reader must know that the run could not record (e.g. a rename)
        lines += ["", f"> {note}"]
    return lines


def file_digest(path: str | os.PathLike) -> str:
    """The first 12 hex digits of a file's SHA-1: identifies a checkpoint's exact contents."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def config_tag(*parts: Any) -> str:
    """A short stable digest of settings (dataclasses, dicts, strings), for naming work folders: a run made
    with other settings or another stock never resumes from, or reuses, one made with these."""
    canon = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) and not isinstance(p, type) else p for p in parts]
    return hashlib.sha1(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:8]


class Manifest:
    """A JSON manifest kept on disk, rewritten atomically after every change.

    ``writable=False`` keeps it in memory only: the ranks other than 0 of a data-parallel run read the
    manifest but never write it.  ``shared=True`` (the jobs of a sharded grid, which write one manifest side
    by side) saves under a lock, merged into what is on disk: what this job changed since it last read or
    wrote the file goes over what is there now, key by key within top-level sections (``ingredients``,
    ``shards``, ...), so no job loses another's records or writes back a stale copy of them."""

    def __init__(self, path: str | os.PathLike, data: dict[str, Any] | None = None, *, writable: bool = True,
                 shared: bool = False) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = data if data is not None else {}
        self.writable = writable
        self.shared = shared
        self._base = copy.deepcopy(self.data)  # the file as this object last read or wrote it

    @classmethod
    def load_or_new(cls, path: str | os.PathLike, **initial: Any) -> "Manifest":
        path = Path(path)
        if path.is_file():
            return cls(path, json.loads(path.read_text()))
        data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **initial}
        return cls(path, data)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def update(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        if not self.writable:
            return
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not self.shared:
            write_json_atomic(self.path, self.data)
            return
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            if self.path.is_file():
                self.data = merge_changes(self._base, self.data, json.loads(self.path.read_text()))
            write_json_atomic(self.path, self.data)
        self._base = copy.deepcopy(self.data)


def merge_changes(base: dict[str, Any], mine: dict[str, Any], disk: dict[str, Any]) -> dict[str, Any]:
    """``disk`` with what ``mine`` changed since ``base`` (a three-way merge, one level into dict sections)."""
    out = dict(disk)
    for key, value in mine.items():
        before = base.get(key)
        if isinstance(value, dict) and isinstance(disk.get(key), dict):
            before = before if isinstance(before, dict) else {}
            out[key] = {**disk[key], **{k: v for k, v in value.items() if k not in before or before[k] != v}}
        elif key not in base or before != value:
            out[key] = value
    return out
