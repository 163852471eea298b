"""Slow set-up for the browser and Binder checks, started in the background as soon as pytest has
collected those tests (see conftest.py), so that installing overlaps the other tests; those two
tests are moved to the end of the run and wait here for their set-up.

The jobs are kept in files (a claim, a log, an exit status) in a folder of this test run, so that
under pytest-xdist every worker collects the tests but only the first starts each job, and a test
on any worker can wait for it. When the run ends, conftest.py removes the folder (`cleanup`)
once every job in it has ended.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW = ("test_browser", "test_binder")
# one id per test run: pytest-xdist gives all workers of a run the same; a plain run makes its own
RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"{os.getpid()}-{time.time_ns()}"


def jobs_dir(run_id: str) -> Path:
    """The folder of test run `run_id`'s background jobs."""
    return Path(tempfile.gettempdir()) / f"edgelab-prepare-{run_id}"


JOBS_DIR = jobs_dir(RUN_ID)
_PROCS: list[subprocess.Popen] = []  # kept so that they are not reaped (and warned about) early
# runs the command with its output to $1 and, once it ends, writes its exit status to $2
_RECORD = 'log=$1 rc=$2; shift 2; "$@" >"$log" 2>&1; echo $? >"$rc.part"; mv "$rc.part" "$rc"'


def chromium_install_command() -> list[str] | str | None:
    """The command that installs Debian's Chromium, None when it is already here, or why it cannot be."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return None
    if not shutil.which("apt-get"):
        return "no Chromium on this machine and no apt-get to install Debian's"
    if os.geteuid() != 0:
        return "no Chromium on this machine, and installing Debian's needs root"
    return ["sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"]


def _paths(name: str) -> tuple[Path, Path, Path]:
    """(claim, log, exit status) files of background job `name` in this run."""
    return JOBS_DIR / f"{name}.claim", JOBS_DIR / f"{name}.log", JOBS_DIR / f"{name}.rc"


def start(name: str, cmd: list[str]) -> None:
    """Start `cmd` in the background unless this run (any xdist worker of it) already started it."""
    claim, log, rc = _paths(name)
    JOBS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(time.time()))
    argv = ["sh", "-c", _RECORD, "sh", str(log), str(rc), *map(str, cmd)]
    _PROCS.append(subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))


def wait(name: str, timeout: float = 1200) -> tuple[int, str, float]:
    """Wait for background job `name`: (exit status, its output, seconds it ran)."""
    claim, log, rc = _paths(name)
    if not claim.exists():
        raise RuntimeError(f"background job {name!r} was never started in this run")
    t0 = float(claim.read_text() or time.time())
    while not rc.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"background job {name!r} still running after {timeout:.0f} s")
        time.sleep(1)
    return int(rc.read_text()), log.read_text() if log.exists() else "", rc.stat().st_mtime - t0


def cleanup(folder: Path) -> bool:
    """Remove a run's job folder once every job started in it has ended; True if it was removed."""
    if not folder.is_dir():
        return False
    if any(not claim.with_suffix(".rc").exists() for claim in folder.glob("*.claim")):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def begin(module_names: set[str]) -> None:
    """Start the set-up that the collected slow tests need."""
    if "test_browser" in module_names:
        cmd = chromium_install_command()
        if isinstance(cmd, list):
            start("chromium", cmd)
    if "test_binder" in module_names:
        start("binder", [sys.executable, str(ROOT / "binder" / "check.py")])
