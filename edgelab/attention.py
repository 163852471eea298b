"""Attention in SAM's image encoder: where the time goes, faster exact variants, BF16, prompt batching.

Taught in notebook 01 (attention profiling). Its sections, and the functions here that serve them:
  - "Where the encoder's time goes":       `edgelab.profiling` (shared with chapter 05);
  - "Attention by hand" (exercises):       `naive_attention`, `decomposed_rel_pos_bias` (checks in `edgelab.checks`);
  - "Attention variants":                  `VARIANTS`, `set_attention`, `use_attention` (`bench.output_error`);
  - "Scaling with tokens":                 `global_block`, `block_peak_memory_mb`;
  - "BF16 on this CPU":                    `bf16_support`, `bf16_verdict` (`roofline.gemm_rate`, `models.BF16Encoder`);
  - "Prompt batching in the decoder":      `decode_loop`, `decode_batched`, `decode_ragged`;
  - "On a GPU":                            `sdpa_backend`.

SAM's `Attention` (segment_anything/modeling/image_encoder.py) computes, per head,
softmax((q * scale) @ k^T + B) @ v, where B is the decomposed relative-position bias of MViTv2:
B[(i, j), (k, l)] = q_(i,j) . Rh[i - k] + q_(i,j) . Rw[j - l]. It materialises the full
(batch * heads, N, N) score matrix, and a second one when it adds B. The variants compute the same
function without changing a weight, and can be swapped on a loaded model (`set_attention`).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder as sam_encoder
from torch.nn.attention import SDPBackend

from . import bench, cpu_kernel, memory, models, profiling, roofline

SamAttention = sam_encoder.Attention
_SAM_FORWARD = SamAttention.forward  # SAM's own code, kept to restore "reference"

# Largest score tile (MB) the fused variant builds at once: one query chunk x all keys x heads.
# (The environment variable reaches fresh processes too, e.g. the peak-memory children.)
FUSED_TILE_MB = float(os.environ.get("EDGELAB_FUSED_TILE_MB", 16))


# =============================================================== Attention by hand (exercises)

def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, written out (section "Attention by hand").

    Arguments:
        q, k, v: (..., N, d) queries, keys, values (v may have another last dim).
        scale: multiplies the scores, usually d ** -0.5.
        bias: optional (..., N, N) additive bias of the scores.
    Returns:
        (..., N, d_v) attention output.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def rel_pos_tables(attn: SamAttention, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's relative-position tables for an H x W grid: Rh (H, H, d) and Rw (W, W, d).

    Rh[i, k] is the embedding of the vertical offset i - k (SAM's `get_rel_pos`, which also
    interpolates the learned table when the grid differs from the one it was trained for).
    """
    h, w = hw
    return (sam_encoder.get_rel_pos(h, h, attn.rel_pos_h), sam_encoder.get_rel_pos(w, w, attn.rel_pos_w))


def rel_pos_terms(q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor,
                  hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two small factors of the decomposed bias (section "Attention by hand").

    Arguments:
        q: (..., H * W, d) unscaled queries.
        rh, rw: tables from `rel_pos_tables`.
        hw: the grid (H, W).
    Returns:
        rel_h (..., H * W, H) with rel_h[(i, j), k] = q_(i,j) . rh[i, k], and
        rel_w (..., H * W, W) with rel_w[(i, j), l] = q_(i,j) . rw[j, l].
    """
    h, w = hw
    lead, d = q.shape[:-2], q.shape[-1]
    r_q = q.reshape(-1, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).reshape(*lead, h * w, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).reshape(*lead, h * w, w)
    return rel_h, rel_w


def expand_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Materialise the (..., Nq, H * W) bias from its factors: B[q, (k, l)] = rel_h[q, k] + rel_w[q, l]."""
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*rel_h.shape[:-1], h * w)


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            hw: tuple[int, int]) -> torch.Tensor:
    """The full (B, N, N) decomposed relative-position bias SAM adds to its scores.

    Arguments:
        q: (B, H * W, d) unscaled queries (B = batch x heads).
        rel_pos_h, rel_pos_w: the module's learned tables, (2H - 1, d) and (2W - 1, d).
        hw: the grid (H, W).
    Returns:
        (B, H * W, H * W) bias, equal to what `add_decomposed_rel_pos` adds.
    """
    rh = sam_encoder.get_rel_pos(hw[0], hw[0], rel_pos_h)
    rw = sam_encoder.get_rel_pos(hw[1], hw[1], rel_pos_w)
    return expand_bias(*rel_pos_terms(q, rh, rw, hw))


# =============================================================== the variants

def _split_heads(attn: SamAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W, C) tokens -> q, k, v of shape (B, heads, H * W, d): SAM's qkv Linear, heads split."""
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _merge_heads(attn: SamAttention, out: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, heads, H * W, d) -> (B, H, W, C) and SAM's output projection."""
    b, heads, _, d = out.shape
    out = out.transpose(1, 2).reshape(b, hw[0], hw[1], heads * d)
    return attn.proj(out)


def _bias_factors(attn: SamAttention, q: torch.Tensor, hw: tuple[int, int]):
    """rel_h, rel_w for `q` (None, None when the module has no relative positions)."""
    if not attn.use_rel_pos:
        return None, None
    with profiling.scope("rel-pos bias"):
        return rel_pos_terms(q, *rel_pos_tables(attn, hw), hw)


def reference_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`reference`: SAM's own `Attention.forward`, unchanged."""
    return _SAM_FORWARD(attn, x)


def sdpa_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`sdpa`: one `F.scaled_dot_product_attention` call with the full bias as its float mask.

    The (B, heads, N, N) bias is still materialised, but the scores, their sum with the bias
    and the softmax no longer each get their own N x N tensor.
    """
    b, h, w, _ = x.shape
    q, k, v = _split_heads(attn, x)
    rel_h, rel_w = _bias_factors(attn, q, (h, w))
    mask = None
    if rel_h is not None:
        with profiling.scope("rel-pos bias"):
            mask = expand_bias(rel_h, rel_w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return _merge_heads(attn, out, (h, w))


def query_chunk(batch_heads: int, n_keys: int, n_queries: int, tile_mb: float | None = None) -> int:
    """How many queries of all `batch_heads` fit one fp32 score tile of `tile_mb` MB (>= 1, <= all)."""
    tile_mb = FUSED_TILE_MB if tile_mb is None else tile_mb
    return max(1, min(n_queries, int(tile_mb * 2**20) // (batch_heads * n_keys * 4)))


def fused_tiles(batch: int, heads: int, n: int, tile_mb: float | None = None) -> tuple[int, int]:
    """(heads per call, queries per call) so that one bias tile, batch x heads x queries x n fp32
    values, fits `tile_mb` MB (default FUSED_TILE_MB): one head at a time and as many queries as
    fit; several heads per call only once all n queries of one head fit. At least (1, 1)."""
    tile_mb = FUSED_TILE_MB if tile_mb is None else tile_mb
    budget = int(tile_mb * 2**20) // 4
    per_query = batch * n
    rows = max(1, min(n, budget // per_query))
    heads_per_call = max(1, min(heads, budget // (per_query * n))) if rows == n else 1
    return heads_per_call, rows


def fused_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`fused`: SDPA's fused kernel on tiles of (heads, queries), each with only its slice of the bias.

    The scores never exist beyond one tile of `FUSED_TILE_MB` MB, built into one reused buffer:
    peak memory grows linearly with the tokens instead of quadratically, and a tile that stays in
    the CPU's cache is cheap to write and to read back. Exact (no approximation): every query
    still sees every key and its bias.
    """
    b, h, w, _ = x.shape
    q, k, v = _split_heads(attn, x)
    rel_h, rel_w = _bias_factors(attn, q, (h, w))
    if rel_h is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return _merge_heads(attn, out, (h, w))
    n, heads = h * w, attn.num_heads
    hstep, qstep = fused_tiles(b, heads, n)
    out = torch.empty_like(q)
    tile = torch.empty(b * hstep * qstep * n, dtype=q.dtype, device=q.device)  # reused by every call
    for h0 in range(0, heads, hstep):
        hs = slice(h0, min(heads, h0 + hstep))
        nh = hs.stop - hs.start
        for s in range(0, n, qstep):
            rows = min(qstep, n - s)
            with profiling.scope("rel-pos bias"):
                mask = tile[:b * nh * rows * n].view(b, nh, rows, h, w)
                torch.add(rel_h[:, hs, s:s + rows, :, None], rel_w[:, hs, s:s + rows, None, :], out=mask)
            out[:, hs, s:s + rows] = F.scaled_dot_product_attention(
                q[:, hs, s:s + rows], k[:, hs], v[:, hs], attn_mask=mask.view(b, nh, rows, n), scale=attn.scale)
    return _merge_heads(attn, out, (h, w))


def _one_hot_keys(hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """(N, H + W): for key (k, l), a 1 in column k and a 1 in column H + l."""
    h, w = hw
    rows = torch.arange(h, device=like.device).repeat_interleave(w)
    cols = torch.arange(w, device=like.device).repeat(h)
    hot = torch.zeros(h * w, h + w, dtype=like.dtype, device=like.device)
    hot[torch.arange(h * w, device=like.device), rows] = 1
    hot[torch.arange(h * w, device=like.device), h + cols] = 1
    return hot


def folded_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`folded`: the bias folded into q and k, one SDPA call with no mask at all.

    q' = [q * scale, rel_h, rel_w] and k' = [k, onehot(row), onehot(col)], so that
    q' . k' = q . k * scale + rel_h[row] + rel_w[col]: the scores *with* their bias, and no
    (N, N) tensor anywhere. SDPA's fused kernels want v as wide as q', so v is zero-padded.
    The price: q', k' and v' are d + H + W wide instead of d.
    """
    b, h, w, _ = x.shape
    q, k, v = _split_heads(attn, x)
    rel_h, rel_w = _bias_factors(attn, q, (h, w))
    if rel_h is None:
        return _merge_heads(attn, F.scaled_dot_product_attention(q, k, v, scale=attn.scale), (h, w))
    d = q.shape[-1]
    with profiling.scope("rel-pos bias"):
        qf = torch.cat([q * attn.scale, rel_h, rel_w], dim=-1)
        hot = _one_hot_keys((h, w), k).expand(*k.shape[:2], -1, -1)
        kf = torch.cat([k, hot], dim=-1)
        vf = F.pad(v, (0, qf.shape[-1] - d))
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=1.0)[..., :d]
    return _merge_heads(attn, out, (h, w))


def tiled_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`tiled`: SAM's math by hand over query tiles (baddbmm, softmax, bmm), no fused kernel.

    The memory of `fused` with plain BLAS calls; it shows what the fused kernel adds beyond tiling.
    """
    b, h, w, _ = x.shape
    q, k, v = _split_heads(attn, x)
    heads, n, d = attn.num_heads, h * w, q.shape[-1]
    q, k, v = (t.reshape(b * heads, n, d) for t in (q, k, v))
    rel_h, rel_w = _bias_factors(attn, q, (h, w))
    qs, kt = q * attn.scale, k.transpose(1, 2)
    step = query_chunk(b * heads, n, n)
    out = torch.empty_like(q)
    for s in range(0, n, step):
        if rel_h is None:
            scores = torch.bmm(qs[:, s:s + step], kt)
        else:
            with profiling.scope("rel-pos bias"):
                bias = expand_bias(rel_h[:, s:s + step], rel_w[:, s:s + step])
            scores = torch.baddbmm(bias, qs[:, s:s + step], kt)
        torch.bmm(torch.softmax(scores, dim=-1), v, out=out[:, s:s + step])
    return _merge_heads(attn, out.reshape(b, heads, n, d), (h, w))


def kernel_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`kernel`: our own CPU kernel (`edgelab.cpu_kernel`), the bias added inside its key loop.

    Like `fused`, no N x N tensor beyond one block of queries; unlike it, no bias tile is written
    for the kernel to read back, and the kernel's plain path runs instead of its masked one.
    Compiled on first use (about 30 s); CPU only, fp32 only: in BF16 (autocast, or BF16 weights)
    it hands the block to `fused`, whose SDPA kernel takes BF16.
    """
    b, h, w, _ = x.shape
    if x.device.type != "cpu":
        raise RuntimeError(f"the `kernel` attention variant runs on the CPU only, not {x.device.type}: use `fused`")
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return fused_forward(attn, x)
    q, k, v = _split_heads(attn, x)
    if not attn.use_rel_pos:
        return _merge_heads(attn, F.scaled_dot_product_attention(q, k, v, scale=attn.scale), (h, w))
    with profiling.scope("rel-pos bias"):
        tables = rel_pos_tables(attn, (h, w))
    with profiling.scope("attention matmuls"):  # one call the profiler cannot see inside: softmax included
        out = cpu_kernel.biased_attention(q, k, v, *tables, attn.scale)  # (B, N, heads, d): heads merged
    return attn.proj(out.view(b, h, w, -1))


_COMPILED: dict[str, Callable] = {}


def compiled_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`compiled`: `torch.compile` of `fused_forward` (first calls compile: seconds to a minute)."""
    if "fused" not in _COMPILED:
        _COMPILED["fused"] = torch.compile(fused_forward, dynamic=False)
    return _COMPILED["fused"](attn, x)


VARIANTS: dict[str, Callable[[SamAttention, torch.Tensor], torch.Tensor]] = {
    "reference": reference_forward,
    "sdpa": sdpa_forward,
    "fused": fused_forward,
    "folded": folded_forward,
    "tiled": tiled_forward,
    "compiled": compiled_forward,
    "kernel": kernel_forward,
}
EXACT_VARIANTS = tuple(VARIANTS)  # all compute SAM's function in fp32; only rounding differs


def no_core_forward(attn: SamAttention, x: torch.Tensor) -> torch.Tensor:
    """`no-core` (timing only, NOT SAM's function): the attention core removed, v passed to proj.

    The qkv and output projections still run, so an encoder with this forward costs what an
    infinitely fast attention kernel would leave (section "The poster's results table"):
    reference time / no-core time is the largest speed-up *any* attention variant can reach
    in that run (Amdahl's law).
    """
    b, h, w, _ = x.shape
    _, _, v = _split_heads(attn, x)
    return _merge_heads(attn, v, (h, w))


TIMING_ONLY: dict[str, Callable[[SamAttention, torch.Tensor], torch.Tensor]] = {"no-core": no_core_forward}


def attention_modules(model: torch.nn.Module) -> list[SamAttention]:
    """Every SAM image-encoder `Attention` in `model` (a Sam, an encoder, a block, or one itself)."""
    return [m for m in model.modules() if isinstance(m, SamAttention)]


def set_attention(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Switch every image-encoder attention of `model` to variant `name`, in place; return model.

    No weight changes and nothing is reloaded: each module's `forward` is replaced (or, for
    "reference", SAM's own is restored). Section "Attention variants". `name` may also be a
    TIMING_ONLY forward ("no-core"), which does not compute SAM's function.
    """
    forwards = {**VARIANTS, **TIMING_ONLY}
    if name not in forwards:
        raise ValueError(f"unknown attention variant {name!r}: choose from {', '.join(forwards)}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError("no segment_anything image-encoder Attention module in this model")
    for m in mods:
        if name == "reference":
            m.__dict__.pop("forward", None)
        else:
            m.forward = types.MethodType(forwards[name], m)
        m._edgelab_attention = name
    return model


def attention_of(model: torch.nn.Module) -> str:
    """The variant `model`'s attention modules run ("mixed" if they differ)."""
    names = {getattr(m, "_edgelab_attention", "reference") for m in attention_modules(model)}
    return names.pop() if len(names) == 1 else "mixed"


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """`with use_attention(model, "fused"): ...` runs the block with that variant, then restores."""
    before = {m: getattr(m, "_edgelab_attention", "reference") for m in attention_modules(model)}
    set_attention(model, name)
    try:
        yield model
    finally:
        for m, old in before.items():
            set_attention(m, old)


def variants_for(device: str | torch.device = "cpu") -> list[str]:
    """The exact variants that run on `device`: all of `VARIANTS` on a CPU that builds the kernel;
    without `kernel` on a GPU or where it cannot be built (printing why; a build that failed is
    tried again on the next call)."""
    names = list(VARIANTS)
    if torch.device(device).type != "cpu":
        return [n for n in names if n != "kernel"]
    ok, why = cpu_kernel.available()
    if not ok:
        print(f"attention variant `kernel` left out: {why}")
        return [n for n in names if n != "kernel"]
    return names


def parse_variants(text: str | Sequence[str]) -> list[str]:
    """"reference,sdpa,fused" -> ["reference", "sdpa", "fused"]; raises ValueError on an unknown name."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not names:
        raise ValueError("no attention variant given")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown attention variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))





# =============================================================== scaling with tokens

def global_block(dim: int = 768, heads: int = 12, grid: int = 64, seed: int = 0,
                 batch: int = 1, device: str | torch.device = "cpu") -> tuple[SamAttention, torch.Tensor]:
    """One of SAM's global attention blocks on a grid x grid token map, and a random input.

    Defaults are vit_b's width and heads; grid = image side / 16 (64 at 1024 px). The
    relative-position tables are random (SAM zero-initialises them) so the bias is real.
    """
    torch.manual_seed(seed)
    attn = SamAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid)).eval()
    models.randomize_rel_pos(attn, seed=seed)
    return attn.to(device), torch.randn(batch, grid, grid, dim).to(device)


def block_peak_memory_mb(variants: Sequence[str], grid: int | Sequence[int], dim: int = 768,
                         heads: int = 12, timeout: float | None = 900,
                         device: str | torch.device = "cpu") -> dict:
    """Peak memory growth (MB) of one forward of a global block per variant.

    Section "Scaling with tokens". On the CPU: peak RSS, all in one fresh process
    (`memory.peak_memory_series`): the blocks and their inputs are built first (not counted);
    each forward is then measured from a fresh peak mark. On a GPU: the CUDA allocator's peak
    above what was allocated before the forward.
    Returns:
        {variant: MB} for one grid; {(grid, variant): MB} when `grid` is a list of grids.
    """

    grids = [grid] if isinstance(grid, int) else list(grid)
    if torch.device(device).type == "cuda":
        blocks = {g: global_block(dim, heads, g, device=device) for g in grids}
        mem = {f"{g}:{v}": bench.cuda_peak_memory_mb(lambda g=g, v=v: set_attention(blocks[g][0], v)(blocks[g][1]), device)
               for g in grids for v in variants}
        return ({v: mem[f"{grid}:{v}"] for v in variants} if isinstance(grid, int)
                else {(g, v): mem[f"{g}:{v}"] for g in grids for v in variants})
    calls = {f"{g}:{v}": {"grid": g, "variant": v} for g in sorted(grids) for v in variants}
    mem = memory.peak_memory_series("edgelab.attention:memory_block_forward", calls,
                                    "edgelab.attention:memory_blocks",
                                    {"grids": grids, "dim": dim, "heads": heads, "variants": list(variants)},
                                    timeout=timeout)
    if isinstance(grid, int):
        return {v: mem[f"{grid}:{v}"] for v in variants}
    return {(g, v): mem[f"{g}:{v}"] for g in grids for v in variants}


def memory_blocks(grids: Sequence[int], dim: int, heads: int, variants: Sequence[str]) -> dict:
    """Setup of `block_peak_memory_mb`'s child: a global block per grid (not counted), after one
    warm-up call per variant on a small block (one-time library set-up belongs to the setup)."""
    blk, x = global_block(dim, heads, 4)
    with torch.inference_mode():
        for v in variants:
            set_attention(blk, v)(x)
    return {g: global_block(dim, heads, g) for g in grids}


def memory_block_forward(blocks: dict, grid: int, variant: str) -> None:
    """One forward of the grid's block with `variant` (what `block_peak_memory_mb` measures)."""
    blk, x = blocks[grid]
    with torch.inference_mode():
        set_attention(blk, variant)(x)


def attention_study(model: torch.nn.Module, variants: Sequence[str], batch: int = 1, repeats: int = 5,
                    seed: int = 0, memory_setup: dict | None = None) -> dict:
    """`bench encoder --attention a,b,c`: the encoder with each attention variant, in one run
    (section "Attention variants"); a bench record.

    Times are interleaved (`encoder_race`), with the timing-only `no-core` encoder beside them:
    reference / no-core is the ceiling no attention variant can pass in this run. Errors are
    against the `reference` output on the same input. `kernel_ceiling` is PyTorch's fused kernel alone
    on the same attention shapes: how far any core built on it can go. With `memory_setup` (load_sam's name,
    checkpoint, weights, device and img_size, to rebuild the model in a child) peak memory is
    each variant's encoder forward in one fresh process; on a GPU the allocator's peak instead.
    `reference` is always measured, listed or not.
    """
    names = list(dict.fromkeys(["reference", *variants]))
    kind = models.weights_label(model)
    if kind == "random":  # SAM zero-initialises the tables: make the bias path count in the errors
        models.randomize_rel_pos(model, seed=seed)
    size = model.image_encoder.img_size
    dev = next(model.parameters()).device
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dev)
    gemm, read_gemm = gemm_reader()  # the limit, read before each round of the race
    # "no-core" runs interleaved too: the ceiling of this run (its error is meaningless, not reported)
    t = encoder_race(model, x, [*names, "no-core"], repeats=repeats, before_round=read_gemm)
    mem = {}
    if memory_setup is not None and x.is_cuda:
        mem = {n: bench.cuda_peak_memory_mb(lambda n=n: set_attention(model, n).image_encoder(x), x.device)
               for n in names}
    elif memory_setup is not None:
        setup = {**memory_setup, "img_size": size if kind == "random" else None,
                 "weights": kind if kind in ("random", "checkpoint") else None, "batch": batch, "seed": seed}
        mem = memory.peak_memory_series("edgelab.attention:memory_encoder_forward",
                                        {n: {"variant": n} for n in names},
                                        "edgelab.attention:memory_encoder", setup, timeout=3600)
    params = models.count_params(model.image_encoder)
    rows = [{"batch": batch, "image_size": size, "params": params, **{k: v for k, v in t[n].items() if k != "times_s"},
             **({"peak_mem_mb": mem[n]} if n in mem else {})} for n in names]
    record = bench.bench_record("reference", kind, rows)
    ref_s = t["reference"]["median_s"]
    record["attention"] = {"speedup_vs_reference": {n: ref_s / t[n]["median_s"] for n in names},
                           "no_core_s": t["no-core"]["median_s"], "times_s": {n: t[n]["times_s"] for n in [*names, "no-core"]},
                           "ceiling_vs_reference": ref_s / t["no-core"]["median_s"],
                           **core_against_the_limit(model, x, {n: t[n]["times_s"] for n in names},
                                                    t["no-core"]["times_s"], gemm)}
    limit = record["attention"]["fp32_gemm_gflops"]
    record["attention"]["kernel_ceiling"] = kernel_ceiling(model, x, limit, repeats=max(1, min(repeats, 3)), seed=seed)
    return record


def gemm_reader() -> tuple[list[float], Callable[[], None]]:
    """A list and a `before_round` hook that appends this machine's fp32 GEMM rate to it (GFLOP/s,
    the fastest of ten 1024^3 matmuls): the limit read once per round of a race, next to the
    encoders it judges (section "Against the machine's limit")."""
    reads: list[float] = []
    return reads, lambda: reads.append(roofline.gemm_rate("fp32")["rate"])


def paired_core(times_s: Sequence[float], no_core_s: Sequence[float], gemm: Sequence[float],
                flops: float) -> dict[str, float | None]:
    """A variant's attention core from one race, round by round (section "Against the machine's limit").

    In round r the GEMM rate was read, then every encoder ran back to back, so core[r] = times_s[r]
    - no_core_s[r] and its share flops / core[r] / gemm[r] each compare things measured within
    seconds of each other; the medians over rounds are reported. (A difference of two medians, each
    over minutes of a shared machine, once moved the share of one kernel from 65% to 120%.) A round
    whose core is at or under zero (too small to measure) counts as None.
    """
    if not (len(times_s) == len(no_core_s) == len(gemm)) or not times_s:
        raise ValueError(f"one time, no-core time and GEMM rate per round: got {len(times_s)}, "
                         f"{len(no_core_s)} and {len(gemm)}")
    cores = [t - n for t, n in zip(times_s, no_core_s)]
    rounds = [flops / c / 1e9 / g if c > 0 else None for c, g in zip(cores, gemm)]
    return {"core_s": statistics.median(cores),
            "core_of_gemm_rate": None if None in rounds else statistics.median(rounds), "rounds": rounds}


def core_against_the_limit(model: torch.nn.Module, x: torch.Tensor, times: Mapping[str, Sequence[float]],
                           no_core_s: Sequence[float], gemm: Sequence[float]) -> dict:
    """Each variant's attention core (its encoder time minus the no-core encoder's, paired round by
    round: `paired_core`) against the machine: the core's matmul FLOPs (torch.utils.flop_counter,
    SAM's own attention) at the fp32 GEMM rate read in the same round, and the share of the Amdahl
    ceiling reached (section "Attention variants"). `times`: each variant's per-round times from
    one `encoder_race` with `gemm_reader`'s hook; `gemm`: the rates it read."""
    with use_attention(model, "reference"):
        flops = profiling.flop_categories(model.image_encoder, x)["attention matmuls"]
    out = {"core_flops": flops, "fp32_gemm_gflops": statistics.median(gemm), "gemm_reads": list(gemm),
           "core_s": {}, "core_of_gemm_rate": {}, "core_share_rounds": {}, "of_ceiling": {}}
    for n, t in times.items():
        p = paired_core(t, no_core_s, gemm, flops)
        out["core_s"][n], out["core_of_gemm_rate"][n] = p["core_s"], p["core_of_gemm_rate"]
        out["core_share_rounds"][n] = p["rounds"]
    ref_core = out["core_s"].get("reference", 0.0)
    for n, core in out["core_s"].items():
        out["of_ceiling"][n] = (ref_core - core) / ref_core if ref_core > 0 else None
    return out


def attention_shapes(model: torch.nn.Module, x: torch.Tensor) -> dict[tuple[int, int, int, int], int]:
    """{(batch, heads, tokens, head width): calls} of one image-encoder forward on `x`, read on
    fake tensors (shapes only): a windowed block's batch is images x windows."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls: dict[tuple[int, int, int, int], int] = {}

    def note(mod, args):
        b, h, w, c = args[0].shape
        key = (int(b), mod.num_heads, int(h * w), int(c) // mod.num_heads)
        calls[key] = calls.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(note) for m in attention_modules(model)]
    try:
        with use_attention(model, "reference"), FakeTensorMode(allow_non_fake_inputs=True) as fake, \
                torch.no_grad():
            model.image_encoder(fake.from_tensor(x))
    finally:
        for h in hooks:
            h.remove()
    return calls


def kernel_ceiling(model: torch.nn.Module, x: torch.Tensor, gemm_gflops: float, repeats: int = 3,
                   seed: int = 0) -> dict:
    """What PyTorch's own fused CPU kernel reaches on this encoder's attention shapes, as a share of
    the fp32 GEMM rate (section "Against the machine's limit"): SDPA with no bias at all (the best
    any variant that calls it could do) and with a float bias shared by the heads, each shape
    timed alone, then weighted by the calls and FLOPs of one forward. The gap between a variant's
    core and `no_bias` is what the variant adds; the gap between `no_bias` and 100% is the kernel's.
    On a CPU that builds it, `kernel` is our kernel alone on the same shapes with SAM's bias (random
    tables): the core measured directly, beside the encoder difference of `paired_core`."""
    if gemm_gflops <= 0:
        raise ValueError(f"gemm_gflops must be positive, not {gemm_gflops}")
    gen = torch.Generator().manual_seed(seed)
    dev = x.device
    ours = dev.type == "cpu" and cpu_kernel.available()[0]
    names = ["no_bias", "bias", *(["kernel"] if ours else [])]
    shapes, total_flops, total_s = [], 0, dict.fromkeys(names, 0.0)
    for (b, heads, n, d), calls in attention_shapes(model, x).items():
        q, k, v = (torch.randn(b, heads, n, d, generator=gen).to(dev) for _ in range(3))
        bias = torch.randn(b, 1, n, n, generator=gen).to(dev)
        g = math.isqrt(n)  # SAM's grids are square
        tables = [torch.randn(g, g, d, generator=gen) * 0.1 for _ in range(2)]
        flops = 4 * b * heads * n * n * d  # q k^T and p v, one multiply-add = 2
        row = {"batch": b, "heads": heads, "tokens": n, "head_dim": d, "calls": calls, "flops": flops}
        fns = {"no_bias": lambda: F.scaled_dot_product_attention(q, k, v),
               "bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
               "kernel": lambda: cpu_kernel.biased_attention(q, k, v, *tables, d ** -0.5)}
        with torch.inference_mode():
            for name in names:
                s = bench.time_callable(fns[name], warmup=1, repeats=repeats).median_s
                row[name + "_s"] = s
                row[name] = flops / s / 1e9 / gemm_gflops
                total_s[name] += calls * s
        total_flops += calls * flops
        shapes.append(row)
        del q, k, v, bias
    return {"fp32_gemm_gflops": gemm_gflops, "shapes": shapes,
            **{name: total_flops / s / 1e9 / gemm_gflops for name, s in total_s.items()}}


def memory_encoder(name: str, checkpoint: str | None, weights: str | None, device: str,
                   img_size: int | None, batch: int, seed: int) -> tuple:
    """Setup of `bench encoder --attention`'s memory child: the benchmarked model and input."""
    import warnings
    warnings.simplefilter("ignore")
    model = models.load_sam(name, checkpoint=checkpoint, weights=weights, device=device, img_size=img_size)
    if weights == "random":
        models.randomize_rel_pos(model, seed=seed)
    size = model.image_encoder.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    return model, x


def memory_encoder_forward(state: tuple, variant: str) -> None:
    """One encoder forward with `variant` attention (what the memory child measures)."""
    model, x = state
    with torch.inference_mode():
        set_attention(model, variant).image_encoder(x)


def block_race(variants: Sequence[str], grid: int, dim: int = 768, heads: int = 12,
               repeats: int = 3, device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """One global block per variant, interleaved: median_s, iqr_s, the median number of minor
    page faults per call, and the error against the first variant's output (sections
    "Attention variants" and "Scaling with tokens")."""

    blk, x = global_block(dim, heads, grid, device=device)
    faults: dict[str, list[int]] = {v: [] for v in variants}

    def run(v):
        def fn():
            before = bench.minor_faults()
            out = set_attention(blk, v)(x)
            faults[v].append(bench.minor_faults() - before)
            return out
        return fn

    with torch.inference_mode():
        rows = bench.race({v: run(v) for v in variants}, variants[0], warmup=1, repeats=repeats)
    return {r["name"]: {**r, "page_faults": int(statistics.median(faults[r["name"]]))} for r in rows}


def encoder_race(model: torch.nn.Module, x: torch.Tensor, names: Sequence[str], repeats: int = 5,
                 warmup: int = 1, reference: str = "reference",
                 before_round: Callable[[], Any] | None = None) -> dict[str, dict[str, Any]]:
    """The image encoder with each attention variant on `x`, interleaved (`bench.race`):
    {name: median_s, iqr_s, times_s per round, max_abs_err, rel_err against `reference`} (section
    "Attention variants"). `before_round` runs untimed before each round (`gemm_reader`)."""
    def run(name):
        def fn():
            with use_attention(model, name):
                return model.image_encoder(x)
        return fn

    with torch.inference_mode():
        rows = bench.race({n: run(n) for n in names}, reference, warmup=warmup, repeats=repeats,
                          before_round=before_round, per_round=True)
    return {r["name"]: r for r in rows}


# =============================================================== BF16 on this CPU

def bf16_support() -> dict[str, object]:
    """Whether this CPU has BF16 instructions (section "BF16 on this CPU").

    avx512_bf16 (dot products of BF16 pairs into fp32) and AMX (tile matrix units) are the CPU
    flags; `onednn_bf16` is whether PyTorch's oneDNN build thinks BF16 kernels are worth using.
    Whether BF16 is *faster* is a separate question: `roofline.gemm_rate` measures it.
    """
    info = bench.machine_info()
    mkldnn_bf16 = None
    with contextlib.suppress(AttributeError, RuntimeError):
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = bool(info["amx"] or info["avx512_bf16"])
    return {"cpu": info["cpu"], "cpu_capability": info["cpu_capability"], "avx512_bf16": info["avx512_bf16"],
            "amx": info["amx"], "onednn_bf16": mkldnn_bf16, "native_bf16_instructions": native}


def bf16_verdict(support: Mapping[str, object], gemm_ratio: float, encoder_ratio: float,
                 rel_err: float) -> str:
    """What this machine's BF16 measurements say, in words (section "BF16 on this CPU").

    Arguments:
        support: `bf16_support()`.
        gemm_ratio: BF16 GEMM throughput over fp32 (`roofline.gemm_rate`), > 1 means BF16 is faster.
        encoder_ratio: fp32 encoder time over the BF16 encoder's, > 1 means BF16 is faster.
        rel_err: the BF16 encoder's relative output error against fp32.
    Returns:
        two or three sentences; they follow the numbers, so they differ from CPU to CPU.
    """
    units = " and ".join(n for n, k in (("avx512_bf16", "avx512_bf16"), ("AMX", "amx")) if support.get(k))
    if not support.get("native_bf16_instructions"):
        why = ("This CPU has no BF16 instructions: every BF16 product is widened to fp32 to be "
               f"computed, so BF16 cannot beat fp32 (GEMM {gemm_ratio:.2f}x fp32).")
    elif gemm_ratio < 1.1:
        why = (f"This CPU has {units}, yet a BF16 GEMM runs at {gemm_ratio:.2f}x fp32: the kernels PyTorch "
               "calls here do not turn those instructions into throughput (AMX is what pays on Intel), "
               "so BF16 is an instruction set without a speed-up on this machine.")
    else:
        why = (f"This CPU has {units} and the kernels use them: a BF16 GEMM runs at {gemm_ratio:.2f}x fp32.")
    if encoder_ratio >= 1.1:
        whole = f"The whole encoder gains {encoder_ratio:.2f}x"
    elif encoder_ratio > 0.95:
        whole = f"The whole encoder barely moves ({encoder_ratio:.2f}x)"
    else:
        whole = f"The whole encoder is slower ({encoder_ratio:.2f}x)"
    if gemm_ratio >= 1.1 and encoder_ratio < gemm_ratio / 1.5:
        whole += (", far less than the GEMM: casts, the fp32 norms and softmax and the attention "
                  "kernel take their share, as the poster found")
    return f"{why} {whole}; the price is a relative error of {rel_err:.0e} against about 1e-7 for the exact fp32 variants."


# =============================================================== prompt batching

def _decode(model, emb: torch.Tensor, pts: torch.Tensor, labels: torch.Tensor):
    sparse, dense = model.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
    return model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)


def decode_loop(model, emb: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder call per prompt (section "Prompt batching"). points: (N, 2) in input pixels.

    Returns low-res masks (N, 3, h, w) and predicted IoUs (N, 3).
    """
    outs = [_decode(model, emb, p.view(1, 1, 2), torch.ones(1, 1, dtype=torch.int, device=p.device))
            for p in points]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def decode_batched(model, emb: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All N prompts of one image in one decoder call (SAM repeats the embedding per prompt)."""
    labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
    return _decode(model, emb, points[:, None, :], labels)


def decode_ragged(model, embs: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of several images, a different number each, in one decoder pass.

    Arguments:
        embs: (I, C, h, w) image embeddings.
        points: a jagged nested tensor of I components, component i of shape (n_i, 2).
    Returns:
        masks (sum n_i, 3, h', w') and IoUs (sum n_i, 3), image 0's prompts first.

    SAM's `MaskDecoder.predict_masks` repeats one embedding per prompt; here each prompt is given
    its own image's embedding instead (`index_select` by the nested tensor's offsets), then the
    decoder's transformer and heads run once on the whole flat batch.
    """
    flat = points.values()
    counts = points.offsets().diff()
    image_of = torch.repeat_interleave(torch.arange(len(counts), device=flat.device), counts)
    labels = torch.ones(len(flat), 1, dtype=torch.int, device=flat.device)
    sparse, dense = model.prompt_encoder(points=(flat[:, None, :], labels), boxes=None, masks=None)
    return _predict_masks_per_prompt(model.mask_decoder, embs.index_select(0, image_of),
                                     model.prompt_encoder.get_dense_pe(), sparse, dense)


def decode_shared(model, emb: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_batched` without SAM's copy of the image embedding per prompt (the fast decoder
    path of chapter 05's "Segment everything"). In the decoder's first layer the image side is
    the same for every prompt, so one (1, C, h, w) embedding is broadcast against the prompts'
    tokens: its key, value and query projections run once instead of once per prompt. Only a
    point-only batch qualifies (no mask prompt: the dense embedding is the same for all)."""
    labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
    sparse, dense = model.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
    return _predict_masks_per_prompt(model.mask_decoder, emb, model.prompt_encoder.get_dense_pe(), sparse, dense[:1])


def _predict_masks_per_prompt(dec, src_emb, pos, sparse, dense):
    """SAM's `MaskDecoder.predict_masks` with a per-prompt embedding batch (no repeat_interleave),
    or one embedding (batch 1) broadcast against every prompt's tokens."""
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse], dim=1)
    src = src_emb + dense
    pos_src = pos.expand(src.shape[0], -1, -1, -1)
    b, (c, h, w) = tokens.shape[0], src.shape[1:]
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1:(1 + dec.num_mask_tokens), :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = dec.iou_prediction_head(iou_token_out)
    return masks[:, 1:], iou[:, 1:]  # SAM's multimask output: the three masks after the first


# =============================================================== on a GPU

def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 scale: float | None = None) -> str:
    """The SDPA kernel PyTorch picks for these inputs: FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH, ...

    Section "On a GPU". Asks the dispatcher (`torch._fused_sdp_choice`) what it would run.
    """
    choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False, scale=scale)
    return SDPBackend(choice).name


def block_qkv(attn: SamAttention, x: torch.Tensor, variant: str):
    """q, k, v and mask exactly as `variant` hands them to SDPA (for `sdpa_backend`)."""
    b, h, w, _ = x.shape
    q, k, v = _split_heads(attn, x)
    rel_h, rel_w = _bias_factors(attn, q, (h, w))
    if variant == "folded":
        qf = torch.cat([q * attn.scale, rel_h, rel_w], -1)
        kf = torch.cat([k, _one_hot_keys((h, w), k).expand(*k.shape[:2], -1, -1)], -1)
        return qf, kf, F.pad(v, (0, qf.shape[-1] - v.shape[-1])), None, 1.0
    hstep, qstep = fused_tiles(b, attn.num_heads, h * w) if variant == "fused" else (attn.num_heads, h * w)
    mask = expand_bias(rel_h[:, :hstep, :qstep], rel_w[:, :hstep, :qstep])
    return q[:, :hstep, :qstep], k[:, :hstep], v[:, :hstep], mask, attn.scale


__all__ = ["VARIANTS", "EXACT_VARIANTS", "variants_for", "kernel_forward", "gemm_reader", "paired_core", "attention_shapes", "kernel_ceiling", "FUSED_TILE_MB", "fused_tiles", "query_chunk", "naive_attention",
           "decomposed_rel_pos_bias", "set_attention",
           "use_attention", "attention_of", "attention_modules", "parse_variants", 
           
           "global_block", "block_peak_memory_mb", "block_race", "encoder_race", "attention_study", "bf16_support", "decode_loop",
           "decode_batched", "decode_shared", "decode_ragged", "sdpa_backend", "block_qkv"]
