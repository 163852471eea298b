"""A CPU kernel of our own for SAM's attention with its relative-position bias (notebook 01,
section "Attention variants").

PyTorch's fused CPU attention (`F.scaled_dot_product_attention`) takes SAM's decomposed bias only as
a full float mask: the `fused` variant builds it tile by tile, and the kernel's masked path is slower
than its plain one. `csrc/biased_attention.cpp` adds the two bias factors inside the kernel instead,
with FlashAttention's online softmax across blocks of keys. Two paths, one result:
  - AVX-512 (head dims that are multiples of 16): a register micro-kernel. Six queries at a time,
    the scores of a tile of 32 keys live in 12 vector registers while the 64 multiply-adds run, get
    their bias, and go to a strip buffer that never leaves L1; exp (base 2), sums, and then the six
    output rows, held in 24 registers, gather P v. The keys are packed once per head; no BLAS call.
  - elsewhere (AVX2-only CPUs, other head dims): per block of queries and keys, one sgemm for the
    scores, one pass over them (bias, max, exp, sum) while they sit in L2, one sgemm for P v.
It is compiled on first use by `torch.utils.cpp_extension` (a C++ compiler and ninja; about 30 s on
2 cores), for this CPU (`-march=native`, which picks the path), and cached by PyTorch
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""
from __future__ import annotations

import functools
import os
import shutil
import types
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "biased_attention.cpp"
BLOCK = 96  # queries per task: whole strips of 3, 4, 6 or 8 queries (the micro-kernel's)
KV_BLOCK = 512  # keys per online-softmax step (BLAS path: 96 x 512 x 4 bytes = 192 KB of scores, in L2)


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built here (no compiler, no ninja, a failed build)."""


def _ninja_on_path() -> None:
    """torch's builder runs `ninja`: the `ninja` wheel's copy when none is on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def load() -> types.ModuleType:
    """Build (first call on this machine) or load the kernel; KernelUnavailable with one line on failure."""
    from torch.utils import cpp_extension

    if not SOURCE.is_file():
        raise KernelUnavailable(f"the kernel's source {SOURCE} is missing: reinstall edgelab")
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise KernelUnavailable(f"no C++ compiler ({compiler}) on PATH: install g++ to build the `kernel` variant")
    _ninja_on_path()
    name = f"edgelab_biased_attention_{torch.backends.cpu.get_cpu_capability().lower()}"
    try:
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a build error is many lines: keep its last one
        last = next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
        raise KernelUnavailable(f"building the attention kernel failed: {last}") from e


def available() -> tuple[bool, str]:
    """(True, "") when the kernel builds and loads here, else (False, why)."""
    try:
        load()
    except KernelUnavailable as e:
        return False, str(e)
    return True, ""


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh_table: torch.Tensor,
                     rw_table: torch.Tensor, scale: float, block: int | None = None,
                     kv_block: int = KV_BLOCK) -> torch.Tensor:
    """softmax(q kᵀ·scale + B) v with SAM's decomposed bias B, for fp32 CPU tensors.

    q, k, v: (B, heads, N, d), any strides with d contiguous (views of SAM's qkv output are read
    in place); rh_table (H, H, d) and rw_table (W, W, d): SAM's relative-position tables for an
    H x W grid of N tokens (`attention.rel_pos_tables`); the kernel forms rel_h and rel_w itself.
    Returns (B, N, heads, d): heads merged, ready for SAM's output projection. `block`: queries
    per task (default: all N of a window up to 256 tokens, else `BLOCK`); `kv_block`: keys per
    step of the online softmax (rounded to whole grid rows).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be (batch, heads, N, d) of one shape, not {tuple(q.shape)}")
    n = q.shape[-2]
    if rh_table.dim() != 3 or rw_table.dim() != 3 or rh_table.shape[0] * rw_table.shape[0] != n:
        raise ValueError(f"tables {tuple(rh_table.shape)} and {tuple(rw_table.shape)} do not cover {n} tokens")
    block = (n if n <= 256 else BLOCK) if block is None else block
    if block < 1 or kv_block < 1:
        raise ValueError(f"block and kv_block must be 1 or more, not {block} and {kv_block}")
    return load().biased_attention(q, k, v, rh_table, rw_table, float(scale), int(block), int(kv_block))


__all__ = ["BLOCK", "KV_BLOCK", "SOURCE", "KernelUnavailable", "load", "available", "biased_attention"]
