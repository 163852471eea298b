#!/usr/bin/env python3
"""Check here what Binder will do: install binder/requirements.txt into a clean virtual
environment, run binder/postBuild in it, then binder/start with a smoke command.

    python3 binder/check.py [VENV_DIR]      # default: .binder-venv/ (removed afterwards)

Binder takes torch and torchvision from PyTorch's CPU index (the extra index in
requirements.txt); where that index cannot be reached (as on our machines, which reach PyPI
only) pip resolves them from PyPI instead, so this checks that everything resolves and installs
together and that the post-build and start steps work, not the CPU wheels themselves.
Prints one line per step with its time; exits non-zero at the first failing step.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ("import edgelab.models, edgelab.runner, segment_anything, torchvision, ipywidgets, jupyterlab, matplotlib; "
         "import os; print('start ok, MPLBACKEND =', os.environ.get('MPLBACKEND'))")


def step(name: str, cmd: list[str], env: dict) -> str:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"{'ok  ' if res.returncode == 0 else 'FAIL'} {name}  {time.time() - t0:.0f} s", flush=True)
    if res.returncode != 0:
        print((res.stdout + res.stderr)[-3000:], file=sys.stderr)
        raise SystemExit(1)
    return res.stdout


def main(argv: list[str]) -> int:
    target = Path(argv[0]).resolve() if argv else ROOT / ".binder-venv"
    keep = bool(argv)
    if target.exists():
        shutil.rmtree(target)
    try:
        t0 = time.time()
        venv.create(target, with_pip=True)
        print(f"ok   clean virtual environment  {time.time() - t0:.0f} s", flush=True)
        bindir = target / "bin"
        env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(target))
        env.pop("PYTHONPATH", None)
        step("pip install -r binder/requirements.txt",
             [str(bindir / "pip"), "install", "-q", "--retries", "1", "--timeout", "15",
              "-r", "binder/requirements.txt"], env)
        step("binder/postBuild", ["bash", "binder/postBuild"], env)
        out = step("binder/start python -c SMOKE", ["bash", "binder/start", "python", "-c", SMOKE], env)
        print(out.strip())
        versions = step("versions", [str(bindir / "python"), "-c",
                                     "import torch, torchvision; print(torch.__version__, torchvision.__version__)"], env)
        print(f"torch, torchvision: {versions.strip()}")
    finally:
        if not keep and target.exists():
            shutil.rmtree(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
