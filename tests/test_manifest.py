"""Run provenance: which code a run started from."""

import shutil
import subprocess

import pytest

from adaptsoup.core.manifest import config_tag, git_commit, git_dirty, provenance_lines

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_commit_and_dirty_flag_follow_the_checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = git_commit(tmp_path)
    assert commit is not None and len(commit) == 40
    assert git_dirty(tmp_path) is False
    (tmp_path / "notes.txt").write_text("untracked files do not make a checkout dirty\n")
    assert git_dirty(tmp_path) is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_dirty(tmp_path) is True
    assert git_commit(tmp_path) == commit


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) is None
    assert git_dirty(tmp_path) is None


def test_config_tag_is_stable_and_separates_settings():
    assert config_tag({"a": 1, "b": 2}, "x") == config_tag({"b": 2, "a": 1}, "x")
    assert config_tag({"a": 1}, "x") != config_tag({"a": 2}, "x")


def test_provenance_lines_name_command_commit_machine_and_time():
    result = {"command": "adaptsoup bench c10c --mode quick", "commit": "abc123", "source_dirty": False,
              "machine": {"cpu": "Some CPU", "cpu_count": 2}, "wall_time_s": 90.0}
    assert provenance_lines(result) == ["Command: `adaptsoup bench c10c --mode quick`  ",
                                        "Commit abc123 (clean checkout), Some CPU (2 cores), wall time 1.5 min."]
    assert "(with uncommitted changes)" in provenance_lines({**result, "source_dirty": True})[1]


def test_provenance_lines_always_state_the_checkout():
    """Clean, dirty, or (in results older than the record) unknown: a report never stays silent about it."""
    result = {"command": "c", "commit": "abc123", "machine": {}, "wall_time_s": 60.0}
    assert "(checkout state not recorded)" in provenance_lines(result)[1]
    assert "(clean checkout)" in provenance_lines({**result, "source_dirty": False})[1]
    assert "(with uncommitted changes)" in provenance_lines({**result, "source_dirty": True})[1]
