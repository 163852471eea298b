"""Slow set-up for the browser and Binder checks: Debian's Chromium (apt-get) and binder/check.py.

`python3 bootstrap.py test` starts both in the background before pytest starts (`Jobs`), and names
their folder in $EDGELAB_PREPARED, so that installing overlaps the other tests; conftest.py moves
the two tests to the end of the run, where each waits for its job (`result`). A run of pytest
without that folder (pytest by hand, one test file) runs the job inside the test instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW = ("test_browser", "test_binder")  # test modules that wait for a job: run last
FOLDER_ENV = "EDGELAB_PREPARED"


def chromium_install_command() -> list[str] | str | None:
    """The command that installs Debian's Chromium, None when it is already here, or why it cannot be."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return None
    if not shutil.which("apt-get"):
        return "no Chromium on this machine and no apt-get to install Debian's"
    if os.geteuid() != 0:
        return "no Chromium on this machine, and installing Debian's needs root"
    return ["sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"]


def binder_command() -> list[str]:
    return [sys.executable, str(ROOT / "binder" / "check.py")]


def commands() -> dict[str, list[str]]:
    """The jobs this machine needs, by name."""
    jobs = {"binder": binder_command()}
    chromium = chromium_install_command()
    if isinstance(chromium, list):
        jobs["chromium"] = chromium
    return jobs


class Jobs:
    """Background jobs of one test run, each writing `NAME.log` and, once it ends, `NAME.rc` in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._procs: list[tuple[subprocess.Popen, threading.Thread]] = []

    def start(self, name: str, cmd: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        thread = threading.Thread(target=self._record, args=(name, proc), daemon=True)
        thread.start()
        self._procs.append((proc, thread))

    def _record(self, name: str, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        part = self.folder / f"{name}.rc.part"
        part.write_text(str(rc))
        part.replace(self.folder / f"{name}.rc")  # atomic: a waiting test never reads half a file

    def stop(self) -> None:
        """End the jobs still running (the tests that wanted them did not run or gave up)."""
        for proc, thread in self._procs:
            if proc.poll() is None:
                proc.terminate()
            thread.join(timeout=30)


def result(name: str, cmd: list[str], timeout: float = 1200) -> tuple[int, str, float]:
    """Job `name`'s (exit status, output, seconds): from the run's background job where
    bootstrap.py started one, else by running `cmd` now."""
    folder = os.environ.get(FOLDER_ENV)
    log = Path(folder) / f"{name}.log" if folder else None
    t0 = time.time()
    if log is None or not log.exists():
        p = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.time() - t0
    rc = log.with_suffix(".rc")
    started = log.stat().st_ctime
    while not rc.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"background job {name!r} still running after {timeout:.0f} s")
        time.sleep(1)
    return int(rc.read_text()), log.read_text(), rc.stat().st_mtime - started
