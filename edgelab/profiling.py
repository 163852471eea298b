"""Where a model's time and FLOPs go, by op category (torch.profiler and torch.utils.flop_counter).

Taught in notebook 01, section "Where the encoder's time goes", and used again by chapter 05's
layer breakdown. Ops are labelled by the module they run in (Linear/MLP, conv, norms), by SAM's
rel-pos function, or by a `scope` that a variant opens around its own ops (attention code labels
its softmax and matmuls so); anything else is classified by its op name.
"""
from __future__ import annotations

import contextlib
import os
import statistics
from typing import Iterator, Mapping

import torch
from segment_anything.modeling import image_encoder as sam_encoder
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

CATEGORIES = ("attention matmuls", "softmax", "rel-pos bias", "Linear/MLP", "conv/patch embed", "norms", "other")
_STACK: list[str] = []  # the categories of the scopes open now, innermost last
_MODULE_CATEGORY: tuple[tuple[type, str], ...] = (
    (MLPBlock, "Linear/MLP"), (torch.nn.Linear, "Linear/MLP"), (torch.nn.Conv2d, "conv/patch embed"),
    (torch.nn.LayerNorm, "norms"), (LayerNorm2d, "norms"))
_MATMUL_OPS = {"matmul", "bmm", "mm", "baddbmm", "addmm", "einsum", "linear"}
_SOFTMAX_OPS = {"softmax", "_softmax", "safe_softmax", "_safe_softmax"}


@contextlib.contextmanager
def scope(category: str) -> Iterator[None]:
    """Label the ops inside for `profile_categories` and `flop_categories` (cheap when unused).

    Under `torch.compile` the profiler label is left out: Dynamo ignores `record_function` anyway
    and would log a warning saying so (the `compiled` variant of notebook 01 traces these scopes).
    """
    _STACK.append(category)
    label = (contextlib.nullcontext() if torch.compiler.is_compiling()
             else torch.profiler.record_function(f"edgelab::{category}"))
    try:
        with label:
            yield
    finally:
        _STACK.pop()


def classify_op(name: str) -> str:
    """The category of an op outside any labelled module: "aten::bmm" -> "attention matmuls"."""
    base = name.split("::")[-1].split(".")[0]
    if base in _MATMUL_OPS or "scaled_dot_product" in base or "flash_attention" in base:
        return "attention matmuls"
    if base in _SOFTMAX_OPS:
        return "softmax"
    return "other"


@contextlib.contextmanager
def category_scopes(module: torch.nn.Module) -> Iterator[None]:
    """Label the ops of Linear/MLP, conv, norm modules and SAM's rel-pos function by category.

    Module hooks open a `record_function` scope (seen by torch.profiler) and push the category
    (seen by `flop_categories`); SAM's `add_decomposed_rel_pos` is wrapped the same way.
    """
    handles, open_scopes = [], []

    def pre(mod, _inputs, category):
        _STACK.append(category)
        rf = torch.profiler.record_function(f"edgelab::{category}")
        rf.__enter__()
        open_scopes.append(rf)

    def post(mod, _inputs, _out):
        open_scopes.pop().__exit__(None, None, None)
        _STACK.pop()

    for m in module.modules():
        for kind, category in _MODULE_CATEGORY:
            if isinstance(m, kind):
                handles.append(m.register_forward_pre_hook(lambda mod, i, c=category: pre(mod, i, c)))
                handles.append(m.register_forward_hook(post))
                break
    original = sam_encoder.add_decomposed_rel_pos

    def scoped_rel_pos(*args, **kwargs):
        with scope("rel-pos bias"):
            return original(*args, **kwargs)

    sam_encoder.add_decomposed_rel_pos = scoped_rel_pos
    try:
        yield
    finally:
        sam_encoder.add_decomposed_rel_pos = original
        for h in handles:
            h.remove()


def _event_category(event) -> str:
    """Innermost edgelab scope around a profiler event, else the name of its outermost op."""
    top, node = event, event
    while node is not None:
        if node.name.startswith("edgelab::"):
            return node.name[len("edgelab::"):]
        top = node
        node = node.cpu_parent
    return classify_op(top.name)


def profile_categories(module: torch.nn.Module, *inputs: torch.Tensor,
                       warmup: int = 1, runs: int = 1) -> tuple[dict[str, float], object]:
    """Seconds of one forward of `module` by category, from torch.profiler (section "Where the time goes").

    Each op's self time goes to the innermost labelled module around it (`category_scopes`), or
    else to the category of its outermost op ("aten::bmm" -> attention matmuls, softmax, other).
    `warmup` unprofiled forwards run first (first calls pay for allocation and lazy setup); with
    `runs` > 1 each of that many forwards is profiled on its own and each category's median kept,
    so that one slow forward on a shared machine does not make the profile.
    Returns:
        ({category: seconds} in CATEGORIES order, the module's output).
    """
    if runs < 1:
        raise ValueError(f"runs must be 1 or more, not {runs}")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop chatter quiet
    for _ in range(warmup):
        module(*inputs)
    on_gpu = any(torch.is_tensor(t) and t.is_cuda for t in inputs)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    per_run = []
    for _ in range(runs):
        with category_scopes(module), torch.profiler.profile(activities=acts) as prof:
            out = module(*inputs)
            if on_gpu:
                torch.cuda.synchronize()
        seconds = dict.fromkeys(CATEGORIES, 0.0)
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CPU:
                continue
            # on a GPU an op's time is that of the kernels it launched, not its CPU launch time
            us = (getattr(ev, "self_device_time_total", None) or 0) if on_gpu else ev.self_cpu_time_total
            seconds[_event_category(ev)] += us / 1e6
        per_run.append(seconds)
    return {c: statistics.median(r[c] for r in per_run) for c in CATEGORIES}, out


_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of SDPA's CPU kernel: the two matmuls, as torch counts its GPU kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_SDPA not in flop_registry:
    # torch.utils.flop_counter has formulas for SDPA's GPU kernels only, so on a CPU the `sdpa`
    # and `fused` variants counted zero attention FLOPs (notebooks 01 and 05); this fills the gap
    # for FlopCounterMode (bench.count_macs) and for the counter below alike.
    register_flop_formula(_CPU_SDPA)(_cpu_sdpa_flop)


class _FlopsByCategory(TorchDispatchMode):
    """Counts FLOPs per category with torch.utils.flop_counter's formulas."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = dict.fromkeys(CATEGORIES, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            category = _STACK[-1] if _STACK else classify_op(packet.__name__)
            self.flops[category] += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def flop_categories(module: torch.nn.Module, *inputs: torch.Tensor, fake: bool = True) -> dict[str, int]:
    """FLOPs of one forward of `module` by category (torch.utils.flop_counter's counts).

    Runs on fake tensors (shapes only), so counting vit_h costs no arithmetic; `fake=False` runs
    the real forward (for code whose shapes depend on values, like SAM's prompt encoder).
    Softmax, norms and element-wise ops count zero FLOPs there: that is the counter's
    convention, and the lesson.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = _FlopsByCategory()
    if not fake:
        with category_scopes(module), counter, torch.no_grad():
            module(*inputs)
        return counter.flops
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_inputs = [fake.from_tensor(t) if torch.is_tensor(t) else t for t in inputs]
        with category_scopes(module), counter, torch.no_grad():
            module(*fake_inputs)
    return counter.flops


def shares(values: Mapping[str, float]) -> dict[str, float]:
    """Each value over their sum (0 for all when the sum is 0)."""
    total = sum(values.values())
    return {k: (v / total if total else 0.0) for k, v in values.items()}


def category_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A text table, one row per category, one share column per entry of `columns`.

    `columns` maps a heading ("vit_b time", "vit_b FLOPs") to {category: seconds or FLOPs};
    each column is shown as shares of its own total, with the total in the last row.
    """
    heads = list(columns)
    width = max(12, *(len(h) for h in heads))
    lines = [f"{'category':18s}" + "".join(f"{h:>{width + 2}s}" for h in heads)]
    fractions = {h: shares(columns[h]) for h in heads}
    for cat in CATEGORIES:
        lines.append(f"{cat:18s}" + "".join(f"{fractions[h].get(cat, 0.0):>{width + 2}.1%}" for h in heads))
    totals = []
    for h in heads:
        total = sum(columns[h].values())
        totals.append(f"{total:.3g} s" if "time" in h else f"{total / 1e9:.1f} GFLOP")
    lines.append(f"{'total':18s}" + "".join(f"{t:>{width + 2}s}" for t in totals))
    return "\n".join(lines)
