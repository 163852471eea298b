"""Measuring: the machine, latency (median and spread), peak memory, MACs, and bench records.

Taught in notebook 00, section "Where a frame's time goes". The rules (GUIDE, "Measuring"):
warm up first, repeat, report the median and the spread (IQR), and record threads and CPU
features. A speed-up is a ratio of two variants measured in the same run, so `compare` times
variants interleaved (A B C A B C ...) and machine drift hits all of them alike. Memory is the
peak RSS delta of the measured code in a fresh process, never a guess from parameter counts.
No test asserts a time: benchmarks report, tests check behaviour.
"""
from __future__ import annotations

import io
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.utils.benchmark as torch_benchmark
from torch.utils.flop_counter import FlopCounterMode

from . import profiling  # noqa: F401 - registers the FLOPs of SDPA's CPU kernel for count_macs
from .models import WEIGHT_KINDS, count_params, weights_label  # a bench record's `weights` is a models kind
VARIANT_KEYS = ("name", "label", "batch", "image_size", "median_s", "iqr_s", "peak_mem_mb",
                "params", "macs", "size_mb", "miou", "agreement", "max_abs_err", "rel_err",
                "rate", "unit", "roofline_s", "of_limit", "encoder_s", "decoder_s", "post_s",
                "recall_50", "recall_75", "mask_ap")
_CPU_FLAGS = {  # key in machine_info -> /proc/cpuinfo flags, any of which counts
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni", "avx_vnni"),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}


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
            repeats: int = 5, number: int = 1,
            before_round: Callable[[], Any] | None = None) -> dict[str, Timing]:
    """Time several variants interleaved (A B C A B C ...) so machine drift hits all alike.

    Arguments:
        fns: variant name -> callable with no arguments.
        warmup: untimed rounds over all variants (also interleaved).
        repeats: timed rounds; each variant gets one time per round.
        number: consecutive calls per timed block, the time being their mean. 1 times each call
            right after the other variants' (cold caches); more times a stream of calls, as a
            deployed model runs frame after frame (warm caches, the steady state).
        before_round: called, untimed, before each timed round (e.g. to read the machine's
            GEMM rate in step with the variants: `attention.gemm_reader`).
    Returns:
        variant name -> Timing (median and IQR of its `repeats` times).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        if before_round is not None:
            before_round()
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(max(1, number)):
                fn()
            _sync()
            times[name].append((time.perf_counter() - start) / max(1, number))
    return {name: Timing.from_times(name, t) for name, t in times.items()}


def _flat(out: Any) -> torch.Tensor:
    """One float64 vector of a variant's output (a tensor, or a tuple/list of them)."""
    if torch.is_tensor(out):
        return out.detach().double().flatten()
    if isinstance(out, (tuple, list)) and out:
        return torch.cat([_flat(o) for o in out])
    raise TypeError(f"a raced variant must return a tensor or a tuple of tensors, not {type(out).__name__}")


def race(fns: Mapping[str, Callable[[], Any]], reference: str | None = None, *, warmup: int = 1,
         repeats: int = 5, number: int = 1, before_round: Callable[[], Any] | None = None,
         per_round: bool = False) -> list[dict[str, Any]]:
    """Race named variants on one input: interleaved timing (`compare`) plus each one's error.

    The idiom of every chapter's table (notebook 01, "Attention variants", teaches it): each
    callable computes its variant's output from the same input; the last output of each is
    kept and compared with `reference`'s (default: the first variant).
    Returns:
        one row per variant, in order: name, median_s, iqr_s, max_abs_err, rel_err; with
        `per_round`, also times_s (one per round, in order: round r of every variant ran back to
        back; `before_round` runs before each round, as in `compare`).
    """
    reference = next(iter(fns)) if reference is None else reference
    if reference not in fns:
        raise ValueError(f"reference {reference!r} is not one of the variants {', '.join(fns)}")
    outs: dict[str, Any] = {}

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        return lambda: outs.__setitem__(name, fn())

    t = compare({n: keep(n, fn) for n, fn in fns.items()}, warmup=warmup, repeats=repeats, number=number,
                before_round=before_round)
    ref = _flat(outs[reference])
    return [{"name": n, "median_s": t[n].median_s, "iqr_s": t[n].iqr_s,
             **({"times_s": t[n].times_s} if per_round else {}), **output_error(_flat(outs[n]), ref)} for n in fns]


def encoder_decoder(model: torch.nn.Module, batch: int = 1, prompts: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Image encoder (a batch of images) against mask decoder (`prompts` points on one image),
    interleaved: the bench record of `edgelab bench encoder` (notebook 00, "Where a frame's time goes")."""
    size = model.image_encoder.img_size
    dev = next(model.parameters()).device
    x = torch.randn(batch, 3, size, size, device=dev)
    with torch.inference_mode():
        emb = model.image_encoder(x[:1])
        pts = torch.rand(prompts, 1, 2, device=dev) * size
        labels = torch.ones(prompts, 1, dtype=torch.int, device=dev)

        def decoder():
            sparse, dense = model.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
            model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)

        t = compare({"encoder": lambda: model.image_encoder(x), "decoder": decoder}, warmup=1, repeats=repeats)
    variants = [{"name": "encoder", "median_s": t["encoder"].median_s, "iqr_s": t["encoder"].iqr_s,
                 "params": count_params(model.image_encoder), "batch": batch, "image_size": size},
                {"name": "decoder", "median_s": t["decoder"].median_s, "iqr_s": t["decoder"].iqr_s,
                 "params": count_params(model.mask_decoder) + count_params(model.prompt_encoder)}]
    return bench_record("encoder", weights_label(model), variants)


def time_encoders(variants: Mapping[str, torch.nn.Module], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Image-encoder latency of several SAMs on one random image, interleaved in one run (`compare`)."""
    first = next(iter(variants.values()))
    size = first.image_encoder.img_size
    x = torch.randn(1, 3, size, size, device=first.device)
    with torch.inference_mode():
        fns = {name: (lambda m=m: m.image_encoder(x)) for name, m in variants.items()}
        return compare(fns, warmup=warmup, repeats=repeats)


# ---------------------------------------------------------------- memory

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


def encoder_macs(sam: torch.nn.Module) -> int:
    """MACs of one image through a SAM's image encoder at its own input size (`count_macs`): the
    MACs column of notebooks 02, 04 and 05 (`pruning.encoder_macs` adds other input sizes)."""
    size = sam.image_encoder.img_size
    return count_macs(sam.image_encoder, torch.zeros(1, 3, size, size, device=sam.device))


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
           "time_encoders", "cuda_peak_memory_mb", "minor_faults", "count_macs", "encoder_macs", "bench_record", "save_json", "as_table"]


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


