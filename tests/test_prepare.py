"""The test run's own machinery: the background set-up jobs (tests/prepare.py) and the command
`bootstrap.py test` runs."""
from __future__ import annotations

import sys
import time

import prepare
import pytest


@pytest.fixture
def jobs(tmp_path, monkeypatch) -> prepare.Jobs:
    monkeypatch.setenv(prepare.FOLDER_ENV, str(tmp_path / "jobs"))
    jobs = prepare.Jobs(tmp_path / "jobs")
    yield jobs
    jobs.stop()


def test_a_test_gets_the_background_jobs_exit_status_and_output(jobs):
    jobs.start("echo", ["sh", "-c", "echo hello; exit 3"])
    rc, log, seconds = prepare.result("echo", ["sh", "-c", "echo not this one"], timeout=60)
    assert (rc, log.strip()) == (3, "hello") and seconds >= 0


def test_without_a_background_job_the_test_runs_the_command_itself(jobs, monkeypatch):
    assert prepare.result("here", ["sh", "-c", "echo now; exit 4"], timeout=60)[:2] == (4, "now\n")
    monkeypatch.delenv(prepare.FOLDER_ENV)
    assert prepare.result("here", ["sh", "-c", "echo now"], timeout=60)[:2] == (0, "now\n")


def test_waiting_gives_up_after_its_timeout(jobs):
    jobs.start("slow", [sys.executable, "-c", "import time; time.sleep(10)"])
    with pytest.raises(TimeoutError, match="still running"):
        prepare.result("slow", ["true"], timeout=1)


def test_stopping_ends_the_jobs_still_running(jobs):
    jobs.start("slow", [sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.time()
    jobs.stop()
    rc, _, _ = prepare.result("slow", ["true"], timeout=5)
    assert rc != 0 and time.time() - t0 < 30


def test_bootstrap_starts_the_background_jobs_only_for_a_whole_run():
    import bootstrap

    assert not bootstrap.selects_tests([]) and not bootstrap.selects_tests(["--durations=30", "-x"])
    assert bootstrap.selects_tests(["-k", "binder"]) and bootstrap.selects_tests(["tests/test_cli.py"])
    assert bootstrap.selects_tests(["-mslow"])


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
