"""Measuring: the machine, latency (median and spread), peak memory, MACs, and bench records.

Taught in notebook 00, section "Where a frame's time goes". The rules (GUIDE, "Measuring"):
warm up first, repeat, report the median and the spread (IQR), and record threads and CPU
features. A speed-up is a ratio of two variants measured in the same run, so `compare` times
variants interleaved (A B C A B C ...) and machine drift hits all of them alike. Memory is the
peak RSS delta of the measured code in a fresh process, never a guess from parameter counts.
No test asserts a time: benchmarks report, tests check behaviour.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.utils.benchmark as torch_benchmark
from torch.utils.flop_counter import FlopCounterMode

WEIGHT_KINDS = ("trained", "random", "checkpoint")  # the same three kinds as models.WEIGHT_KINDS
VARIANT_KEYS = ("name", "label", "batch", "image_size", "median_s", "iqr_s", "peak_mem_mb",
                "params", "macs", "size_mb", "miou", "agreement", "max_abs_err", "rel_err")
_CPU_FLAGS = {  # key in machine_info -> /proc/cpuinfo flags, any of which counts
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni", "avx_vnni"),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}
_RESULT_MARK = "EDGELAB_PEAK_RSS "


# ---------------------------------------------------------------- the machine

def _cpuinfo() -> tuple[str | None, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (None and empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, set()
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and name is None:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _cpu_capability() -> str | None:
    """The SIMD level PyTorch's CPU kernels dispatch to (e.g. "AVX512"), None if unknown."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def machine_info() -> dict[str, Any]:
    """What a timing depends on: versions, threads, CPU model and features, GPU.

    Returns:
        dict with python, torch, platform, cpu, threads, cpu_capability, the booleans
        avx2, avx512f, avx512_bf16, avx512_vnni, amx, and gpu (CUDA device name or None).
    """
    name, flags = _cpuinfo()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": name or platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": _cpu_capability(),
    }
    for key, names in _CPU_FLAGS.items():
        info[key] = any(n in flags for n in names)
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


# ---------------------------------------------------------------- latency

@dataclass
class Timing:
    """Per-call times of one callable, summarised by median and interquartile range (seconds)."""

    label: str
    median_s: float
    iqr_s: float
    times_s: list[float] = field(repr=False)
    threads: int

    @classmethod
    def from_times(cls, label: str, times_s: list[float], threads: int | None = None) -> Timing:
        """Summarise raw per-call times."""
        t = np.asarray(times_s, dtype=float)
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        threads = torch.get_num_threads() if threads is None else threads
        return cls(label, float(med), float(q3 - q1), [float(x) for x in t], threads)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _run_once(timer: torch_benchmark.Timer) -> float:
    """One timed call. `Timer.timeit(1)` would add two warm-up calls to every repeat."""
    if hasattr(timer, "_timeit"):
        return timer._timeit(1)
    return timer.timeit(number=1).times[0]


def time_callable(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, label: str = "",
                  min_run_time: float | None = None) -> Timing:
    """Time `fn()` with `torch.utils.benchmark.Timer` (it fixes threads and syncs accelerators).

    Arguments:
        fn: called with no arguments; wrap arguments in a lambda.
        warmup: untimed calls first (first-call allocation, lazy init, caches).
        repeats: timed calls, one time each (exactly `warmup + repeats` calls in all).
        label: the name to carry in the result.
        min_run_time: if given, use `blocked_autorange` instead: as many timed blocks as fit in
            this many seconds (good for fast functions); `repeats` is then ignored.
    Returns:
        Timing with the per-call times, their median and IQR.
    """
    threads = torch.get_num_threads()
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, num_threads=threads)
    for _ in range(warmup):
        fn()
    if min_run_time is not None:
        times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    else:
        times = [_run_once(timer) for _ in range(max(1, repeats))]
    return Timing.from_times(label, times, threads)


def _sync() -> None:
    """Wait for queued CUDA work, if CUDA is in use (perf_counter alone would not)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compare(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1,
            repeats: int = 5, number: int = 1) -> dict[str, Timing]:
    """Time several variants interleaved (A B C A B C ...) so machine drift hits all alike.

    Arguments:
        fns: variant name -> callable with no arguments.
        warmup: untimed rounds over all variants (also interleaved).
        repeats: timed rounds; each variant gets one time per round.
        number: consecutive calls per timed block, the time being their mean. 1 times each call
            right after the other variants' (cold caches); more times a stream of calls, as a
            deployed model runs frame after frame (warm caches, the steady state).
    Returns:
        variant name -> Timing (median and IQR of its `repeats` times).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(max(1, number)):
                fn()
            _sync()
            times[name].append((time.perf_counter() - start) / max(1, number))
    return {name: Timing.from_times(name, t) for name, t in times.items()}


# ---------------------------------------------------------------- memory

def _peak_mb() -> float:
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


def _reset_peak() -> bool:
    """Restart the peak-RSS mark at the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return _peak_mb()


# The child runs the two functions above (their source, so it need not import torch).
_CHILD = "\n".join(["import json, resource, sys", inspect.getsource(_peak_mb),
                    inspect.getsource(_reset_peak), f"""
ns = {{"__name__": "__edgelab_peak__"}}
exec(compile(sys.argv[1], "<setup>", "exec"), ns)
_reset_peak()
before = _peak_mb()
exec(compile(sys.argv[2], "<fn_source>", "exec"), ns)
print({_RESULT_MARK!r} + json.dumps({{"delta_mb": _peak_mb() - before}}), flush=True)
"""])


def _child_env() -> dict[str, str]:
    """Environment for the child: ours, with edgelab importable from the child too."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def peak_memory_mb(fn_source: str, setup: str = "", *, timeout: float | None = None) -> float:
    """Peak RSS growth (MB) caused by running `fn_source` after `setup` in a fresh Python.

    The child runs `setup` (imports, model building), restarts its peak-RSS mark at the
    current RSS, runs `fn_source` in the same namespace and prints how far the peak rose.
    A fresh process means nothing measured earlier in this one inflates or hides the peak.
    (Where the mark cannot be restarted, memory that `setup` peaked at and freed again is
    reused unseen, so the delta is then a lower bound.)

    Arguments:
        fn_source: Python source of the work to measure.
        setup: Python source run first, not counted.
        timeout: seconds before the child is killed (None: no limit).
    Returns:
        the peak RSS delta in MB.
    Raises:
        RuntimeError: the child failed (the message carries its last line of stderr)
            or ran past `timeout`.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, setup, fn_source],
                              capture_output=True, text=True, env=_child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peak_memory_mb: the measured code ran past {timeout} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"peak_memory_mb: the measured code failed: {lines[-1]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return float(json.loads(line[len(_RESULT_MARK):])["delta_mb"])
    raise RuntimeError("peak_memory_mb: the child process printed no result")


# Several measurements in one child: between them freed memory goes back to the system
# (malloc_trim), so the next peak mark starts from what is really live.
_CHILD_SERIES = "\n".join(["import ctypes, gc, json, resource, sys", inspect.getsource(_peak_mb),
                           inspect.getsource(_reset_peak), f"""
def _release():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass

ns = {{"__name__": "__edgelab_peak__"}}
exec(compile(sys.argv[1], "<setup>", "exec"), ns)
for name, src in json.loads(sys.argv[2]).items():
    _release()
    _reset_peak()
    before = _peak_mb()
    exec(compile(src, "<" + name + ">", "exec"), ns)
    print({_RESULT_MARK!r} + json.dumps({{"name": name, "delta_mb": _peak_mb() - before}}), flush=True)
"""])


def peak_memory_series(snippets: Mapping[str, str], setup: str = "", *,
                       timeout: float | None = None) -> dict[str, float]:
    """Peak RSS growth (MB) of each snippet, run one after another in one fresh Python.

    Like `peak_memory_mb`, but `setup` (imports, a model) runs once for all snippets, which
    saves a process start per measurement. Before each snippet the child frees what earlier
    ones left (garbage collection, `malloc_trim`) and restarts its peak mark; large blocks are
    always returned to the system (MALLOC_MMAP_THRESHOLD_), so an earlier snippet's freed
    memory cannot hide the next one's peak. Order smaller snippets first all the same.

    Arguments:
        snippets: name -> Python source, in the order to run.
        setup: Python source run first, not counted.
        timeout: seconds before the child is killed (None: no limit).
    Returns:
        name -> peak RSS delta in MB.
    Raises:
        RuntimeError: the child failed or ran past `timeout`.
    """
    env = _child_env()
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD_SERIES, setup, json.dumps(dict(snippets))],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peak_memory_series: the measured code ran past {timeout} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"peak_memory_series: the measured code failed: {lines[-1]}")
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            rec = json.loads(line[len(_RESULT_MARK):])
            out[rec["name"]] = float(rec["delta_mb"])
    missing = [n for n in snippets if n not in out]
    if missing:
        raise RuntimeError(f"peak_memory_series: no result for {', '.join(missing)}")
    return out


def cuda_peak_memory_mb(fn: Callable[[], Any], device: str | torch.device | None = None) -> float:
    """Peak CUDA memory (MB) that one call of `fn` allocates above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory pages).

    Each one is the kernel mapping and zeroing a 4 KB page; code that allocates large fresh
    tensors on every call pays for them every call. Difference two readings around a call.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------- MACs

def count_macs(module: torch.nn.Module, *inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, counted by PyTorch's FlopCounterMode.

    Arguments:
        module: the model (or any callable module).
        inputs: its positional inputs.
    Returns:
        MACs = FLOPs // 2 (one multiply and one add per MAC).
    """
    # FlopCounterMode's module hooks fail under no_grad/inference mode while parameters require
    # grad; freezing the parameters for the count builds no graph either.
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    inputs = tuple(t.detach() if torch.is_tensor(t) else t for t in inputs)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            module(*inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------- records

def _check_variant(variant: Mapping[str, Any]) -> None:
    """Raise ValueError unless `variant` is a dict with a name and only known keys."""
    if not isinstance(variant, Mapping) or not variant.get("name"):
        raise ValueError(f"every variant needs a 'name': {variant!r}")
    unknown = sorted(set(variant) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(f"variant {variant['name']!r} has unknown keys {unknown}; "
                         f"allowed: {', '.join(VARIANT_KEYS)}")


def bench_record(reference: str, weights: str, variants: list[dict]) -> dict[str, Any]:
    """A bench JSON record in the shape of GUIDE's "Command-line contract".

    Arguments:
        reference: the name of the variant the others are compared with.
        weights: "trained", "random" or "checkpoint".
        variants: dicts with "name" and whichever of VARIANT_KEYS apply.
    Returns:
        {"reference", "weights", "machine": machine_info(), "variants"}.
    Raises:
        ValueError: bad weights kind, a variant without a name or with an unknown key, or a
            reference that names no variant.
    """
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, not {weights!r}")
    for variant in variants:
        _check_variant(variant)
    names = [v["name"] for v in variants]
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the variants {names}")
    return {"reference": reference, "weights": weights, "machine": machine_info(),
            "variants": [dict(v) for v in variants]}


def save_json(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `record` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as blank."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def as_table(variants: list[Mapping[str, Any]]) -> str:
    """A Markdown table of variants; columns are the keys present, in VARIANT_KEYS order."""
    present = {k for v in variants for k in v}
    cols = [k for k in VARIANT_KEYS if k in present] + sorted(present - set(VARIANT_KEYS))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v in variants:
        lines.append("| " + " | ".join(_fmt(v.get(k)) for k in cols) + " |")
    return "\n".join(lines)


__all__ = ["WEIGHT_KINDS", "VARIANT_KEYS", "Timing", "machine_info", "time_callable", "compare",
           "peak_rss_mb", "peak_memory_mb", "peak_memory_series", "cuda_peak_memory_mb", "minor_faults", "count_macs", "bench_record", "save_json", "as_table"]


# --- comparing a variant with its reference -----------------------------------------------------

def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max_abs_err and rel_err (Frobenius norm of the difference over that of `ref`)."""
    diff = (out.double() - ref.double())
    return {"max_abs_err": diff.abs().max().item(),
            "rel_err": (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()}


def size_mb(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> float:
    """Bytes of `torch.save` of the state dict (what a file on disk holds), in MB."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.tell() / 2**20


def gemm_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Throughput of an n x n x n matmul in `dtype` (GFLOP/s, median of `repeats`); notebook 01,
    "BF16 on this CPU"."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = time_callable(lambda: a @ b, warmup=2, repeats=repeats)
    return 2 * n**3 / t.median_s / 1e9
