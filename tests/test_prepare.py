"""The test run's own machinery: background jobs shared by pytest-xdist workers (tests/prepare.py)
and the command `bootstrap.py test` runs."""
from __future__ import annotations

import sys
from pathlib import Path

import prepare
import pytest


@pytest.fixture
def jobs_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(prepare, "JOBS_DIR", tmp_path / "jobs")
    return prepare.JOBS_DIR


def test_a_job_starts_once_per_run_and_any_worker_can_wait_for_it(jobs_dir):
    count = jobs_dir.parent / "count"
    prepare.start("echo", ["sh", "-c", f"echo started >> {count}; echo hello; exit 3"])
    prepare.start("echo", ["sh", "-c", f"echo started >> {count}"])  # as another worker would
    rc, log, seconds = prepare.wait("echo", timeout=60)
    assert (rc, log.strip()) == (3, "hello") and seconds >= 0
    assert count.read_text() == "started\n"


def test_waiting_for_a_job_never_started_is_an_error(jobs_dir):
    with pytest.raises(RuntimeError, match="never started"):
        prepare.wait("nothing")


def test_waiting_gives_up_after_its_timeout(jobs_dir):
    prepare.start("slow", [sys.executable, "-c", "import time; time.sleep(10)"])
    with pytest.raises(TimeoutError, match="still running"):
        prepare.wait("slow", timeout=1)


def test_a_run_folder_is_removed_once_its_jobs_have_ended(jobs_dir):
    prepare.start("slow", [sys.executable, "-c", "import time; time.sleep(2)"])
    assert not prepare.cleanup(jobs_dir) and jobs_dir.is_dir()  # a job is still running
    prepare.wait("slow", timeout=60)
    assert prepare.cleanup(jobs_dir) and not jobs_dir.exists()
    assert not prepare.cleanup(jobs_dir)


def test_bootstrap_test_runs_two_workers_with_a_share_of_the_cores_each():
    import bootstrap  # the checkout's root is on sys.path (conftest.py)

    env: dict[str, str] = {}
    cmd = [str(c) for c in bootstrap.test_command(env, ["-k", "x"])]
    assert cmd[cmd.index("-n") + 1] == "2" and cmd[cmd.index("--dist") + 1] == "loadfile"
    assert cmd[-2:] == ["-k", "x"] and cmd.index("notebooks") < cmd.index("tests")
    assert int(env["OMP_NUM_THREADS"]) >= 1
    kept = {"OMP_NUM_THREADS": "7"}
    bootstrap.test_command(kept, [])
    assert kept["OMP_NUM_THREADS"] == "7"
