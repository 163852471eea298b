#!/usr/bin/env python3
"""Set up edgelab on a machine with nothing but Python 3, then run the workbook or its tests.

    python3 bootstrap.py run    # execute every notebook (quick profile) and print the results table
    python3 bootstrap.py test   # pytest over tests/ and nbval over notebooks/, two files at a time

Both create `.venv/` beside this file on first use and install edgelab into it (torch and
torchvision from the package registry together: the registry's torchvision is built against
its own torch). Later calls reuse the environment unless pyproject.toml changed.
Extra arguments go to `edgelab run` or to pytest.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".edgelab-installed"
TEST_WORKERS = 2  # `test`: notebooks and test files run two at a time (a 2-core machine's whole CI)


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_env() -> None:
    """Create the virtual environment and install edgelab[test] unless already up to date."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        venv.create(VENV, with_pip=True)
    py = BIN / "python"
    sh(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    sh(py, "-m", "pip", "install", "-q", "torch", "torchvision")
    sh(py, "-m", "pip", "install", "-q", "-e", ".[test]")
    STAMP.write_text(want)


def test_command(env: dict[str, str], rest: list[str]) -> list[str | Path]:
    """pytest over notebooks/ and tests/, a file per pytest-xdist worker at a time.

    Each worker gets its share of the cores (OMP_NUM_THREADS, unless already set), so the two do
    not fight over them; the notebooks come first, as they are the longest files to run.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // TEST_WORKERS)))
    return [BIN / "python", "-m", "pytest", "notebooks", "tests", "--nbval-lax", "--nbval-current-env",
            "-q", "-n", str(TEST_WORKERS), "--dist", "loadfile", *rest]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__)
        return 2
    verb, rest = argv[0], argv[1:]
    try:
        ensure_env()
    except subprocess.CalledProcessError as e:
        print(f"bootstrap: installing failed ({e}); see the pip output above", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONHASHSEED="0")
    if verb == "run":
        cmd = [BIN / "edgelab", "run", *rest]
        print("+", " ".join(map(str, cmd)), flush=True)
        return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    return run_tests(env, test_command(env, rest), background=not selects_tests(rest))


def selects_tests(rest: list[str]) -> bool:
    """Whether pytest's extra arguments pick some tests (a path, -k, -m): then no background set-up."""
    return any(not a.startswith("-") or a.startswith(("-k", "-m")) for a in rest)


def run_tests(env: dict[str, str], cmd: list[str | Path], background: bool = True) -> int:
    """Run pytest; with `background`, the browser's and Binder's slow installs run beside it
    (tests/prepare.py), and the two tests that need them, run last, wait for them."""
    sys.path.insert(0, str(ROOT / "tests"))
    import prepare

    with tempfile.TemporaryDirectory(prefix="edgelab-prepared-") as folder:
        jobs = prepare.Jobs(Path(folder))
        for name, job in prepare.commands().items() if background else ():
            jobs.start(name, job)
        env[prepare.FOLDER_ENV] = folder
        print("+", " ".join(map(str, cmd)), flush=True)
        try:
            return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
        finally:
            jobs.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
