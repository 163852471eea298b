"""Slow set-up for the browser and Binder checks, started in the background as soon as pytest has
collected those tests (see conftest.py), so that installing overlaps the other tests; those two
tests are moved to the end of the run and wait here for their set-up.
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
_JOBS: dict[str, tuple[subprocess.Popen, Path, float]] = {}
SLOW = ("test_browser", "test_binder")


def chromium_install_command() -> list[str] | str | None:
    """The command that installs Debian's Chromium, None when it is already here, or why it cannot be."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return None
    if not shutil.which("apt-get"):
        return "no Chromium on this machine and no apt-get to install Debian's"
    if os.geteuid() != 0:
        return "no Chromium on this machine, and installing Debian's needs root"
    return ["sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"]


def start(name: str, cmd: list[str]) -> None:
    """Start `cmd` in the background (output to a log file) unless `name` is already running."""
    if name in _JOBS:
        return
    log = Path(tempfile.mkstemp(prefix=f"edgelab-{name}-", suffix=".log")[1])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _JOBS[name] = (proc, log, time.time())


def wait(name: str, timeout: float = 1200) -> tuple[int, str, float]:
    """Wait for background job `name`: (exit status, its output, seconds it ran)."""
    proc, log, t0 = _JOBS[name]
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text(), time.time() - t0


def begin(module_names: set[str]) -> None:
    """Start the set-up that the collected slow tests need."""
    if "test_browser" in module_names:
        cmd = chromium_install_command()
        if isinstance(cmd, list):
            start("chromium", cmd)
    if "test_binder" in module_names:
        start("binder", [sys.executable, str(ROOT / "binder" / "check.py")])
