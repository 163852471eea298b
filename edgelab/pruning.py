"""Frobenius-norm channel pruning: by hand on one layer, then SAM's image encoder with torch-pruning.

Taught in notebook 02 (channel pruning). The rule comes from the course report in the source
documents: rank a layer's output channels by the Frobenius norm of their filters, remove the
lowest fraction, and fine-tune. Sections of the notebook and the functions that go with them:
  - "Channels by hand": frobenius_norms, rank_channels, n_kept, keep_indices, prune_linear_pair,
    prune_conv_pair;
  - "Fine-grained pruning, for contrast": magnitude_sparsify, sparsified_copy;
  - "The same ranking in torch-pruning": torch_pruning_importance;
  - "Pruning SAM's encoder": PrunePlan, prune_encoder (torch-pruning for MLP / embedding / neck
    channels, SAM's attention heads and head channels by hand), architecture, save_pruned,
    load_pruned;
  - "Sensitivity scan": sensitivity_scan, plan_from_scan;
  - "20 / 40 / 60% and fine-tuning": finetune, encoder_macs.
Counting rule, the same everywhere: a layer of n channels pruned at ratio r keeps
int(n * (1 - r)) of them (at least one), the ones with the largest norms; in SAM's encoder the
widths of MLPs, embedding and neck are then rounded down to a multiple of 8 (PrunePlan.round_to).
"""
from __future__ import annotations

import copy
import math
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from tqdm.auto import tqdm

from . import bench, models

KINDS = ("mlp", "heads", "head_dim", "embed", "neck")
DEFAULT_KINDS = ("mlp", "head_dim", "embed", "neck")  # every layer loses the same fraction of channels
PRUNED_FORMAT = "edgelab-pruned-sam/1"


# ---------------------------------------------------------------- channels by hand

def frobenius_norms(weight: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each output channel's filter: weight[c] flattened, sqrt of sum of squares.

    Works for a Linear weight (out, in) and a conv weight (out, in, kh, kw) alike. Notebook 02,
    "Channels by hand".
    """
    return weight.detach().flatten(1).norm(dim=1)


def rank_channels(weight: torch.Tensor) -> torch.Tensor:
    """Output channels in ascending order of their Frobenius norm (least important first)."""
    return torch.argsort(frobenius_norms(weight), stable=True)


def n_kept(n: int, ratio: float, round_to: int = 1) -> int:
    """How many of `n` channels survive pruning at `ratio`: int(n * (1 - ratio)), at least one.

    With round_to > 1 (and ratio > 0) the count is rounded down to a multiple of round_to, as
    torch-pruning's `round_to` does: widths that fill whole vector registers run faster.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a pruning ratio must be in [0, 1), not {ratio}")
    k = int(n * (1.0 - ratio))
    if ratio > 0 and round_to > 1 and k >= round_to:
        k -= k % round_to
    return max(1, k)


def keep_indices(weight: torch.Tensor, ratio: float, round_to: int = 1) -> torch.Tensor:
    """Sorted indices of the output channels kept at `ratio`: all but the lowest-norm ones."""
    order = rank_channels(weight)
    n = weight.shape[0]
    return torch.sort(order[n - n_kept(n, ratio, round_to):]).values


def _sliced_linear(layer: nn.Linear, out_idx: torch.Tensor | None = None,
                   in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the rows `out_idx` and columns `in_idx` of `layer` (None: all)."""
    w = layer.weight.detach()
    w = w if out_idx is None else w[out_idx]
    w = w if in_idx is None else w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if out_idx is None else layer.bias.detach()[out_idx])
    return new


def prune_linear_pair(first: nn.Linear, second: nn.Linear,
                      keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """Keep output channels `keep` of `first` and the matching input columns of `second`.

    Returns two new, smaller layers; the originals are untouched. Notebook 02, "Channels by hand".
    """
    return _sliced_linear(first, out_idx=keep), _sliced_linear(second, in_idx=keep)


def prune_conv_pair(first: nn.Conv2d, second: nn.Conv2d,
                    keep: torch.Tensor) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Keep filters `keep` of conv `first` and the matching input channels of conv `second`.

    Both convs must be ungrouped (groups=1). Returns two new, smaller convs.
    """
    if first.groups != 1 or second.groups != 1:
        raise ValueError("prune_conv_pair handles ordinary convs (groups=1) only")

    def conv_like(c: nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None) -> nn.Conv2d:
        new = nn.Conv2d(w.shape[1], w.shape[0], c.kernel_size, c.stride, c.padding, c.dilation,
                        bias=b is not None, padding_mode=c.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        return new

    b1 = None if first.bias is None else first.bias.detach()[keep]
    b2 = None if second.bias is None else second.bias.detach()
    return (conv_like(first, first.weight.detach()[keep], b1),
            conv_like(second, second.weight.detach()[:, keep], b2))


# ---------------------------------------------------------------- fine-grained, for contrast

def magnitude_sparsify(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of `weight` with its smallest-|w| fraction `sparsity` of entries set to zero.

    Fine-grained (unstructured) pruning: same shape, same dense kernel, so no speed-up by itself.
    Notebook 02, "Fine-grained pruning, for contrast".
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), not {sparsity}")
    w = weight.detach()
    k = int(w.numel() * sparsity)
    if k == 0:
        return w.clone()
    threshold = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


SPARSIFY_LAYERS = {"mlp": ("lin1", "lin2"), "attn": ("qkv", "proj")}  # per block: the weights each kind zeroes


def sparsified_copy(sam: Sam, sparsity: float, kinds: Iterable[str] = ("mlp",)) -> Sam:
    """A deep copy of `sam` with fine-grained pruning in its image encoder (the original is untouched).

    In every block, each weight matrix of the selected kinds ("mlp": lin1 and lin2; "attn": qkv
    and proj) has its smallest-|w| fraction `sparsity` of entries zeroed, layer by layer
    (magnitude_sparsify). Shapes, biases and all other layers stay. Notebook 02,
    "Fine-grained pruning, for contrast": the accuracy side of zeroing weights vs removing channels.
    """
    kinds = tuple(kinds)
    unknown = set(kinds) - set(SPARSIFY_LAYERS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}: choose from {', '.join(SPARSIFY_LAYERS)}")
    out = copy.deepcopy(sam)
    with torch.no_grad():
        for block in out.image_encoder.blocks:
            for kind in kinds:
                module = block.mlp if kind == "mlp" else block.attn
                for name in SPARSIFY_LAYERS[kind]:
                    layer = getattr(module, name)
                    layer.weight.copy_(magnitude_sparsify(layer.weight, sparsity))
    return out.eval()


# ---------------------------------------------------------------- torch-pruning's ranking

def importance() -> tp.importance.MagnitudeImportance:
    """torch-pruning's L2 magnitude importance, set to the report's rule.

    p=2 scores a channel by the sum of squares of its filter (the squared Frobenius norm, same
    order); group_reduction="first" scores a group by the layer that produces the channels only;
    no normalisation. Notebook 02, "The same ranking in torch-pruning".
    """
    return tp.importance.MagnitudeImportance(p=2, group_reduction="first", normalizer=None)


def torch_pruning_importance(model: nn.Module, layer: nn.Module, example_inputs: torch.Tensor) -> torch.Tensor:
    """torch-pruning's importance of each output channel of `layer` inside `model`."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    n = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    group = dg.get_pruning_group(layer, fn, idxs=list(range(n)))
    return importance()(group)


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PrunePlan:
    """What to remove from SAM's image encoder, as fractions (0 = keep all).

    mlp, heads, head_dim: one ratio per block (MLP hidden channels; whole attention heads; the
    channels of every head, the same ones in each head). embed: the embedding width (the residual
    stream through every block, the patch embedding, position embedding and the neck's input).
    neck: the middle channels of the neck (its output feeds the decoder and is never pruned).
    round_to: the kept widths of MLPs, embedding and neck are rounded down to a multiple of it,
    the kept channels per head to a multiple of round_to // 2 (whole heads are not rounded).
    """

    mlp: tuple[float, ...]
    heads: tuple[float, ...]
    head_dim: tuple[float, ...]
    embed: float = 0.0
    neck: float = 0.0
    round_to: int = 8

    @classmethod
    def uniform(cls, ratio: float, depth: int, kinds: Iterable[str] = DEFAULT_KINDS,
                round_to: int = 8) -> PrunePlan:
        """The same ratio for every selected kind in every block."""
        kinds = set(kinds)
        unknown = kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown pruning kinds {sorted(unknown)}: choose from {', '.join(KINDS)}")
        n_kept(2, ratio)  # validates the ratio
        per_block = lambda k: tuple([ratio if k in kinds else 0.0] * depth)  # noqa: E731
        return cls(per_block("mlp"), per_block("heads"), per_block("head_dim"),
                   ratio if "embed" in kinds else 0.0, ratio if "neck" in kinds else 0.0, round_to)

    @classmethod
    def none(cls, depth: int, round_to: int = 8) -> PrunePlan:
        return cls.uniform(0.0, depth, (), round_to)

    def with_block(self, block: int, kind: str, ratio: float) -> PrunePlan:
        """A copy with one block's `kind` ratio set (kind: mlp, heads or head_dim)."""
        if kind not in ("mlp", "heads", "head_dim"):
            raise ValueError(f"per-block kinds are mlp, heads and head_dim, not {kind!r}")
        values = list(getattr(self, kind))
        values[block] = ratio
        return replace(self, **{kind: tuple(values)})

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- SAM's attention, by hand

def head_norms(attn: Attention) -> torch.Tensor:
    """Frobenius norm of each head's filters: its rows of q, k and v in the fused qkv layer."""
    w = attn.qkv.weight.detach()  # (3 * heads * head_dim, dim), rows ordered (q|k|v, head, channel)
    return w.view(3, attn.num_heads, -1, w.shape[1]).permute(1, 0, 2, 3).flatten(1).norm(dim=1)


def head_dim_norms(attn: Attention) -> torch.Tensor:
    """Frobenius norm of each within-head channel across all heads and q, k, v (and rel-pos)."""
    heads = attn.num_heads
    w = attn.qkv.weight.detach()
    hd = w.shape[0] // (3 * heads)
    sq = w.view(3, heads, hd, -1).pow(2).sum(dim=(0, 1, 3))
    if attn.use_rel_pos:
        sq = sq + attn.rel_pos_h.detach().pow(2).sum(0) + attn.rel_pos_w.detach().pow(2).sum(0)
    return sq.sqrt()


def _qkv_rows(heads: int, head_dim: int, keep_heads: torch.Tensor, keep_dims: torch.Tensor) -> torch.Tensor:
    """Row indices of the fused qkv weight for the kept heads and kept channels of each head."""
    grid = torch.arange(3 * heads * head_dim).view(3, heads, head_dim)
    return grid[:, keep_heads][:, :, keep_dims].flatten()


def _slice_attention(attn: Attention, keep_heads: torch.Tensor, keep_dims: torch.Tensor) -> None:
    """Shrink `attn` in place to the given heads and per-head channels (qkv rows, proj columns, rel-pos)."""
    heads = attn.num_heads
    hd = attn.qkv.out_features // (3 * heads)
    rows = _qkv_rows(heads, hd, keep_heads, keep_dims)
    cols = torch.arange(heads * hd).view(heads, hd)[keep_heads][:, keep_dims].flatten()
    attn.qkv = _sliced_linear(attn.qkv, out_idx=rows)
    attn.proj = _sliced_linear(attn.proj, in_idx=cols)
    attn.num_heads = len(keep_heads)
    if attn.use_rel_pos and len(keep_dims) != hd:
        attn.rel_pos_h = nn.Parameter(attn.rel_pos_h.detach()[:, keep_dims].clone())
        attn.rel_pos_w = nn.Parameter(attn.rel_pos_w.detach()[:, keep_dims].clone())
    # attn.scale stays 1/sqrt(original head_dim): the weights were trained with it.


def prune_heads(attn: Attention, ratio: float) -> torch.Tensor:
    """Remove the lowest-norm whole heads of `attn` in place; return the kept head indices.

    Heads keep their width, so SAM's relative-position tables (shared by all heads) are unchanged.
    """
    keep = torch.sort(torch.argsort(head_norms(attn), stable=True)[attn.num_heads - n_kept(attn.num_heads, ratio):]).values
    hd = attn.qkv.out_features // (3 * attn.num_heads)
    _slice_attention(attn, keep, torch.arange(hd))
    return keep


def prune_head_dims(attn: Attention, ratio: float, round_to: int = 1) -> torch.Tensor:
    """Remove the same lowest-norm channels from every head of `attn` in place; return the kept ones.

    q and k must keep the same channels (their dot product pairs them), and SAM's relative-position
    tables (2*size-1, head_dim) multiply q channel by channel and are shared by all heads: so one
    set of channels is chosen for all heads, and the tables lose the same columns.
    """
    norms = head_dim_norms(attn)
    hd = len(norms)
    keep = torch.sort(torch.argsort(norms, stable=True)[hd - n_kept(hd, ratio, round_to):]).values
    _slice_attention(attn, torch.arange(attn.num_heads), keep)
    return keep


# ---------------------------------------------------------------- torch-pruning for the rest

class SamAttentionPruner(tp.pruner.function.BasePruningFunc):
    """Tells torch-pruning how SAM's Attention changes width: input = qkv columns, output = proj rows.

    torch-pruning's tracer cannot follow SAM's attention (fused qkv reshaped per head, windows,
    decomposed relative positions), so the module is traced as one opaque layer and its heads are
    pruned by `prune_heads` / `prune_head_dims`.
    """

    TARGET_MODULES = (Attention,)

    def prune_out_channels(self, layer: Attention, idxs: Sequence[int]) -> Attention:
        keep = torch.tensor(sorted(set(range(layer.proj.out_features)) - set(idxs)))
        layer.proj = _sliced_linear(layer.proj, out_idx=keep)
        return layer

    def prune_in_channels(self, layer: Attention, idxs: Sequence[int]) -> Attention:
        keep = torch.tensor(sorted(set(range(layer.qkv.in_features)) - set(idxs)))
        layer.qkv = _sliced_linear(layer.qkv, in_idx=keep)
        return layer

    def get_out_channels(self, layer: Attention) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: Attention) -> int:
        return layer.qkv.in_features


class _Opaque(torch.autograd.Function):
    """Runs a module's real forward but shows autograd (and so torch-pruning) one node: input -> output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - tracing never calls backward
        return grad, None


def dependency_graph(encoder: ImageEncoderViT, example: torch.Tensor | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of SAM's image encoder, attention traced as opaque layers."""
    if example is None:
        size = encoder.img_size
        example = torch.zeros(1, 3, size, size, device=encoder.pos_embed.device)
    attns = [b.attn for b in encoder.blocks]
    for attn in attns:
        real = attn.forward
        attn.forward = types.MethodType(lambda self, x, real=real: _Opaque.apply(x, real), attn)
    unwrapped = [(encoder.pos_embed, 3)] + [(p, 0) for m in encoder.neck if isinstance(m, LayerNorm2d)
                                            for p in (m.weight, m.bias)]
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                encoder, example_inputs=example, unwrapped_parameters=unwrapped,
                customized_pruners={Attention: SamAttentionPruner()})
    finally:
        for attn in attns:
            del attn.forward


def coupled_layers(dg: tp.DependencyGraph, layer: nn.Module, fn: Callable) -> list[str]:
    """Names of the layers and parameters torch-pruning couples to `layer`'s channels ("name (in|out)").

    Notebook 02, "Pruning SAM's encoder": what one pruning decision has to change.
    """
    n = dg.get_out_channels(layer)
    names = {id(obj): name for name, obj in [*dg.model.named_modules(), *dg.model.named_parameters()]}
    out = []
    for dep, _ in dg.get_pruning_group(layer, fn, idxs=list(range(n))):
        node = dep.target
        if isinstance(node.module, (nn.Module, nn.Parameter)) and not type(node.module).__module__.startswith("torch_pruning"):
            side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            out.append(f"{names.get(id(node.module), '?')} ({side})")
    natural = lambda s: [int(t) if t.isdigit() else t for t in s.replace(".", " ").split()]  # noqa: E731
    return sorted(set(out), key=natural)


def _prune_group(dg: tp.DependencyGraph, layer: nn.Module, fn: Callable, n: int, ratio: float,
                 round_to: int) -> torch.Tensor:
    """Prune the group rooted at `layer`'s output channels by torch-pruning's importance; return kept."""
    group = dg.get_pruning_group(layer, fn, idxs=list(range(n)))
    scores = importance()(group)
    order = torch.argsort(scores, stable=True)
    k = n_kept(n, ratio, round_to)
    if k < n:
        dg.get_pruning_group(layer, fn, idxs=sorted(order[: n - k].tolist())).prune()
    return torch.sort(order[n - k:]).values


def prune_encoder(sam: Sam, plan: PrunePlan) -> dict:
    """Prune SAM's image encoder in place according to `plan`; return the kept indices.

    Heads and head channels are cut by hand (`prune_heads`, `prune_head_dims`); MLP hidden
    channels, the embedding width and the neck's middle channels by torch-pruning's dependency
    graph, which finds every layer and parameter coupled to a channel. The prompt encoder and the
    mask decoder are never touched: the neck still outputs `prompt_dim` channels.
    Notebook 02, "Pruning SAM's encoder".
    """
    enc = sam.image_encoder
    depth = len(enc.blocks)
    for name in ("mlp", "heads", "head_dim"):
        if len(getattr(plan, name)) != depth:
            raise ValueError(f"plan.{name} has {len(getattr(plan, name))} ratios for {depth} blocks")
    kept: dict = {"heads": {}, "head_dim": {}, "mlp": {}}
    for i, block in enumerate(enc.blocks):
        if plan.heads[i] > 0:
            kept["heads"][i] = prune_heads(block.attn, plan.heads[i])
        if plan.head_dim[i] > 0:
            kept["head_dim"][i] = prune_head_dims(block.attn, plan.head_dim[i], max(1, plan.round_to // 2))
    if any(r > 0 for r in plan.mlp) or plan.embed > 0 or plan.neck > 0:
        dg = dependency_graph(enc)
        for i, block in enumerate(enc.blocks):
            if plan.mlp[i] > 0:
                lin1 = block.mlp.lin1
                kept["mlp"][i] = _prune_group(dg, lin1, tp.prune_linear_out_channels, lin1.out_features,
                                              plan.mlp[i], plan.round_to)
        if plan.neck > 0:
            conv = enc.neck[0]
            kept["neck"] = _prune_group(dg, conv, tp.prune_conv_out_channels, conv.out_channels, plan.neck, plan.round_to)
        if plan.embed > 0:
            conv = enc.patch_embed.proj
            kept["embed"] = _prune_group(dg, conv, tp.prune_conv_out_channels, conv.out_channels, plan.embed, plan.round_to)
    return kept


def pruned_copy(sam: Sam, plan: PrunePlan) -> Sam:
    """A deep copy of `sam` pruned by `plan` (the original is untouched)."""
    out = copy.deepcopy(sam)
    prune_encoder(out, plan)
    return out.eval()


# ---------------------------------------------------------------- the architecture, saved and rebuilt

def architecture(sam: Sam) -> dict:
    """The numbers that fix a (pruned) encoder's shapes: widths per block, scale, neck.

    Together with the base model's name and input size this is all `load_pruned` needs.
    """
    enc = sam.image_encoder
    blocks = []
    for b in enc.blocks:
        heads = b.attn.num_heads
        blocks.append({"heads": heads, "head_dim": b.attn.qkv.out_features // (3 * heads),
                       "mlp": b.mlp.lin1.out_features, "scale": float(b.attn.scale)})
    return {"embed": enc.patch_embed.proj.out_channels, "neck": enc.neck[0].out_channels,
            "blocks": blocks}


def _resize_encoder(enc: ImageEncoderViT, arch: dict) -> None:
    """Replace the encoder's layers by empty ones of the shapes in `arch` (weights loaded later)."""
    d, dev = arch["embed"], enc.pos_embed.device
    p = enc.patch_embed.proj
    enc.patch_embed.proj = nn.Conv2d(p.in_channels, d, p.kernel_size, p.stride, p.padding, device=dev)
    enc.pos_embed = nn.Parameter(torch.zeros(*enc.pos_embed.shape[:3], d, device=dev))
    for b, spec in zip(enc.blocks, arch["blocks"]):
        inner = spec["heads"] * spec["head_dim"]
        b.norm1 = nn.LayerNorm(d, eps=b.norm1.eps, device=dev)
        b.norm2 = nn.LayerNorm(d, eps=b.norm2.eps, device=dev)
        b.attn.qkv = nn.Linear(d, 3 * inner, bias=b.attn.qkv.bias is not None, device=dev)
        b.attn.proj = nn.Linear(inner, d, device=dev)
        b.attn.num_heads, b.attn.scale = spec["heads"], spec["scale"]
        if b.attn.use_rel_pos:
            b.attn.rel_pos_h = nn.Parameter(torch.zeros(b.attn.rel_pos_h.shape[0], spec["head_dim"], device=dev))
            b.attn.rel_pos_w = nn.Parameter(torch.zeros(b.attn.rel_pos_w.shape[0], spec["head_dim"], device=dev))
        b.mlp.lin1 = nn.Linear(d, spec["mlp"], device=dev)
        b.mlp.lin2 = nn.Linear(spec["mlp"], d, device=dev)
    mid, out = arch["neck"], enc.neck[2].out_channels
    enc.neck[0] = nn.Conv2d(d, mid, 1, bias=False, device=dev)
    enc.neck[1] = LayerNorm2d(mid).to(dev)
    enc.neck[2] = nn.Conv2d(mid, out, 3, padding=1, bias=False, device=dev)


def build_pruned(name: str, arch: dict, img_size: int | None = None, device: str | torch.device = "cpu") -> Sam:
    """SAM `name` with its encoder reshaped to `arch` (random values; use on 'meta' to count MACs)."""
    cfg = models.CONFIGS[name]
    if img_size is not None:
        cfg = replace(cfg, img_size=img_size)
    with torch.device(device):
        sam = models.build_sam(cfg)
        _resize_encoder(sam.image_encoder, arch)
    return sam.eval()


def save_pruned(sam: Sam, path: str | Path, name: str | None = None) -> Path:
    """Save a pruned SAM: its state dict plus the architecture needed to rebuild it.

    A plain state dict would not load into `load_sam`'s model (the shapes changed), so the file
    holds {"format", "model" (the base name), "img_size", "architecture", "state_dict"}: only
    tensors, strings and numbers, readable with torch.load(weights_only=True).
    Notebook 02, "Save and reload a pruned model".
    """
    info = getattr(sam, "edgelab", None)
    name = name or (info.name if info else None)
    if name not in models.CONFIGS:
        raise ValueError("save_pruned needs the base model's name (tiny, vit_b, ...)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": PRUNED_FORMAT, "model": name, "img_size": int(sam.image_encoder.img_size),
                "architecture": architecture(sam),
                "state_dict": {k: v.detach().cpu() for k, v in sam.state_dict().items()}}, path)
    return path


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> Sam:
    """Rebuild a SAM saved by `save_pruned` (torch.load with weights_only=True) and load its weights."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != PRUNED_FORMAT:
        raise models.CheckpointError(f"{path} is not a pruned SAM saved by edgelab.pruning.save_pruned")
    base = models.CONFIGS[blob["model"]]
    sam = build_pruned(blob["model"], blob["architecture"],
                       img_size=None if blob["img_size"] == base.img_size else blob["img_size"])
    sam.load_state_dict(blob["state_dict"])
    sam.edgelab = models.LoadedSam(blob["model"], "checkpoint", f"pruned: {path}")
    return sam.to(device).eval()


# ---------------------------------------------------------------- measuring

def encoder_macs(sam: Sam, img_size: int | None = None) -> int:
    """`bench.encoder_macs`, also at another input size: a pruned or unpruned SAM loaded by
    `models` is rebuilt on the meta device at `img_size` (no weights, no time) and counted there."""
    info = getattr(sam, "edgelab", None)
    name = info.name if info else None
    if name is None or name not in models.CONFIGS:  # not rebuildable: count it where it is, at its size
        if img_size not in (None, sam.image_encoder.img_size):
            raise ValueError(f"cannot resize {name or 'an unlabelled model'}: count it at its own input size")
        return bench.encoder_macs(sam)
    size = img_size or sam.image_encoder.img_size
    meta = build_pruned(name, architecture(sam), img_size=size, device="meta")
    return bench.count_macs(meta.image_encoder, torch.zeros(1, 3, size, size, device="meta"))


def block_macs(sam: Sam) -> dict[str, int]:
    """MACs of one encoder pass split by part: patch embedding, each block's attention and MLP, neck."""
    from torch.utils.flop_counter import FlopCounterMode
    enc = sam.image_encoder
    size = enc.img_size
    counter = FlopCounterMode(display=False)
    flags = [(p, p.requires_grad) for p in enc.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with counter, torch.no_grad():
            enc(torch.zeros(1, 3, size, size, device=sam.device))
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    per = counter.get_flop_counts()
    out = {}
    for key in ["patch_embed"] + [f"blocks.{i}.{part}" for i in range(len(enc.blocks)) for part in ("attn", "mlp")] + ["neck"]:
        full = f"{type(enc).__name__}.{key}"
        out[key] = sum(per.get(full, {}).values()) // 2
    return out


# ---------------------------------------------------------------- sensitivity

def sensitivity_scan(sam: Sam, score: Callable[[Sam], float], ratios: Sequence[float],
                     kinds: Sequence[str] = DEFAULT_KINDS, progress: bool = True) -> list[dict]:
    """Prune one block and one kind at a time, at each ratio, and score the result (no fine-tuning).

    Returns rows {"block", "kind", "ratio", "score", "macs"}; block -1 is the unpruned model.
    Notebook 02, "Sensitivity scan".
    """
    depth = len(sam.image_encoder.blocks)
    rows = [{"block": -1, "kind": "none", "ratio": 0.0, "score": score(sam), "macs": encoder_macs(sam)}]
    jobs = [(b, k, r) for k in kinds for b in range(depth) for r in ratios]
    for b, k, r in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False):
        pruned = pruned_copy(sam, PrunePlan.none(depth).with_block(b, k, r))
        rows.append({"block": b, "kind": k, "ratio": r, "score": score(pruned), "macs": encoder_macs(pruned)})
    return rows


def plan_from_scan(rows: list[dict], macs_budget: int, depth: int) -> PrunePlan:
    """A non-uniform plan from a sensitivity scan: cheapest score loss per MAC saved, to a MACs budget.

    Each (block, kind) climbs its ratios greedily, always taking the step with the smallest score
    drop per MAC saved, until the summed MACs saving brings the model under `macs_budget`
    (savings of different blocks and kinds add up: they are different layers).
    """
    base = next(r for r in rows if r["block"] == -1)
    options: dict[tuple[int, str], list[tuple[float, float, int]]] = {}
    for r in rows:
        if r["block"] >= 0:
            options.setdefault((r["block"], r["kind"]), []).append(
                (r["ratio"], base["score"] - r["score"], base["macs"] - r["macs"]))
    for key in options:
        options[key].sort()
    level = {key: -1 for key in options}  # -1: unpruned
    saved = 0

    def step_cost(key):
        lv = level[key]
        if lv + 1 >= len(options[key]):
            return math.inf
        _, drop1, save1 = options[key][lv + 1]
        drop0, save0 = (0.0, 0) if lv < 0 else options[key][lv][1:]
        gain = save1 - save0
        return math.inf if gain <= 0 else max(drop1 - drop0, 0.0) / gain

    while base["macs"] - saved > macs_budget:
        key = min(options, key=step_cost)
        if step_cost(key) == math.inf:
            break
        lv = level[key]
        saved += options[key][lv + 1][2] - (0 if lv < 0 else options[key][lv][2])
        level[key] = lv + 1
    plan = PrunePlan.none(depth)
    for (b, k), lv in level.items():
        if lv >= 0:
            plan = plan.with_block(b, k, options[(b, k)][lv][0])
    return plan


# ---------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneConfig:
    """Fine-tuning after pruning: SAM's mask losses, optionally plus embedding distillation."""

    steps: int = 120
    batch_images: int = 4
    lr: float = 1e-3  # peak of a cosine decay
    weight_decay: float = 0.01
    distill: float = 1.0  # weight of MSE(student embedding, teacher embedding) / teacher variance
    mask: float = 1.0  # weight of SAM's mask losses (0: distillation only, no decoder pass)
    seed: int = 1
    scene_offset: int = 5_000_000  # training scenes from here on (the eval split starts at 10_000_000)


def finetune(sam: Sam, cfg: FinetuneConfig, teacher: Sam | None = None,
             progress: bool = True, desc: str = "fine-tune") -> list[dict]:
    """Fine-tune a pruned SAM in place on generated training scenes; return the loss history.

    Uses SAM's own losses from `edgelab.training` (focal + dice + IoU on point, box and
    multi-point prompts, randomly flipped and rotated scenes). With cfg.distill > 0 and a teacher
    (the unpruned model), the encoder is also pulled toward the teacher's image embedding
    (cfg.mask = 0: only that, which needs no decoder pass and is about twice as cheap a step).
    Only the image encoder is trained: the prompt encoder and mask decoder stay as they were.
    Notebook 02, "20 / 40 / 60% and fine-tuning".
    """
    from . import training
    if cfg.distill > 0 and teacher is None:
        raise ValueError("embedding distillation (distill > 0) needs the unpruned model as teacher")
    if cfg.mask <= 0 and cfg.distill <= 0:
        raise ValueError("fine-tuning needs the mask losses (mask > 0), distillation (distill > 0) or both")
    tcfg = training.TrainConfig(steps=cfg.steps, batch_images=cfg.batch_images, seed=cfg.seed,
                                focal_weight=20.0)  # the loss the shipped tiny was trained with
    for p in sam.parameters():
        p.requires_grad_(False)
    params = list(sam.image_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    captured: dict[str, torch.Tensor] = {}
    hook = sam.image_encoder.register_forward_hook(lambda m, i, o: captured.update(x=i[0], emb=o))
    history: list[dict] = []
    draw = training.SceneBatches(tcfg, offset=cfg.scene_offset)
    sam.train()
    try:
        for step in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
            rng = np.random.default_rng([cfg.seed, step])
            batch = draw(step, rng)
            for g in opt.param_groups:
                g["lr"] = training.warmup_cosine(step, cfg.lr, 0, cfg.steps)
            rec = {"step": step + 1}
            loss = torch.zeros((), device=sam.device)
            if cfg.mask > 0:
                mask_loss = training.train_step(sam, batch, tcfg, rng)["loss_tensor"]
                loss = loss + cfg.mask * mask_loss
                rec["mask_loss"] = float(mask_loss.detach())
            else:  # distillation only: the encoder alone, no decoder pass
                sam.image_encoder(models.normalised([s.image for s in batch], sam))
            if cfg.distill > 0:
                with torch.no_grad():
                    target = teacher.image_encoder(captured["x"])
                distill = (captured["emb"] - target).pow(2).mean() / target.var().clamp_min(1e-8)
                loss = loss + cfg.distill * distill
                rec["distill_loss"] = float(distill.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(rec)
    finally:
        hook.remove()
        sam.eval()
        for p in sam.parameters():
            p.requires_grad_(True)
    return history


# ---------------------------------------------------------------- the ratio study (CLI and notebook)

def bench_prune(model: Sam, ratios: Sequence[float], kinds: Sequence[str], finetune_steps: int = 0,
                scenes: int | None = None, repeats: int = 5, progress: bool = False) -> dict:
    """`edgelab bench prune`: `prune_study` as a bench record (random weights: no mIoU, no fine-tuning)."""
    kind = models.weights_label(model)
    cfg = FinetuneConfig(steps=finetune_steps) if finetune_steps else None
    study = prune_study(model, ratios, kinds, cfg, n_eval=None if kind == "random" else scenes,
                        repeats=repeats, progress=progress)
    record = bench.bench_record("unpruned", kind, study["variants"])
    record["pruning"] = {"kinds": list(kinds), "finetune_steps": finetune_steps,
                         "miou_before_finetune": study["miou_before"]}
    if kind == "random":
        record["note"] = "random weights: params, MACs and latency only"
    return record


def prune_study(sam: Sam, ratios: Sequence[float], kinds: Iterable[str] = DEFAULT_KINDS,
                finetune_cfg: FinetuneConfig | None = None, n_eval: int | None = None,
                repeats: int = 5, progress: bool = False) -> dict:
    """The report's table on `sam`: one uniformly pruned variant per ratio plus `unpruned`.

    Each variant gets params and MACs of the image encoder, its latency (all variants timed in
    one interleaved run), and with `n_eval` scenes its mIoU before and after fine-tuning
    (`finetune_cfg.steps` > 0; the unpruned model is the distillation teacher).
    Returns {"variants": [...], "miou_before": {...}, "models": {...}, "histories": {...}}.
    """
    from . import evaluate
    kinds = tuple(kinds)
    depth = len(sam.image_encoder.blocks)
    size = sam.image_encoder.img_size
    score = (lambda m: evaluate.evaluate_scenes(m, n_eval, progress=False).miou) if n_eval else None
    variants = {"unpruned": sam}
    rows = {"unpruned": {"name": "unpruned", "label": "unpruned", "image_size": size}}
    before: dict[str, float] = {}
    histories: dict[str, list] = {}
    if score:
        rows["unpruned"]["miou"] = before["unpruned"] = score(sam)
    steps = finetune_cfg.steps if finetune_cfg else 0
    for r in ratios:
        name = f"prune-{r:g}"
        model = pruned_copy(sam, PrunePlan.uniform(r, depth, kinds))
        label = f"{'+'.join(kinds)} {r:.0%}" + (f", fine-tuned {steps} steps" if steps and score else "")
        rows[name] = {"name": name, "label": label, "image_size": size}
        if score:
            before[name] = rows[name]["miou"] = score(model)
            if steps:
                histories[name] = finetune(model, finetune_cfg, teacher=sam, progress=progress, desc=name)
                rows[name]["miou"] = score(model)
        variants[name] = model
    timings = bench.time_encoders(variants, repeats=repeats)
    for name, model in variants.items():
        rows[name].update(params=models.count_params(model.image_encoder), macs=encoder_macs(model),
                          median_s=timings[name].median_s, iqr_s=timings[name].iqr_s)
    return {"variants": list(rows.values()), "miou_before": before, "models": variants, "histories": histories}


__all__ = ["KINDS", "DEFAULT_KINDS", "frobenius_norms", "rank_channels", "n_kept", "keep_indices",
           "prune_linear_pair", "prune_conv_pair", "magnitude_sparsify", "importance",
           "torch_pruning_importance", "PrunePlan", "head_norms", "head_dim_norms", "prune_heads",
           "prune_head_dims", "SamAttentionPruner", "dependency_graph", "coupled_layers", "prune_encoder", "pruned_copy",
           "architecture", "build_pruned", "save_pruned", "load_pruned", "encoder_macs", "block_macs",
           "sensitivity_scan", "plan_from_scan", "FinetuneConfig", "finetune", "bench_prune",
           "prune_study"]
