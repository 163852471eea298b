"""Peak memory of named functions, each measured in one fresh Python process.

Taught in notebook 01, section "Scaling with tokens", and used by chapter 05's deployment table.
A measurement names two module-level functions by import path ("edgelab.attention:memory_setup")
and gives their arguments as JSON:
  - `setup(**setup_args)` runs once and returns a state (models, inputs), not counted;
  - `run(state, **args)` runs once per named call, each from a fresh peak mark.
Nothing is written as source text: the child imports the functions and calls them, so a rename
or a typo fails loudly here, not inside generated code.

Run as `python -m edgelab.memory SETUP RUN SETUP_ARGS_JSON CALLS_JSON` (what the parent does).
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

RESULT_MARK = "EDGELAB_PEAK_RSS "


def peak_rss_mb() -> float:
    """This process image's peak RSS in MB (VmHWM; ru_maxrss where /proc is missing).

    ru_maxrss is only the fallback: on Linux it keeps the peak of the process that forked us,
    so a small child of a big parent (a notebook with torch loaded) would show no growth.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak() -> bool:
    """Restart the peak-RSS mark at the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release() -> None:
    """Give freed memory back to the system, so the next peak mark starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def resolve(path: str) -> Callable[..., Any]:
    """The function named "package.module:function"."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"name a function as 'module:function', not {path!r}")
    return getattr(importlib.import_module(module), name)


def hold_bytes(state: Any = None, mb: float = 0.0, free: bool = True) -> int:
    """Allocate and touch `mb` MB (a known load: the measurement's own check). Returns bytes."""
    block = bytearray(int(mb * 2**20))
    n = len(block)
    if free:
        del block
    return n


def _child(setup: str, run: str, setup_args: str, calls: str) -> None:
    state = resolve(setup)(**json.loads(setup_args)) if setup else None
    fn = resolve(run)
    for name, args in json.loads(calls).items():
        release()
        reset_peak()
        before = peak_rss_mb()
        fn(state, **args)
        print(RESULT_MARK + json.dumps({"name": name, "delta_mb": peak_rss_mb() - before}), flush=True)


def _child_env() -> dict[str, str]:
    """Our environment, with edgelab importable from the child, large blocks mmapped (so a
    freed block goes back to the system at once) and Python's hash seed fixed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return env


def peak_memory_series(run: str, calls: Mapping[str, Mapping[str, Any]], setup: str = "",
                       setup_args: Mapping[str, Any] | None = None, *,
                       timeout: float | None = None) -> dict[str, float]:
    """Peak RSS growth (MB) of each call of `run`, one after another in one fresh Python.

    Arguments:
        run: "module:function" called as function(state, **args) for each entry of `calls`.
        calls: name -> JSON-able keyword arguments, in the order to run (small ones first).
        setup: "module:function" called once as function(**setup_args); its result is the state
            (not counted). Empty: the state is None.
        timeout: seconds before the child is killed (None: no limit).
    Returns:
        name -> peak RSS delta in MB. Before each call the child frees what earlier ones left
        and restarts its peak mark (where the kernel does not allow that, memory that setup
        peaked at and freed is reused unseen, so a delta is then a lower bound).
    Raises:
        RuntimeError: the child failed (with its last line of stderr) or ran past `timeout`.
    """
    argv = [sys.executable, "-m", "edgelab.memory", setup, run, json.dumps(dict(setup_args or {})),
            json.dumps({k: dict(v) for k, v in calls.items()})]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peak memory: {run} ran past {timeout} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"peak memory: {run} failed: {lines[-1]}")
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            rec = json.loads(line[len(RESULT_MARK):])
            out[rec["name"]] = float(rec["delta_mb"])
    missing = [n for n in calls if n not in out]
    if missing:
        raise RuntimeError(f"peak memory: no result for {', '.join(missing)}")
    return out


def peak_memory_mb(run: str, args: Mapping[str, Any] | None = None, setup: str = "",
                   setup_args: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> float:
    """Peak RSS growth (MB) of one call run(state, **args) in a fresh Python (see the series)."""
    return peak_memory_series(run, {"call": dict(args or {})}, setup, setup_args, timeout=timeout)["call"]


if __name__ == "__main__":
    _child(*sys.argv[1:5])
