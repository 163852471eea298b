"""Chapter 03: linear quantization, by hand and then with integer kernels that pay on a CPU.

Sections of notebooks/03_linear_quantization.ipynb and the functions that carry them:
  - "r = S (q − Z) by hand": linear_quantize, linear_dequantize, torch_quantize (the check);
  - "What rounding costs": quantization_error, qrange, capture_activations (histograms in the notebook);
  - "Post-training quantization of SAM": quant_table, make_variant, encoder_error (sizes from
    bench.size_mb), fake_quantize_weights (weight-only INT8/INT4), models.BF16Encoder; its
    "Static activation quantization": calibrate / quantize_static (min/max or percentile);
  - "Which INT8 kernel, and SAM's real encoder": Int8Linear and quantize_w8a8 (W8A8 dynamic, a real
    int8 GEMM), quantize_ao_dynamic, quantize_torchao;
  - "Table 3: pruning, then INT8" and "Against the limit": quantize_w8a8, roofline_kind;
  - "Sensitivity and mixed precision": block_sensitivity, layer_groups, mixed_precision.
Rule used throughout: a b-bit integer lives in [-2^(b-1), 2^(b-1) - 1]; symmetric quantization
has zero point 0 and uses [-(2^(b-1) - 1), 2^(b-1) - 1] so that +x and -x quantize alike.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam

from . import bench, evaluate, models

BITS = tuple(range(2, 9)) + (16,)


class QTensor(NamedTuple):
    """An integer tensor and what maps it back to reals: r = scale * (q - zero_point)."""

    q: torch.Tensor  # int8 (bits <= 8) or int16 (bits = 16)
    scale: torch.Tensor  # fp32: a scalar, or one per channel along `axis`
    zero_point: torch.Tensor  # int32, shaped like scale
    bits: int
    axis: int | None


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integers a `bits`-bit quantizer uses: (qmin, qmax)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 2..8 or 16, not {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def _reduce(x: torch.Tensor, axis: int | None, fn: Callable) -> torch.Tensor:
    """fn (amin/amax) over everything but `axis`, shaped to broadcast against x."""
    if axis is None:
        return fn(x)
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    return fn(x, dim=dims, keepdim=True) if dims else x.clone()


def linear_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = False,
                    axis: int | None = None) -> QTensor:
    """Quantize `x` to `bits`-bit integers from its own range (notebook 03, "r = S (q − Z) by hand").

    Asymmetric: scale = (max - min) / (qmax - qmin), zero_point = round(qmin - min / scale), so
    min maps to qmin and max to qmax. Symmetric: scale = max|x| / qmax, zero_point = 0.
    Per-tensor with axis=None, else one scale and zero point per slice along `axis`.
    Returns QTensor(q, scale, zero_point, bits, axis); q = clamp(round(x / scale) + zero_point).
    """
    qmin, qmax = qrange(bits, symmetric)
    x = x.detach().float()
    if symmetric:
        scale = _reduce(x.abs(), axis, torch.amax) / qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = torch.clamp(_reduce(x, axis, torch.amin), max=0.0)  # the range always holds 0 exactly
        hi = torch.clamp(_reduce(x, axis, torch.amax), min=0.0)
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice
    # x * (1 / scale), as torch's own kernels compute it: then even the rare ties round alike
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, qmin, qmax)
    dtype = torch.int8 if bits <= 8 else torch.int16
    return QTensor(q.to(dtype), scale, zero, bits, axis)


def linear_dequantize(qt: QTensor) -> torch.Tensor:
    """Back to fp32: scale * (q - zero_point)."""
    return qt.scale * (qt.q.float() - qt.zero_point.float())


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = False, axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize at once: x with the quantizer's rounding error, in fp32."""
    return linear_dequantize(linear_quantize(x, bits, symmetric, axis))


def quantization_error(x: torch.Tensor, bits: int, symmetric: bool = False, axis: int | None = None) -> float:
    """Relative error ||x - deq(q(x))|| / ||x|| (the notebook's error-against-bits plot)."""
    x = x.detach().float()
    return float((fake_quantize(x, bits, symmetric, axis) - x).norm() / x.norm().clamp_min(1e-12))


def torch_quantize(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """torch's own quantizer with the scale and zero point of `qt` (qint8); its integers.

    The check that `linear_quantize` computes what torch computes: equal integers.
    """
    if qt.bits != 8:
        raise ValueError("torch's quantized tensors hold 8-bit integers (qint8)")
    if qt.axis is None:
        out = torch.quantize_per_tensor(x.float(), float(qt.scale), int(qt.zero_point), torch.qint8)
    else:
        out = torch.quantize_per_channel(x.float(), qt.scale.flatten(), qt.zero_point.flatten().long(),
                                         qt.axis % x.dim(), torch.qint8)
    return out.int_repr()


# =============================================================== weight-only fake quantization

def quantizable_layers(model: nn.Module, where: Sequence[str] = ("image_encoder",),
                       kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """{qualified name: layer} of the given kinds inside the named parts of a Sam (or any module)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and (not where or any(name == w or name.startswith(w + ".") for w in where)):
            out[name] = mod
    return out


@torch.no_grad()
def fake_quantize_weights(model: Sam, bits: int = 8, where: Sequence[str] = ("image_encoder",),
                          symmetric: bool = True, per_channel: bool = True,
                          names: Iterable[str] | None = None) -> Sam:
    """A copy whose Linear and Conv weights (in `where`, or only `names`) carry b-bit rounding.

    Weight-only fake quantization: the arithmetic stays fp32, so this measures accuracy, not speed
    (section "Post-training quantization": INT8 and INT4 weight-only).
    """
    out = copy.deepcopy(model)
    layers = quantizable_layers(out, where, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))
    if names is not None:
        names = set(names)
        layers = {n: m for n, m in layers.items() if n in names}
    for layer in layers.values():
        axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0  # output channels
        layer.weight.copy_(fake_quantize(layer.weight, bits, symmetric, axis if per_channel else None))
    return out


# =============================================================== W8A8: a real int8 kernel

def _int_mm_ok(m: int, k: int, n: int) -> bool:
    """Shapes torch._int_mm accepts on every backend: more than 16 rows, K and N multiples of 8."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


class Int8Linear(nn.Module):
    """A Linear layer computing in int8: W8A8, per-channel weights, per-token dynamic activations.

    Weights: symmetric int8 per output channel, quantized once. Activations: each token (row) is
    quantized symmetrically on the fly with its own scale. The product runs in `torch._int_mm`
    (int8 x int8 -> int32, oneDNN/VNNI on this CPU) and is rescaled by (token scale x channel
    scale). Shapes _int_mm cannot take (16 rows or fewer) run as fp32 matmul of the dequantized
    weight. Section "Post-training quantization", W8A8 dynamic.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight_q_t", weight_q.t().contiguous())  # (in, out) int8, ready for _int_mm
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        qt = linear_quantize(linear.weight, 8, symmetric=True, axis=0)
        return cls(qt.q, qt.scale, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight_q_t.float() * self.weight_scale).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if _int_mm_ok(x2.shape[0], self.in_features, self.out_features) and x2.device.type in ("cpu", "cuda"):
            s = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
            xq = torch.round(x2 / s).clamp_(-127, 127).to(torch.int8)
            # in place: the (tokens, out) result is the largest tensor here, every pass over it costs
            y = torch._int_mm(xq, self.weight_q_t).float().mul_(self.weight_scale).mul_(s)
            if self.bias is not None:
                y.add_(self.bias)
        else:
            y = x2 @ self.dequantized_weight().t()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 (torch._int_mm)"


class Int8WeightConv(nn.Module):
    """A Conv2d / ConvTranspose2d stored with int8 per-output-channel weights (weight-only).

    The few convolutions of SAM (patch embedding, neck, the decoder's upscaling) hold a fair share
    of a small model's bytes but little of its time: they ship as int8 and are dequantized on the
    fly for an fp32 convolution.
    """

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d):
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.axis = 1 if self.transposed else 0
        qt = linear_quantize(conv.weight, 8, symmetric=True, axis=self.axis)
        self.register_buffer("weight_q", qt.q)
        self.register_buffer("weight_scale", qt.scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q.float() * self.weight_scale
        if self.transposed:
            return F.conv_transpose2d(x, w, self.bias, self.stride, self.padding, self.output_padding,
                                      self.groups, self.dilation)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _swap_convs(model: nn.Module, where: Sequence[str]) -> nn.Module:
    for name, conv in quantizable_layers(model, where, (nn.Conv2d, nn.ConvTranspose2d)).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, Int8WeightConv(conv))
    return model


def _swap_linears(model: nn.Module, where: Sequence[str], make: Callable[[nn.Linear], nn.Module],
                  names: Iterable[str] | None = None) -> nn.Module:
    layers = quantizable_layers(model, where)
    if names is not None:
        keep = set(names)
        layers = {n: m for n, m in layers.items() if n in keep}
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(layer))
    return model


@torch.no_grad()
def roofline_kind(name: str) -> tuple[str, tuple[str, ...]]:
    """The dtype a variant's encoder computes in, and the FLOP categories it runs as int8 (for
    `roofline.work_by_dtype`, section "Against the limit"): W8A8 variants run their Linear layers
    on an int8 kernel; weight-only variants compute in fp32 on dequantized weights."""
    if "w8a8" in name:
        return "fp32", ("Linear/MLP",)
    return ("bf16" if name == "bf16" else "fp32"), ()


def quantize_w8a8(model: Sam, where: Sequence[str] = ("image_encoder", "mask_decoder"),
                  names: Iterable[str] | None = None, convs: bool = True) -> Sam:
    """A copy with every Linear in `where` (or only `names`) replaced by `Int8Linear`, and with
    `convs` every convolution there stored as int8 (`Int8WeightConv`)."""
    out = _swap_linears(copy.deepcopy(model), where, Int8Linear.from_float, names)
    return _swap_convs(out, where) if convs and names is None else out


@torch.no_grad()
def quantize_ao_dynamic(model: Sam, where: Sequence[str] = ("image_encoder", "mask_decoder")) -> Sam:
    """A copy with PyTorch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`):
    per-tensor activations, fbgemm int8 kernels, fp32 in and out of every layer."""
    from torch.ao.quantization import quantize_dynamic
    out = copy.deepcopy(model)
    for part in where:
        setattr(out, part, quantize_dynamic(getattr(out, part), {nn.Linear}, dtype=torch.qint8))
    return out


def _quiet_torchao() -> None:
    """torchao's import makes torch log a deprecation notice per enum it registers: keep it quiet."""
    import logging
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def torchao_available() -> bool:
    _quiet_torchao()
    try:
        import torchao  # noqa: F401
        return True
    except ImportError:
        return False


@torch.no_grad()
def quantize_torchao(model: nn.Module, where: Sequence[str] | None = ("image_encoder", "mask_decoder")) -> nn.Module:
    """A copy quantized by torchao's int8 dynamic-activation, int8-weight config (W8A8);
    where=None: the whole module."""
    _quiet_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    out = copy.deepcopy(model)
    for part in ([None] if where is None else where):
        quantize_(out if part is None else getattr(out, part), Int8DynamicActivationInt8WeightConfig())
    return out


# =============================================================== static activations (calibrated)

@torch.no_grad()
def capture_activations(model: Sam, images: Sequence, names: Iterable[str] | None = None,
                        where: Sequence[str] = ("image_encoder",), max_values: int = 200_000) -> dict[str, torch.Tensor]:
    """The inputs of Linear layers while `model` encodes `images` (uint8 HxWx3 arrays).

    Returns {layer name: 1-D fp32 tensor}: all values seen, subsampled to `max_values` per layer.
    """
    from segment_anything import SamPredictor
    layers = quantizable_layers(model, where)
    if names is not None:
        keep = set(names)
        layers = {n: m for n, m in layers.items() if n in keep}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].detach().flatten().float().cpu()))
             for n, m in layers.items()]
    try:
        predictor = SamPredictor(model)
        for img in images:
            predictor.set_image(img)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n, parts in seen.items():
        v = torch.cat(parts)
        if v.numel() > max_values:
            v = v[torch.randperm(v.numel(), generator=gen)[:max_values]]
        out[n] = v
    return out


def calibrate(values: Mapping[str, torch.Tensor], method: str = "minmax",
              percentile: float = 99.99) -> dict[str, tuple[float, float]]:
    """An activation range per layer from calibration values: min/max, or the percentile range
    that clips rare outliers (`percentile` and 100 - percentile)."""
    if method not in ("minmax", "percentile"):
        raise ValueError(f"calibration method must be 'minmax' or 'percentile', not {method!r}")
    out = {}
    for n, v in values.items():
        if method == "minmax":
            out[n] = (float(v.min()), float(v.max()))
        else:
            q = torch.quantile(v, torch.tensor([1 - percentile / 100, percentile / 100]))
            out[n] = (float(q[0]), float(q[1]))
    return out


class StaticQuantLinear(nn.Module):
    """A Linear whose input is fake-quantized to 8 bits with a fixed (calibrated) asymmetric range
    and whose weight carries per-channel int8 rounding: static W8A8, simulated in fp32."""

    def __init__(self, linear: nn.Linear, lo: float, hi: float):
        super().__init__()
        self.linear = copy.deepcopy(linear)
        with torch.no_grad():
            self.linear.weight.copy_(fake_quantize(linear.weight, 8, True, 0))
        qmin, qmax = qrange(8)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        self.scale = max(hi - lo, 1e-8) / (qmax - qmin)
        self.zero = int(round(qmin - lo / self.scale))
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero, self.qmin, self.qmax)
        return self.linear((q - self.zero) * self.scale)


@torch.no_grad()
def quantize_static(model: Sam, ranges: Mapping[str, tuple[float, float]]) -> Sam:
    """A copy with each calibrated Linear (the keys of `ranges`) made a `StaticQuantLinear`."""
    out = copy.deepcopy(model)
    for name, (lo, hi) in ranges.items():
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        setattr(parent, attr, StaticQuantLinear(getattr(parent, attr), lo, hi))
    return out


# =============================================================== size, error, variants

def _packed(name: str, weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """One weight as shipped at `bits`: int8, or 8 // bits values per byte, plus per-channel scales."""
    qt = linear_quantize(weight, bits, symmetric=True, axis=0)
    per_byte = 8 // bits if bits < 8 else 1
    if per_byte == 1:
        return {f"{name}.weight_q": qt.q, f"{name}.weight_scale": qt.scale.flatten()}
    flat = (qt.q.flatten().to(torch.int16) - qrange(bits)[0]).to(torch.uint8)  # 0 .. 2^bits - 1
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % per_byte)]).view(-1, per_byte)
    packed = sum((flat[:, i] << (bits * i)) for i in range(per_byte)).to(torch.uint8)
    return {f"{name}.weight_packed": packed, f"{name}.weight_scale": qt.scale.flatten()}


def packed_state(model: nn.Module, names: Iterable[str] = (), bits: int = 8) -> dict[str, torch.Tensor]:
    """The state dict as it would ship when the weights of layers `names` are stored at `bits`
    (8: int8; 4 or fewer: packed 8 // bits values per byte) with per-channel fp32 scales.
    Int8Linear / Int8WeightConv layers are already stored as int8."""
    state = dict(model.state_dict())
    for name in names:
        state.update(_packed(name, state.pop(f"{name}.weight"), bits))
    return state


def encoder_error(model: Sam, reference: Sam, x: torch.Tensor) -> dict[str, float]:
    """Max abs and relative error of `model`'s image embedding against `reference`'s on x."""
    with torch.inference_mode():
        return bench.output_error(model.image_encoder(x).float(), reference.image_encoder(x).float())


# =============================================================== the report's tables

VARIANTS = ("fp32", "bf16", "int8_weight_only", "int4_weight_only", "w8a8", "w8a8_fbgemm", "w8a8_torchao")
PARTS = ("image_encoder", "mask_decoder")  # what every variant quantizes


def _weight_layers(model: nn.Module) -> list[str]:
    return list(quantizable_layers(model, PARTS, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)))


def make_variant(sam: Sam, name: str) -> tuple[Sam, float]:
    """(a copy of `sam` as variant `name`, its size on disk in MB). Section "Post-training quantization of SAM".

    fp32: as is. bf16: the image encoder's weights and activations in BF16 (decoder fp32).
    int8/int4_weight_only: weights rounded per channel, arithmetic fp32 (size as packed).
    w8a8: our Int8Linear (per-token activations, torch._int_mm). w8a8_fbgemm: torch.ao's
    quantize_dynamic. w8a8_torchao: torchao's int8 dynamic config. The W8A8 variants quantize
    the Linear layers of encoder and decoder; w8a8 also stores the convolutions as int8.
    """
    if name == "fp32":
        return sam, bench.size_mb(sam)
    if name == "bf16":
        out = copy.deepcopy(sam)
        enc = models.BF16Encoder(out.image_encoder, "weights")
        enc.img_size = sam.image_encoder.img_size
        out.image_encoder = enc
        return out, bench.size_mb(out)
    if name in ("int8_weight_only", "int4_weight_only"):
        bits = 8 if name.startswith("int8") else 4
        out = fake_quantize_weights(sam, bits, PARTS)
        return out, bench.size_mb(packed_state(out, _weight_layers(out), bits))
    if name == "w8a8":
        out = quantize_w8a8(sam, PARTS)
    elif name == "w8a8_fbgemm":
        out = quantize_ao_dynamic(sam, PARTS)
    elif name == "w8a8_torchao":
        if not torchao_available():
            raise ValueError("w8a8_torchao needs torchao (pip install torchao)")
        out = quantize_torchao(sam, PARTS)
    else:
        raise ValueError(f"unknown quantization variant {name!r}: use {', '.join(VARIANTS)}")
    return out, bench.size_mb(out)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad) or repr(text)}: use {', '.join(VARIANTS)}")
    return names


def quant_table(sam: Sam, names: Sequence[str] = VARIANTS, n_eval: int | None = None,
                repeats: int = 5, seed: int = 0, prepare: Callable[[nn.Module], nn.Module] | None = None,
                progress: bool = False) -> list[dict]:
    """Notebook 03's Table 2: per variant size_mb, encoder median_s (all timed in one interleaved
    run), rel_err of the image embedding against fp32, and mIoU on `n_eval` eval scenes.

    With `prepare` (e.g. chapter 01's fused attention: `lambda m: attention.set_attention(m,
    "fused")`) every variant is passed through it, and a row `fp32_reference` (`sam` as given)
    joins the same timed run.
    """
    from tqdm.auto import tqdm
    names = list(dict.fromkeys(["fp32", *names]))
    models_, rows = {}, {}
    for n in tqdm(names, desc="quantize", disable=not progress, leave=False):
        m, size = make_variant(sam, n)
        if prepare is not None:
            m = prepare(copy.deepcopy(m) if m is sam else m)
        models_[n], rows[n] = m, {"name": n, "size_mb": size}
    if prepare is not None:
        names.append("fp32_reference")
        models_["fp32_reference"] = sam
        rows["fp32_reference"] = {"name": "fp32_reference", "size_mb": rows["fp32"]["size_mb"]}
    size_px = sam.image_encoder.img_size
    x = torch.randn(1, 3, size_px, size_px, generator=torch.Generator().manual_seed(seed)).to(sam.device)
    with torch.inference_mode():
        raced = bench.race({n: (lambda n=n: models_[n].image_encoder(x)) for n in names}, "fp32",
                           warmup=1, repeats=repeats)
    for r in raced:
        n = r.pop("name")
        rows[n].update(r)
        if n_eval:
            rows[n]["miou"] = evaluate.evaluate_scenes(models_[n], n_eval, progress=False).miou
    return [rows[n] for n in names]


def bench_quant(sam: Sam, names: Sequence[str], scenes: int = 30, repeats: int = 5,
                prepare: Callable[[nn.Module], nn.Module] | None = None, attention: str = "reference",
                progress: bool = False) -> dict:
    """`edgelab bench quant`: `quant_table` as a bench record; `attention` names what `prepare` sets."""
    kind = models.weights_label(sam)
    rows = quant_table(sam, names, n_eval=None if kind == "random" else scenes, repeats=repeats,
                       prepare=prepare, progress=progress)
    ref = "fp32_reference" if any(r["name"] == "fp32_reference" for r in rows) else "fp32"
    for r in rows:
        r["image_size"] = sam.image_encoder.img_size
    record = bench.bench_record(ref, kind, rows)
    base = next(r for r in rows if r["name"] == ref)["median_s"]
    record["quantization"] = {"attention": attention,
                              "speedup_vs_" + ref: {r["name"]: base / r["median_s"] for r in rows}}
    if kind == "random":
        record["note"] = "random weights: size, latency and error only"
    return record


# =============================================================== sensitivity, mixed precision

def layer_groups(sam: Sam) -> dict[str, list[str]]:
    """Weight layers grouped for the sensitivity scan: each encoder block, the patch embedding,
    the neck, and the mask decoder."""
    groups: dict[str, list[str]] = {}
    for name in _weight_layers(sam):
        parts = name.split(".")
        if parts[0] == "mask_decoder":
            key = "decoder"
        elif parts[1] == "blocks":
            key = f"block {parts[2]}"
        else:
            key = parts[1]  # patch_embed, neck
        groups.setdefault(key, []).append(name)
    return groups


def block_sensitivity(sam: Sam, score: Callable[[Sam], float], bits: int = 4,
                      progress: bool = False) -> dict[str, float]:
    """Score (e.g. mIoU) with each layer group alone fake-quantized to `bits` (weights, per channel)."""
    from tqdm.auto import tqdm
    out = {}
    for key, names in tqdm(layer_groups(sam).items(), desc="sensitivity", disable=not progress, leave=False):
        out[key] = score(fake_quantize_weights(sam, bits, PARTS, names=names))
    return out


def mixed_precision(sam: Sam, keep: Iterable[str], low_bits: int = 4, high_bits: int = 8) -> tuple[Sam, float]:
    """Every weight layer at `low_bits` except the groups in `keep` at `high_bits`; (model, packed MB)."""
    groups = layer_groups(sam)
    keep = set(keep)
    unknown = keep - set(groups)
    if unknown:
        raise ValueError(f"unknown layer groups {sorted(unknown)}: use {list(groups)}")
    high = [n for k in keep for n in groups[k]]
    low = [n for k, names in groups.items() if k not in keep for n in names]
    out = fake_quantize_weights(sam, low_bits, PARTS, names=low)
    out = fake_quantize_weights(out, high_bits, PARTS, names=high)
    state = packed_state(out, low, low_bits)
    for n in high:  # the high-precision layers, packed at their own width
        state.update(_packed(n, state.pop(f"{n}.weight"), high_bits))
    return out, bench.size_mb(state)


__all__ = ["VARIANTS", "PARTS", "make_variant", "parse_variants", "quant_table", "layer_groups",
           "block_sensitivity", "mixed_precision", "BITS", "QTensor", "qrange", "linear_quantize", "linear_dequantize", "fake_quantize",
           "quantization_error", "torch_quantize", "quantizable_layers", "fake_quantize_weights",
           "Int8Linear", "Int8WeightConv", "quantize_w8a8", "quantize_ao_dynamic", "torchao_available", "quantize_torchao",
           "capture_activations", "calibrate", "StaticQuantLinear", "quantize_static", "packed_state",
           "encoder_error", "bench_quant"]
