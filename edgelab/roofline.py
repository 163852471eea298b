"""What this machine can do at all: its GEMM rates per dtype and its memory bandwidth.

A variant's lower bound is its work at the machine's measured rate: FLOPs (or int8 ops) over the
GEMM rate of their dtype, or bytes moved over the bandwidth, whichever is larger (a roofline).
Its measured time over that bound says how much is left on the table. `edgelab bench machine`
prints the rates; the chapters divide their variants' times by them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from . import bench, profiling

DTYPES = ("fp32", "bf16", "int8")


def _gemm_inputs(dtype: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if dtype == "int8":
        return (torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8),
                torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8))
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return (a.bfloat16(), b.bfloat16()) if dtype == "bf16" else (a, b)


def gemm_rate(dtype: str, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """An n x n x n matmul in `dtype`: its median and fastest time, and its rate in G(FL)OP/s.

    fp32 and bf16 run `a @ b` (oneDNN / BLAS); int8 runs `torch._int_mm` (int32 accumulate), the
    kernel chapter 03's Int8Linear uses. One multiply-add counts as two operations. The rate is
    taken from the fastest call: it is what the machine can do, and on a shared machine a call is
    only ever slowed down (the median moves with the neighbours' load; it is kept as `median_s`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if n < 32 or n % 8:
        raise ValueError(f"n must be a multiple of 8 and at least 32, not {n}")
    a, b = _gemm_inputs(dtype, n)
    fn = (lambda: torch._int_mm(a, b)) if dtype == "int8" else (lambda: a @ b)
    t = bench.time_callable(fn, warmup=2, repeats=repeats)
    best = min(t.times_s)
    return {"median_s": t.median_s, "iqr_s": t.iqr_s, "best_s": best, "rate": 2 * n**3 / best / 1e9}


def bandwidth(mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s from copying an `mb` MB buffer (each byte read once, written once),
    from the fastest copy, as `gemm_rate` does."""
    if mb < 16:
        raise ValueError("use a buffer of 16 MB or more: smaller ones fit in the caches")
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    t = bench.time_callable(lambda: dst.copy_(src), warmup=2, repeats=repeats)
    best = min(t.times_s)
    return {"median_s": t.median_s, "iqr_s": t.iqr_s, "best_s": best, "rate": 2 * src.numel() * 4 / best / 1e9}


def machine_rates(n: int = 1024, mb: int = 256, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Every rate the roofline needs, measured now: {"fp32", "bf16", "int8", "memory"}."""
    rates = {d: gemm_rate(d, n, repeats) for d in DTYPES}
    rates["memory"] = bandwidth(mb, repeats)
    return rates


def lower_bound_s(work: Mapping[str, float], rates: Mapping[str, Mapping[str, float]],
                  bytes_moved: float = 0.0) -> float:
    """Seconds the machine needs at least: the work of each dtype (FLOPs or ops) at its GEMM rate,
    or the bytes over the bandwidth if that takes longer."""
    unknown = set(work) - set(DTYPES)
    if unknown:
        raise ValueError(f"work in unknown dtypes {sorted(unknown)}; use {', '.join(DTYPES)}")
    compute = sum(w / (rates[d]["rate"] * 1e9) for d, w in work.items())
    memory = bytes_moved / (rates["memory"]["rate"] * 1e9) if bytes_moved else 0.0
    return max(compute, memory)


def work_by_dtype(module: torch.nn.Module, x: torch.Tensor, dtype: str = "fp32",
                  int8: Sequence[str] = (), fake: bool = True) -> dict[str, float]:
    """The FLOPs of one forward of `module` on `x` by the dtype they run in: all in `dtype`, except
    the `profiling.flop_categories` named in `int8` (for a W8A8 variant "Linear/MLP", for a
    runtime that also quantizes convolutions "conv/patch embed" too), counted as int8 operations.
    `fake=False` runs the forward for real (a whole frame, whose prompt encoder needs values)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    cats = profiling.flop_categories(module, x, fake=fake)
    unknown = set(int8) - set(cats)
    if unknown:
        raise ValueError(f"unknown FLOP categories {sorted(unknown)}; use {', '.join(cats)}")
    quantized = float(sum(cats[c] for c in int8))
    work = {dtype: float(sum(cats.values())) - quantized}
    if quantized:
        work["int8"] = work.get("int8", 0.0) + quantized
    return work


def annotate(row: dict, work: Mapping[str, float], rates: Mapping[str, Mapping[str, float]],
             time_key: str = "median_s") -> dict:
    """`row` with `roofline_s` (its lower bound) and `of_limit` (bound / its measured time) added,
    the two fields results records carry (chapters 01, 03 and 05)."""
    bound = lower_bound_s(work, rates)
    return {**row, "roofline_s": bound, "of_limit": of_limit(row[time_key], bound)}


def rates_line(rates: Mapping[str, Mapping[str, float]]) -> str:
    """One line naming the measured rates, for a notebook's table heading."""
    return (f"this machine: fp32 {rates['fp32']['rate']:.0f} GFLOP/s, bf16 {rates['bf16']['rate']:.0f} GFLOP/s, "
            f"int8 {rates['int8']['rate']:.0f} GOP/s (torch._int_mm), memory {rates['memory']['rate']:.1f} GB/s")


def of_limit(measured_s: float, bound_s: float) -> float:
    """The fraction of the machine's limit a variant reaches: bound / measured (1.0 is the roof)."""
    if measured_s <= 0:
        raise ValueError("a measured time must be positive")
    return bound_s / measured_s


def machine_record(n: int = 1024, mb: int = 256, repeats: int = 5) -> dict[str, Any]:
    """`edgelab bench machine`: a bench record with one variant per rate (random data: timing only)."""
    rates = machine_rates(n, mb, repeats)
    units = {"fp32": "GFLOP/s", "bf16": "GFLOP/s", "int8": "GOP/s", "memory": "GB/s"}
    variants = [{"name": f"gemm {d}" if d != "memory" else "memory copy", "median_s": r["median_s"],
                 "iqr_s": r["iqr_s"], "rate": r["rate"], "unit": units[d]} for d, r in rates.items()]
    record = bench.bench_record("gemm fp32", "random", variants)
    record["rates"] = {d: r["rate"] for d, r in rates.items()}
    record["gemm_n"], record["copy_mb"] = n, mb
    record["note"] = "random matrices: the machine's rates, not any model's"
    return record
