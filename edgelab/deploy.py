"""Edge deployment: stacking chapters 01-04, ONNX Runtime, choosing a variant under a budget (chapter 05).

Taught in notebook 05. The one module allowed to import the other chapters' modules: it stacks
fused attention (01), Frobenius-norm pruning (02), INT8 (03) and the distilled student (04) on
`tiny`, exports models to ONNX and runs them with ONNX Runtime (FP32 and its own dynamic INT8)
and with OpenVINO (FP32 and NNCF's post-training INT8), and measures every variant the same way: encoder latency, end-to-end frame latency (encoder and
a decoder call for a fixed number of point prompts), size on disk, peak memory, mIoU against the
ground truth, agreement with the PyTorch FP32 reference's masks and with the same model's
PyTorch FP32 masks; choices (`choose`, `best_deployable`) are made on the validation split.

Every variant can be rebuilt from a run folder (`build_variant`), which lets peak memory be
measured in a fresh process. Exported files go to the run folder, never into the repository.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import multiprocessing as mp
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import (attention, bench, distillation, evaluate, memory, models, profiling, pruning, quantization,
               roofline, scenes)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = 1  # point prompts per frame in the end-to-end latency: one tracked object (prompt_sweep: more)
OPSET = 17
PYTORCH_STEPS = ("reference", "fused", "pruned", "pruned+int8", "student", "student+int8")
ORT_VARIANTS = ("ort fp32", "ort int8", "student ort fp32", "student ort int8")
OPENVINO_VARIANTS = ("openvino fp32", "openvino int8")  # tiny on OpenVINO; INT8: NNCF on the encoder
EDGE_VARIANTS = ORT_VARIANTS + OPENVINO_VARIANTS
CALIBRATION_SCENES = 32  # train-split images for NNCF's post-training quantization
MIOU_SLACK = 0.03  # the chapter's bar: a deployable variant keeps mIoU within 3 points
MATCH_IOU = 0.9  # a prompt's mask "matches" the reference's when their IoU is at least this


class ExportError(ValueError):
    """A model that cannot be exported to ONNX (the message says why)."""


@dataclass
class StackConfig:
    """What each step of the stack adds (notebook 05's parameters)."""

    attention: str = "sdpa"  # chapter 01's variant for the "fused" step
    prune_ratio: float = 0.4  # chapter 02: uniform channel pruning
    finetune_steps: int = 60  # chapter 02: fine-tuning after pruning (0: none)
    quant: str = "w8a8"  # chapter 03: the INT8 variant
    prompts: int = PROMPTS
    threads: int | None = None  # ONNX Runtime threads (None: torch's)

    def check(self) -> None:
        if self.attention not in attention.VARIANTS:
            raise ValueError(f"unknown attention variant {self.attention!r}: choose from {', '.join(attention.VARIANTS)}")
        if not 0 < self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be between 0 and 1 (exclusive), got {self.prune_ratio}")
        if self.finetune_steps < 0 or self.prompts < 1:
            raise ValueError("finetune_steps must be 0 or more and prompts 1 or more")
        if self.quant not in quantization.VARIANTS or self.quant in ("fp32", "bf16"):
            raise ValueError(f"quant must be an INT8 variant of chapter 03, not {self.quant!r}")


# ================================================================ one frame

def frame_points(n: int = PROMPTS, size: int = 256, seed: int = 0) -> np.ndarray:
    """`n` fixed (x, y) points of a frame: the point prompts of the first eval scene's objects."""
    s = scenes.SceneDataset("eval", 1, size=size).scene(0)
    pts = [evaluate.point_prompt(m) for m in s.masks]
    rng = np.random.default_rng(seed)
    while len(pts) < n:
        pts.append(tuple(rng.uniform(0, size, 2)))
    return np.asarray(pts[:n], np.float32)


class Frame(nn.Module):
    """One camera frame through a SAM: the image encoder, then `points` as separate one-point
    prompts in one batched decoder call (section "The stack, step by step")."""

    def __init__(self, sam: Sam, points: np.ndarray):
        super().__init__()
        self.sam = sam
        self.register_buffer("points", torch.as_tensor(points, dtype=torch.float)[:, None, :])
        self.register_buffer("labels", torch.ones(len(points), 1, dtype=torch.int))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary masks at the input size (N, 3, S, S) and their predicted IoU (N, 3)."""
        emb = self.sam.image_encoder(x)
        pe = self.sam.prompt_encoder
        sparse, dense = pe(points=(self.points, self.labels), boxes=None, masks=None)
        low, iou = self.sam.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, True)
        return upscale_best(low, iou, self.sam.image_encoder.img_size) > self.sam.mask_threshold, iou


def upscale_best(low: torch.Tensor, iou: torch.Tensor, size: int) -> torch.Tensor:
    """The best of each prompt's masks by predicted IoU, upscaled to (N, 1, size, size).

    Choosing before upscaling (as segment_anything's SamOnnxModel does) upscales one mask per
    prompt instead of three: the same result as the evaluation protocol, a third of the work."""
    best = low[torch.arange(low.shape[0], device=low.device), iou.argmax(dim=1)][:, None]
    return F.interpolate(best, (size, size), mode="bilinear", align_corners=False)


def torch_input(sam: Sam, image: np.ndarray) -> torch.Tensor:
    """SamPredictor's preprocessing of one image: (1, 3, S, S), normalised and padded."""
    pred = SamPredictor(sam)
    img = pred.transform.apply_image(image)
    x = torch.as_tensor(img, device=sam.device).permute(2, 0, 1)[None].float()
    return sam.preprocess(x)


# ================================================================ variants

@dataclass
class Variant:
    """One deployable variant: how to run a frame, the encoder alone, and segment an image."""

    name: str
    runtime: str  # "pytorch", "onnxruntime" or "openvino"
    frame: Callable[[], object]
    encode: Callable[[], object]
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image, (N, 2) points) -> (N, H, W)
    size_mb: float
    sam: Sam | None = None


def torch_variant(name: str, sam: Sam, image: np.ndarray, points: np.ndarray,
                  size_mb: float | None = None) -> Variant:
    """Wrap a PyTorch SAM: its frame on `image` with `points`, its encoder, its predictor."""
    sam = sam.eval()
    x = torch_input(sam, image)
    frame = Frame(sam, points).to(sam.device)
    pred = SamPredictor(sam)

    @torch.inference_mode()
    def run_frame():
        return frame(x)

    @torch.inference_mode()
    def run_encoder():
        return sam.image_encoder(x)

    def segment(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return evaluate.predict_masks(pred, img, points=pts)

    size = bench.size_mb(sam) if size_mb is None else size_mb
    return Variant(name, "pytorch", run_frame, run_encoder, segment, size, sam)


def edge_variant(name: str, encoder: str | Path, decoder: str | Path, image: np.ndarray,
                 points: np.ndarray, threads: int | None = None) -> Variant:
    """Wrap an exported pair with `edge.EdgePredictor` (numpy and ONNX Runtime or OpenVINO only)."""
    from .edge import EdgePredictor
    pred = EdgePredictor(str(encoder), str(decoder), threads or torch.get_num_threads())
    x = pred.preprocess(image)
    pred.set_image(image)

    def run_frame():  # the same work as Frame: encoder, decoder, best masks at the input size
        pred.embedding = pred.encode(x)
        return pred.segment(points)

    def run_encoder():
        return pred.encode(x)

    def segment(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
        pred.set_image(img)
        return pred.segment(pts)

    size = model_mb(encoder) + model_mb(decoder)
    return Variant(name, pred.runtime, run_frame, run_encoder, segment, size)


def model_mb(path: str | Path) -> float:
    """Size on disk of a model file in MB (an OpenVINO .xml counts its .bin of weights too)."""
    path = Path(path)
    return (path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)) / 2**20


# ================================================================ the stack

def fused(sam: Sam, cfg: StackConfig) -> Sam:
    """Chapter 01: a copy of `sam` with the faster attention (same weights, same function)."""
    return attention.set_attention(copy.deepcopy(sam), cfg.attention)


def pruned(sam: Sam, cfg: StackConfig, progress: bool = True) -> Sam:
    """Chapter 02: uniform Frobenius-norm pruning, then a short fine-tune distilled from `sam`."""
    depth = len(sam.image_encoder.blocks)
    out = pruning.pruned_copy(sam, pruning.PrunePlan.uniform(cfg.prune_ratio, depth))
    if cfg.finetune_steps:
        pruning.finetune(out, pruning.FinetuneConfig(steps=cfg.finetune_steps), teacher=sam,
                         progress=progress, desc=f"fine-tune {cfg.prune_ratio:.0%} pruned")
    return out.eval()


def pytorch_step(name: str, tiny: Sam, pruned_model: Sam | None, cfg: StackConfig) -> tuple[Sam, float]:
    """PyTorch step `name` of the stack (section "The stack, step by step"): (model, size on disk in MB).

    `pruned_model` (chapter 02's, needed by the pruned steps only) gets `cfg.attention` in place;
    INT8 steps are copies (`quantization.make_variant`), so one pruned model serves both pruned steps.
    """
    if name not in PYTORCH_STEPS:
        raise ValueError(f"unknown PyTorch step {name!r}: choose from {', '.join(PYTORCH_STEPS)}")
    if name == "reference":
        sam = tiny
    elif name == "fused":
        sam = fused(tiny, cfg)
    elif name.startswith("pruned"):
        if pruned_model is None:
            raise ValueError(f"step {name!r} needs the pruned model")
        sam = attention.set_attention(pruned_model, cfg.attention)
    else:
        sam = distillation.deployable(distillation.load_shipped_student(tiny))
    return quantization.make_variant(sam, cfg.quant) if name.endswith("+int8") else (sam, bench.size_mb(sam))


def build_stack(tiny: Sam, run_dir: str | Path, cfg: StackConfig = StackConfig(),
                progress: bool = True) -> dict[str, tuple[Sam, float]]:
    """Every PyTorch step of the stack: name -> (model, size on disk in MB).

    The pruned model is saved to `run_dir/pruned.pt` so `build_variant` can rebuild it.
    """
    cfg.check()
    run_dir = _run_folder(run_dir)
    p = pruned(tiny, cfg, progress)
    pruning.save_pruned(p, run_dir / "pruned.pt")
    return {name: pytorch_step(name, tiny, p, cfg) for name in PYTORCH_STEPS}


def _run_folder(path: str | Path) -> Path:
    """A folder for exports and results; refuses the repository's own source folders."""
    p = Path(path).expanduser().resolve()
    for src in ("edgelab", "notebooks", "data", "tests", "binder"):
        if p == REPO / src or (REPO / src) in p.parents:
            raise ExportError(f"{p} is inside the repository's {src}/: write exports to a run folder such as runs/deploy")
    p.mkdir(parents=True, exist_ok=True)
    return p


# ================================================================ ONNX

class _EncoderForExport(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class DecoderForExport(nn.Module):
    """The prompt encoder and mask decoder as one graph with a dynamic number of prompts (N) and
    points per prompt (K), after segment_anything's SamOnnxModel. Outputs: `best_masks`, the best
    of SAM's three masks per prompt upscaled to the encoder's input size (N, 1, S, S); the
    predicted IoU of all four mask tokens (N, 4); their low-resolution logits (N, 4, 4h, 4w).
    Cropping and resizing to the image stay outside the graph: they depend on the image."""

    def __init__(self, sam: Sam):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel
        self.onnx = SamOnnxModel(sam, return_single_mask=False)
        self.img_size = sam.image_encoder.img_size

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pe = self.onnx.model.prompt_encoder
        sparse = self.onnx._embed_points(point_coords, point_labels)
        h, w = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        low, scores = self.onnx.mask_decoder.predict_masks(
            image_embeddings=image_embeddings, image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        best = upscale_best(low[:, 1:], scores[:, 1:], self.img_size)  # SAM's three masks, the best
        return best, scores, low


def _exportable(sam: Sam, what: str) -> None:
    """Clear errors for models the exporter cannot take, before it fails deep inside."""
    kinds = {type(m).__name__ for m in sam.modules()}
    int8 = kinds & {"Int8Linear", "Int8WeightConv", "StaticQuantLinear", "DynamicQuantizedLinear", "LinearPackedParams"}
    if int8:
        raise ExportError(f"cannot export {what}: it holds chapter 03's INT8 layers ({', '.join(sorted(int8))}), "
                          "whose integer kernels (torch._int_mm, fbgemm) have no ONNX operator; export the FP32 "
                          "model and quantize it with ONNX Runtime instead (deploy.quantize_onnx)")
    if any(p.dtype != torch.float32 for p in sam.parameters()):
        raise ExportError(f"cannot export {what}: export the FP32 model (found {sorted({str(p.dtype) for p in sam.parameters()})})")


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict | None, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as e:  # noqa: BLE001 - the exporter's own errors are long; keep the first line
        raise ExportError(f"could not export {what} to ONNX: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def export_onnx(sam: Sam, out_dir: str | Path, prefix: str = "tiny") -> tuple[Path, Path]:
    """Write `prefix`_encoder.onnx and `prefix`_decoder.onnx to `out_dir` (section "ONNX").

    The encoder's file carries the preprocessing constants (input size, pixel mean and std) as
    metadata, so `edge.EdgePredictor` needs nothing else. Attention is exported as SAM's own
    code (ONNX Runtime fuses the graph itself). Raises ExportError with the reason.
    """
    import onnx
    _exportable(sam, prefix)
    out = _run_folder(out_dir)
    model = copy.deepcopy(sam).cpu().eval()
    if attention.attention_modules(model):
        attention.set_attention(model, "reference")
    size = model.image_encoder.img_size
    x = torch.zeros(1, 3, size, size)
    enc_path, dec_path = out / f"{prefix}_encoder.onnx", out / f"{prefix}_decoder.onnx"
    with torch.no_grad():
        emb = model.image_encoder(x)
    export_encoder(model, enc_path, prefix)
    pts, labels = torch.rand(2, 2, 2) * size, torch.ones(2, 2)
    _export(DecoderForExport(model), (emb, pts, labels), dec_path,
            ["image_embeddings", "point_coords", "point_labels"], ["best_masks", "iou_predictions", "low_res_masks"],
            {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
             "best_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}, "low_res_masks": {0: "prompts"}},
            f"{prefix}'s prompt encoder and mask decoder")
    return enc_path, dec_path


def export_encoder(sam: Sam, path: Path, what: str = "tiny") -> Path:
    """The image encoder of `sam` (FP32, SAM's own attention) as ONNX at `path`, with the
    preprocessing constants as metadata (`export_onnx` calls it; so does `initial_final` for
    the big models, where the file may pass 2 GB and goes out as external data)."""
    import onnx
    _exportable(sam, what)
    size = sam.image_encoder.img_size
    big = models.count_params(sam.image_encoder) * 4 > 1.8 * 2**30
    _export(_EncoderForExport(sam.image_encoder), (torch.zeros(1, 3, size, size),), path, ["image"],
            ["image_embeddings"], None, f"{what}'s image encoder")
    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, {
        "img_size": str(size), "mask_threshold": str(float(sam.mask_threshold)),
        "pixel_mean": ",".join(f"{v:g}" for v in sam.pixel_mean.flatten().tolist()),
        "pixel_std": ",".join(f"{v:g}" for v in sam.pixel_std.flatten().tolist())})
    onnx.save(m, str(path), save_as_external_data=big)
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `export_onnx` wrote into an ONNX file (preprocessing constants)."""
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime's own dynamic INT8 quantization (weights int8, activations quantized per
    call): the MatMul and Gemm weights; the metadata is kept (section "Every variant, measured the same way")."""
    import logging
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its pre-processing advice
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    props = onnx_metadata(src)
    if props:
        m = onnx.load(str(dst))
        onnx.helper.set_model_props(m, props)
        onnx.save(m, str(dst))
    return Path(dst)


def to_openvino(src: str | Path, dst: str | Path, calibration: Sequence[dict[str, np.ndarray]] | None = None) -> Path:
    """An exported ONNX file as OpenVINO IR (`dst`, .xml beside its .bin), with edgelab's metadata
    in its rt_info; with `calibration` (the model's inputs for some images), INT8 by NNCF's
    post-training quantization (section "Every variant, measured the same way")."""
    import openvino as ov
    model = ov.Core().read_model(str(src))
    for key, value in onnx_metadata(src).items():
        model.set_rt_info(value, ["edgelab", key])
    if calibration is not None:
        import logging
        import nncf
        logging.getLogger("nncf").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars would break `--json`
            model = nncf.quantize(model, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return Path(dst)


def calibration_inputs(sam: Sam, n: int = CALIBRATION_SCENES) -> list[dict[str, np.ndarray]]:
    """The encoder's inputs for the first `n` train-split images (never eval or validation)."""
    ds = scenes.SceneDataset("train", n)
    return [{"image": torch_input(sam, ds.scene(i).image).cpu().numpy()} for i in range(len(ds))]


def export_all(tiny: Sam, student: Sam, run_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """The edge variants' files: tiny and the student on ONNX Runtime, FP32 and INT8, and tiny
    on OpenVINO, FP32 and INT8 (NNCF quantizes the encoder; the small decoder stays FP32)."""
    out: dict[str, tuple[Path, Path]] = {}
    for prefix, sam in (("tiny", tiny), ("student", student)):
        enc, dec = export_onnx(sam, run_dir, prefix)
        tag = "" if prefix == "tiny" else "student "
        out[f"{tag}ort fp32"] = (enc, dec)
        out[f"{tag}ort int8"] = (quantize_onnx(enc, enc.with_name(f"{prefix}_encoder_int8.onnx")),
                                 quantize_onnx(dec, dec.with_name(f"{prefix}_decoder_int8.onnx")))
    enc, dec = out["ort fp32"]
    ov_dec = to_openvino(dec, dec.with_suffix(".xml"))
    out["openvino fp32"] = (to_openvino(enc, enc.with_suffix(".xml")), ov_dec)
    out["openvino int8"] = (to_openvino(enc, enc.with_name("tiny_encoder_int8.xml"), calibration_inputs(tiny)), ov_dec)
    return out


def all_variants(tiny: Sam, run_dir: str | Path, cfg: StackConfig = StackConfig(),
                 progress: bool = True) -> dict[str, Variant]:
    """Every variant of the chapter, ready to time: the PyTorch stack, ONNX Runtime's four, OpenVINO's two."""
    image = scenes.SceneDataset("eval", 1).scene(0).image
    points = frame_points(cfg.prompts)
    steps = build_stack(tiny, run_dir, cfg, progress)
    files = export_all(tiny, steps["student"][0], run_dir)
    out = {n: torch_variant(n, sam, image, points, size) for n, (sam, size) in steps.items()}
    out.update({n: edge_variant(n, enc, dec, image, points, cfg.threads) for n, (enc, dec) in files.items()})
    return out


def bench_deploy(run_dir: str | Path, cfg: StackConfig = StackConfig(), n_eval: int = 30,
                 repeats: int = 20, memory: bool = True, progress: bool = True, n_val: int | None = None) -> dict:
    """`edgelab bench deploy`: every variant measured in one run, and the best deployable one
    (chosen on `n_val` validation scenes, `n_eval` if None; reported on eval)."""
    torch.manual_seed(0)
    tiny = models.load_sam("tiny")
    variants = all_variants(tiny, run_dir, cfg, progress)
    n_val = n_eval if n_val is None else n_val
    rows = measure(variants, n_eval, repeats, run_dir if memory else None, cfg, progress, n_val=n_val)
    rows = with_roofline(rows, variants, roofline.machine_rates())
    best = best_deployable(rows)
    ref = rows[0]
    keep = ("name", "median_s", "iqr_s", "size_mb", "peak_mem_mb", "miou", "agreement", "roofline_s", "of_limit")
    record = bench.bench_record("reference", "trained", [{"label": r["runtime"], **{k: r[k] for k in keep if r.get(k) is not None}}
                                                         for r in rows])
    record["deploy"] = {"config": asdict(cfg), "eval_scenes": n_eval, "val_scenes": n_val, "prompts_per_frame": cfg.prompts,
                        "median_s_is": "one frame: the image encoder and one decoder call for the prompts",
                        "encoder_s": {r["name"]: r["encoder_s"] for r in rows},
                        "speedup_vs_reference": {r["name"]: r["speedup"] for r in rows},
                        "same_model_agreement": {r["name"]: r["same_model_agreement"] for r in rows},
                        "val_miou": {r["name"]: r["val_miou"] for r in rows},
                        "best": {"name": best["name"], "speedup": best["speedup"],
                                 "miou_drop_points": (ref["miou"] - best["miou"]) * 100, "chosen_on": "val"},
                        "run_dir": str(Path(run_dir).resolve())}
    return record


def build_variant(name: str, run_dir: str | Path, cfg: StackConfig = StackConfig(),
                  image: np.ndarray | None = None, points: np.ndarray | None = None) -> Variant:
    """Rebuild variant `name` from the files `build_stack` and `export_all` left in `run_dir`
    (used to measure peak memory in a fresh process)."""
    run_dir = Path(run_dir)
    image = scenes.SceneDataset("eval", 1).scene(0).image if image is None else image
    points = frame_points(cfg.prompts) if points is None else points
    if name in ORT_VARIANTS:
        prefix = "student" if name.startswith("student") else "tiny"
        q = "_int8" if name.endswith("int8") else ""
        return edge_variant(name, run_dir / f"{prefix}_encoder{q}.onnx", run_dir / f"{prefix}_decoder{q}.onnx",
                            image, points, cfg.threads)
    if name in OPENVINO_VARIANTS:
        q = "_int8" if name.endswith("int8") else ""
        return edge_variant(name, run_dir / f"tiny_encoder{q}.xml", run_dir / "tiny_decoder.xml", image, points, cfg.threads)
    if name not in PYTORCH_STEPS:
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(PYTORCH_STEPS + EDGE_VARIANTS)}")
    p = pruning.load_pruned(run_dir / "pruned.pt") if name.startswith("pruned") else None
    sam, size = pytorch_step(name, models.load_sam("tiny"), p, cfg)
    return torch_variant(name, sam, image, points, size)


# ================================================================ measuring every variant

def same_model(name: str) -> str:
    """The PyTorch FP32 step that runs the same model as variant `name` (its weights before a
    runtime or INT8 touched them): `reference` for tiny on any runtime, `student` for the
    student's, `pruned` for the pruned model's (section "Every variant, measured the same way")."""
    return roofline_base(name)[0]


def accuracy(variants: Mapping[str, Variant], n_eval: int, reference: str = "reference",
             progress: bool = True, split: str = "eval") -> dict[str, dict]:
    """Accuracy of each variant on the first `n_eval` scenes of `split`, one point per object
    (section "Every variant, measured the same way"):

    - `miou` against the ground truth, and `ious`, its per-object IoUs (for paired differences);
    - `agreement`: the mean IoU of each prompt's mask with `reference`'s mask for the same prompt;
    - `same_model_agreement`: the same against the PyTorch FP32 step of the same model
      (`same_model`: the student on ONNX Runtime against the student in PyTorch), which is what
      a runtime or INT8 alone changes;
    - `match_share`: the share of prompts whose mask has IoU >= `MATCH_IOU` with `reference`'s.
    """
    ds = scenes.SceneDataset(split, n_eval)
    gt: dict[str, list[float]] = {n: [] for n in variants}
    agree: dict[str, list[float]] = {n: [] for n in variants}
    own: dict[str, list[float]] = {n: [] for n in variants}
    for i in tqdm(range(len(ds)), desc=f"mIoU ({split})", disable=not progress, leave=False):
        s = ds.scene(i)
        pts = np.array([evaluate.point_prompt(m) for m in s.masks], np.float32)
        preds = {name: v.segment(s.image, pts) for name, v in variants.items()}
        for name, pred in preds.items():
            base = preds.get(same_model(name), preds[reference])
            gt[name] += [evaluate.iou(p, g) for p, g in zip(pred, s.masks)]
            agree[name] += [evaluate.iou(p, r) for p, r in zip(pred, preds[reference])]
            own[name] += [evaluate.iou(p, r) for p, r in zip(pred, base)]
    return {n: {"miou": float(np.mean(gt[n])), "ious": gt[n], "agreement": float(np.mean(agree[n])),
                "same_model_agreement": float(np.mean(own[n])),
                "match_share": float(np.mean(np.asarray(agree[n]) >= MATCH_IOU))} for n in variants}


def peak_memory(names: Sequence[str], run_dir: str | Path, cfg: StackConfig = StackConfig()) -> dict[str, float]:
    """Peak RSS growth (MB) of rebuilding each variant from `run_dir` and running one frame, one
    fresh process for all (memory.peak_memory_series): weights, runtime buffers and activations."""
    calls = {n: {"name": n, "run_dir": str(run_dir), "cfg": asdict(cfg)} for n in names}
    return memory.peak_memory_series("edgelab.deploy:memory_frame", calls, "edgelab.deploy:memory_setup",
                                     {"threads": torch.get_num_threads()}, timeout=1800)


def memory_setup(threads: int) -> None:
    """Setup of `peak_memory`'s child: the parent's thread count, warnings off."""
    import warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)


def memory_frame(state: None, name: str, run_dir: str, cfg: dict) -> None:
    """Rebuild variant `name` and run one frame (what `peak_memory` measures)."""
    v = build_variant(name, run_dir, StackConfig(**cfg))
    v.frame()


def measure(variants: Mapping[str, Variant], n_eval: int = 30, repeats: int = 20,
            run_dir: str | Path | None = None, cfg: StackConfig = StackConfig(),
            progress: bool = True, n_val: int = 0) -> list[dict]:
    """The stack table: one row per variant with encoder and frame latency (interleaved, one
    run), size on disk, peak memory (if `run_dir` holds the variants' files), and `accuracy`'s
    fields on the eval split (reporting). With `n_val`, also `val_miou` and `val_ious` on that
    many validation scenes: what `choose` and `best_deployable` decide on."""
    # blocks of 5 consecutive frames: the steady state of a video stream (bench.compare's number)
    frames = bench.compare({n: v.frame for n, v in variants.items()}, warmup=2, repeats=repeats, number=5)
    encoders = bench.compare({n: v.encode for n, v in variants.items()}, warmup=1, repeats=repeats, number=5)
    acc = accuracy(variants, n_eval, progress=progress) if n_eval else {}
    val = accuracy(variants, n_val, progress=progress, split="val") if n_val else {}
    mem = peak_memory(list(variants), run_dir, cfg) if run_dir is not None else {}
    ref = next(iter(variants))
    rows = []
    for n, v in variants.items():
        rows.append({"name": n, "runtime": v.runtime, "encoder_s": encoders[n].median_s,
                     "median_s": frames[n].median_s, "iqr_s": frames[n].iqr_s,
                     "speedup": frames[ref].median_s / frames[n].median_s, "size_mb": v.size_mb,
                     "peak_mem_mb": mem.get(n), **acc.get(n, {})})
        if n in val:
            rows[-1].update(val_miou=val[n]["miou"], val_ious=val[n]["ious"])
    return rows


def roofline_base(name: str) -> tuple[str, tuple[str, ...]]:
    """The PyTorch variant whose FLOPs a variant runs, and the FLOP categories it runs in int8:
    W8A8 in PyTorch and ONNX Runtime's dynamic INT8 (`quantize_onnx`: MatMul and Gemm only)
    quantize the Linear layers; OpenVINO's NNCF INT8 also the convolutions (so its bound assumes
    both at the int8 rate)."""
    base = "student" if name.startswith("student") else "pruned" if name.startswith("pruned") else "reference"
    if "int8" not in name:
        return base, ()
    return base, ("Linear/MLP", "conv/patch embed") if name.startswith("openvino") else ("Linear/MLP",)


def with_roofline(rows: Sequence[dict], variants: Mapping[str, Variant], rates: Mapping[str, Mapping[str, float]],
                  points: np.ndarray | None = None) -> list[dict]:
    """`measure`'s rows with each frame's lower bound on this machine (`roofline_s`) and the
    fraction of it reached (`of_limit`), from the frame's FLOPs per dtype
    (section "Which runtime wins, and how far from the limit")."""
    image = scenes.SceneDataset("eval", 1).scene(0).image
    pts = frame_points() if points is None else points
    work = {}
    for r in rows:
        base, int8 = roofline_base(r["name"])
        sam = variants[base].sam
        work[r["name"]] = roofline.work_by_dtype(Frame(sam, pts), torch_input(sam, image), int8=int8, fake=False)
    return [roofline.annotate(r, work[r["name"]], rates) for r in rows]


def runtime_reading(rows: Sequence[dict], machine: Mapping[str, object]) -> str:
    """Which runtime runs tiny fastest on this CPU, and its INT8 against its FP32, read from
    `with_roofline`'s rows (section "Which runtime wins, and how far from the limit"):
    sentences built from the numbers."""
    by = {r["name"]: r for r in rows}
    fp32 = [(label, by[n]) for label, n in (("PyTorch", "reference"), ("ONNX Runtime", "ort fp32"),
                                            ("OpenVINO", "openvino fp32")) if n in by]
    label, win = min(fp32, key=lambda x: x[1]["encoder_s"])
    others = ", ".join(f"{lab} {r['encoder_s'] * 1e3:.2f} ms" for lab, r in fp32 if r is not win)
    vnni = "with" if machine.get("avx512_vnni") else "without"
    out = [f"FP32: {label} runs tiny's encoder fastest on this CPU ({machine.get('cpu')}), "
           f"{win['encoder_s'] * 1e3:.2f} ms against {others}; its frame reaches {win['of_limit']:.0%} "
           f"of this machine's limit, the reference's {by['reference']['of_limit']:.0%}."]
    for lab, q, f in (("ONNX Runtime", "ort int8", "ort fp32"), ("OpenVINO", "openvino int8", "openvino fp32")):
        if q in by and f in by:
            ratio = by[f]["encoder_s"] / by[q]["encoder_s"]
            verdict = "faster" if ratio > 1.05 else "slower" if ratio < 0.95 else "no faster"
            out.append(f"{lab} INT8 is {verdict} than its FP32 ({ratio:.2f}x on the encoder) on a CPU {vnni} "
                       f"AVX-512 VNNI, at mIoU {by[q]['miou']:.3f} vs {by[f]['miou']:.3f}.")
    return " ".join(out)


def prompt_sweep(makers: Mapping[str, Callable[[np.ndarray], Variant]], counts: Sequence[int] = (1, 4, 16),
                 repeats: int = 10) -> dict[int, dict[str, float]]:
    """Frame latency against the number of point prompts per frame
    (section "More prompts per frame"): the decoder runs once per prompt, so its share grows
    and caps the speed-up."""
    out = {}
    for n in counts:
        pts = frame_points(n)
        vs = {name: make(pts) for name, make in makers.items()}
        t = bench.compare({k: v.frame for k, v in vs.items()}, warmup=2, repeats=repeats, number=5)
        out[n] = {k: t[k].median_s for k in vs}
    return out


def best_deployable(rows: Sequence[dict], reference: str = "reference", slack: float = MIOU_SLACK,
                    key: str = "val_miou") -> dict:
    """The fastest frame whose mIoU (`key`: the validation split's, so that eval stays for
    reporting) is within `slack` of the reference's: the chapter's bar
    (section "Every variant, measured the same way")."""
    _require(rows, key)
    return _within_bar(rows, reference, slack, key)[0]


def _require(rows: Sequence[dict], key: str) -> None:
    if not any(r.get(key) is not None for r in rows):
        raise ValueError(f"no row has {key!r}: choices are made on the validation split (measure(..., n_val=...))")


def _within_bar(rows: Sequence[dict], reference: str, slack: float, key: str) -> list[dict]:
    """The rows whose `key` mIoU is within `slack` of `reference`'s, fastest frame first."""
    ref = next(r for r in rows if r["name"] == reference)
    return sorted((r for r in rows if r.get(key) is not None and r[key] >= ref[key] - slack), key=lambda r: r["median_s"])


def within_noise(a: dict, b: dict, ious: str = "val_ious") -> bool:
    """Whether two variants' mIoU differ by less than the noise: the 95% bootstrap interval of
    their paired per-object IoU differences (same scenes, same prompts) covers 0. Without
    per-object IoUs, only equal mIoU is a tie (section "Choosing a model under a latency budget")."""
    if a.get(ious) is None or b.get(ious) is None or len(a[ious]) != len(b[ious]):
        return False
    return evaluate.paired_ious(a[ious], b[ious])["within_noise"]


def choice_reading(rows: Sequence[dict], pick: dict, reference: str = "reference", slack: float = MIOU_SLACK,
                   key: str = "val_miou", ious: str = "val_ious") -> str:
    """Why `best_deployable` picked `pick`, in sentences built from the numbers: the variants
    that pass the bar on the validation split, and whether `pick`'s mIoU differs from the next
    fastest of them beyond the noise or ties with it, the tie broken by latency
    (section "Every variant, measured the same way")."""
    ref = next(r for r in rows if r["name"] == reference)
    ok = _within_bar(rows, reference, slack, key)
    out = [f"Chosen on the validation split ({len(pick.get(ious) or [])} objects): {pick['name']} has the fastest frame "
           f"({pick['median_s'] * 1e3:.2f} ms) of the {len(ok)} variants within {slack * 100:.0f} points of the "
           f"reference's val mIoU ({ref[key]:.3f})."]
    rival = next((r for r in ok if r is not pick), None)
    if rival is not None and pick.get(ious) is not None and rival.get(ious) is not None:
        p = evaluate.paired_ious(pick[ious], rival[ious])
        d, (lo, hi) = 100 * p["diff"], (100 * x for x in p["ci"])
        span = f"{d:+.1f} mIoU points [95% CI {lo:+.1f}, {hi:+.1f}]"
        if p["within_noise"]:
            out.append(f"The next fastest, {rival['name']} ({rival['median_s'] * 1e3:.2f} ms), differs from it by {span} "
                       "on val: within the noise, so the choice between them is a tie broken by latency.")
        else:
            better = pick["name"] if d > 0 else rival["name"]
            out.append(f"The next fastest, {rival['name']} ({rival['median_s'] * 1e3:.2f} ms), differs from it by {span} "
                       f"on val: beyond the noise, {better} is the more accurate of the two.")
    if pick.get("miou") is not None:
        out.append(f"Reported on eval: mIoU {pick['miou']:.3f} against the reference's {ref['miou']:.3f}.")
    return " ".join(out)


def stack_reading(rows: Sequence[dict], attention_variant: str = "sdpa") -> str:
    """What the agreement column means for a user, which variant departs most from the
    reference, and what the fused step bought, in sentences built from `measure`'s rows
    (section "Every variant, measured the same way")."""
    by = {r["name"]: r for r in rows}
    ref = rows[0]
    worst = min(rows, key=lambda r: r["agreement"])
    exact = [r["name"] for r in rows if r["agreement"] >= 0.999 and r is not ref]
    out = [f"Agreement is the mean IoU between a variant's mask and the PyTorch FP32 reference's mask for the same "
           f"prompt. For a user, the share of prompts that match (IoU {MATCH_IOU} or more with the reference's mask) "
           f"says how often the variant returns the mask the reference would have. {worst['name']} departs most: "
           f"agreement {worst['agreement']:.3f}, {worst['match_share']:.0%} of its prompts matched, mIoU "
           f"{worst['miou']:.3f} against the reference's {ref['miou']:.3f}."]
    if exact:
        out.append(f"Same masks as the reference (agreement 0.999 or more): {', '.join(exact)}.")
    for name in ("student", "pruned"):
        if name in by and by[name] is not worst:
            out.append(f"{name}: agreement {by[name]['agreement']:.3f}, {by[name]['match_share']:.0%} of prompts matched.")
    if "fused" in by:
        f = by["fused"]
        gap, spread = f["median_s"] - ref["median_s"], max(f["iqr_s"], ref["iqr_s"])
        verdict = ("within the timing spread of the reference's" if abs(gap) <= spread
                   else "faster than the reference's" if gap < 0 else "slower than the reference's")
        out.append(f"The fused step (chapter 01's `{attention_variant}` attention) runs the frame in "
                   f"{f['median_s'] * 1e3:.2f} ms against {ref['median_s'] * 1e3:.2f} ms ({f['speedup']:.2f}x, "
                   f"interquartile spread up to {spread * 1e3:.2f} ms): {verdict}.")
    return " ".join(out)


def runtime_agreement_reading(rows: Sequence[dict]) -> str:
    """Each runtime and INT8 row against the PyTorch FP32 step of the same model (`same_model`),
    kept apart from what distillation or pruning changed (agreement with the tiny reference),
    in sentences built from the numbers (section "ONNX Runtime against PyTorch")."""
    by = {r["name"]: r for r in rows}
    edge = [r for r in rows if r["name"] in EDGE_VARIANTS and "same_model_agreement" in r]
    out = []
    if edge:
        out.append("Agreement with the same model in PyTorch FP32 (tiny's reference or the student): "
                   + ", ".join(f"{r['name']} {r['same_model_agreement']:.3f}" for r in edge) + ".")
        worst = min(edge, key=lambda r: r["same_model_agreement"])
        out.append(f"Of the runtime rows, {worst['name']} departs most from its own PyTorch model "
                   f"({worst['same_model_agreement']:.3f}).")
    if "student" in by:
        s = by["student"]
        out.append(f"The student itself agrees with tiny's masks at {s['agreement']:.3f} ({s['match_share']:.0%} of "
                   f"prompts matched at IoU {MATCH_IOU}): that is distillation's departure, which every runtime of "
                   "the student inherits, not the runtime's.")
    return " ".join(out)


def stack_table(rows: Sequence[dict]) -> str:
    """A text table of `measure`'s rows."""
    head = (f"{'variant':18s} {'runtime':12s} {'encoder ms':>10s} {'frame ms':>9s} {'speed-up':>8s} "
            f"{'size MB':>8s} {'peak MB':>8s} {'mIoU':>6s} {'agree':>6s}")
    lines = [head]
    for r in rows:
        mem = f"{r['peak_mem_mb']:8.1f}" if r.get("peak_mem_mb") is not None else f"{'-':>8s}"
        acc = f"{r['miou']:6.3f} {r['agreement']:6.3f}" if "miou" in r else f"{'-':>6s} {'-':>6s}"
        lines.append(f"{r['name']:18s} {r['runtime']:12s} {r['encoder_s'] * 1e3:10.2f} {r['median_s'] * 1e3:9.2f} "
                     f"{r['speedup']:7.2f}x {r['size_mb']:8.2f} {mem} {acc}")
    return "\n".join(lines)


# ================================================================ choosing under a budget

def choose(rows: Sequence[dict], budget_s: float, latency: Mapping[str, float] | None = None,
           key: str = "val_miou", ious: str = "val_ious") -> dict | None:
    """The most accurate variant whose frame fits `budget_s` (section "Choosing a model under a latency budget").

    Accuracy is `key`, the validation split's mIoU (eval is for reporting). The variants whose
    mIoU is within the noise of the most accurate one's (`within_noise`, from the per-object
    IoUs in `ious`) tie with it, and the tie goes to the fastest. Returns a copy of the chosen
    row with `tied`: the tied variants' names, fastest first (the choice alone: no tie).
    `latency` overrides the rows' measured `median_s` (e.g. re-measured on a busier machine).
    None when nothing fits.
    """
    _require(rows, key)
    lat = {r["name"]: (latency or {}).get(r["name"], r["median_s"]) for r in rows}
    fits = [r for r in rows if lat[r["name"]] <= budget_s and r.get(key) is not None]
    if not fits:
        return None
    top = max(fits, key=lambda r: (r[key], -lat[r["name"]]))
    tied = sorted((r for r in fits if r is top or within_noise(r, top, ious)), key=lambda r: lat[r["name"]])
    return {**tied[0], "tied": [r["name"] for r in tied]}


def budget_table(rows: Sequence[dict], budgets_s: Iterable[float],
                 latency: Mapping[str, float] | None = None, key: str = "val_miou",
                 ious: str = "val_ious") -> list[dict]:
    """For each budget: the chosen variant (`choose`, on the validation split), its latency, its
    val and eval mIoU, the variants it tied with, and the eval mIoU paid against the variant
    with the best val mIoU overall."""
    _require(rows, key)
    best = max((r for r in rows if r.get(key) is not None), key=lambda r: r[key])
    out = []
    for b in budgets_s:
        c = choose(rows, b, latency, key, ious)
        lat = None if c is None else (latency or {}).get(c["name"], c["median_s"])
        paid = None if c is None or c.get("miou") is None or best.get("miou") is None else best["miou"] - c["miou"]
        out.append({"budget_s": b, "choice": None if c is None else c["name"], "median_s": lat,
                    "val_miou": None if c is None else c[key], "miou": None if c is None else c.get("miou"),
                    "tied": [] if c is None else c["tied"], "paid": paid})
    return out


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextmanager
def busy(workers: int) -> Iterator[None]:
    """`workers` processes that keep a core each busy: the machine gets busier."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(0.3 if workers else 0)
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def drift(variants: Mapping[str, Variant], loads: Sequence[int] = (0, 1), repeats: int = 10) -> dict[int, dict[str, float]]:
    """Frame latency of each variant re-measured with 0, 1, ... busy processes beside it."""
    out = {}
    for w in loads:
        with busy(w):
            t = bench.compare({n: v.frame for n, v in variants.items()}, warmup=1, repeats=repeats, number=5)
        out[w] = {n: t[n].median_s for n in variants}
    return out


# ================================================================ FLOPs vs runtime by layer kind

LAYER_KINDS = {"convolutions": ("conv/patch embed",), "attention": ("attention matmuls", "softmax", "rel-pos bias"),
               "Linear": ("Linear/MLP",), "norms": ("norms",), "other": ("other",)}


def _by_kind(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(sum(values.get(c, 0) for c in cats)) for k, cats in LAYER_KINDS.items()}


def layer_kinds(variants: Mapping[str, Variant], points: np.ndarray, image: np.ndarray,
                repeats: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    """Time share (torch.profiler, median of `repeats`) and FLOPs share (flop_counter) of one
    frame by layer kind, for each PyTorch FP32 variant (section "Where FLOPs mislead")."""
    out = {}
    for name, v in variants.items():
        if v.sam is None or any(p.dtype != torch.float32 for p in v.sam.parameters()) or "int8" in name:
            continue
        frame = Frame(v.sam, points)
        x = torch_input(v.sam, image)
        with torch.inference_mode():
            runs = [profiling.profile_categories(frame, x)[0] for _ in range(repeats)]
        seconds = {c: float(np.median([r[c] for r in runs])) for c in profiling.CATEGORIES}
        out[name] = {"time": _by_kind(seconds), "flops": _by_kind(profiling.flop_categories(frame, x, fake=False))}
    return out


# ================================================================ the poster's initial-vs-final table

def initial_final(names: Sequence[str] = ("vit_b",), img_size: int = 1024, batch: int = 1,
                  repeats: int = 2, final_attention: str = "fused", final_quant: str = "w8a8_fbgemm",
                  progress: bool = True, openvino: Sequence[str] = (),
                  run_dir: str | Path | None = None) -> list[dict]:
    """SAM's encoder as shipped (initial) against our stack (final: chapter 01's attention and
    chapter 03's INT8), random weights, timing only (section "The poster's table").

    For the models named in `openvino`, the same encoder exported to ONNX runs on OpenVINO too,
    FP32 and INT8 (NNCF, calibrated on two train-split scenes: the weights are random, so only its
    time means anything), raced with the other two: `openvino_fp32_s`, `openvino_int8_s` and their
    relative errors against the initial encoder. Exporting and quantizing vit_l and vit_h at
    1024 px takes far more memory than timing them (notebook 05's full profile with all three
    passed 23 GB; with vit_b alone it peaks at 15.5 GB), hence a list. Files go to `run_dir` (a temporary folder if None)."""
    import tempfile
    rows = []
    for name in tqdm(names, desc="initial vs final", disable=not progress, leave=False):
        sam = models.timing_model(name, img_size)
        final, _ = quantization.make_variant(attention.set_attention(copy.deepcopy(sam), final_attention), final_quant)
        x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        fns = {"initial": lambda m=sam: m.image_encoder(x), "final": lambda m=final: m.image_encoder(x)}
        with tempfile.TemporaryDirectory() as tmp:
            if name in openvino:
                fns.update(_openvino_encoders(sam, Path(run_dir or tmp) / f"{name}_{img_size}", x))
            with torch.inference_mode():
                t = {r["name"]: r for r in bench.race(fns, "initial", warmup=1, repeats=repeats)}
        row = {"model": name, "params": models.count_params(sam.image_encoder), "img_size": img_size,
               "batch": batch, "initial_s": t["initial"]["median_s"] / batch,
               "final_s": t["final"]["median_s"] / batch, "rel_err": t["final"]["rel_err"], "weights": "random"}
        for v in ("openvino fp32", "openvino int8"):
            if v in t:
                key = v.replace(" ", "_")
                row[f"{key}_s"], row[f"{key}_rel_err"] = t[v]["median_s"] / batch, t[v]["rel_err"]
        rows.append(row)
        del sam, final, fns, t  # the race entries hold the models and OpenVINO sessions: free them
        gc.collect()            # before the next (larger) model is built
    return rows


def _openvino_encoders(sam: Sam, folder: Path, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """`sam`'s encoder on OpenVINO, FP32 and NNCF INT8 (two train-split scenes), as race entries on `x`."""
    from .edge import load_session
    folder = _run_folder(folder)
    onnx_path = export_encoder(sam, folder / "encoder.onnx", "the encoder")
    calib = [{"image": torch_input(sam, scenes.make_scene(s).image).cpu().numpy()} for s in scenes.split_seeds("train", 2)]
    files = {"openvino fp32": to_openvino(onnx_path, folder / "encoder.xml"),
             "openvino int8": to_openvino(onnx_path, folder / "encoder_int8.xml", calib)}
    feeds = {"image": x.numpy()}
    sessions = {n: load_session(str(f), "openvino", torch.get_num_threads()) for n, f in files.items()}
    return {n: (lambda s=s: torch.from_numpy(s.run(feeds)[0])) for n, s in sessions.items()}
