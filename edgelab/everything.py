"""Segment everything on a CPU: SAM's automatic mask generator, timed in parts and scored.

Chapter 05's "segment everything" study (`edgelab bench everything`). `SamAutomaticMaskGenerator`
prompts the model with a grid of points, decodes them in batches, keeps the masks whose
predicted IoU and stability pass its thresholds, and removes duplicates with box NMS. Here its
time per image is split into the image encoder, the decoder batches and the rest (filtering,
NMS, mask encoding), and its masks are scored against the scenes' exact instance masks: the
recall of ground-truth objects at IoU 0.5 and 0.75 (an object counts when some generated mask
covers it that well) and COCO mask AP (pycocotools), which also charges the masks that match
nothing. The fast path also runs on an edge runtime (`runtime_model`): the image
encoder and a grid decoder graph (`GridDecoderForExport`) on ONNX Runtime or OpenVINO, the
filters and NMS unchanged.
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as rle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import scenes

# decode(model, image embedding (1, C, h, w), points (N, 2) in input pixels) -> (low-res logits of
# SAM's three masks (N, 3, 4h, 4w), their predicted IoU (N, 3)); default `attention.decode_shared`
Decoder = Callable[[Sam, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EverythingConfig:
    """The generator's knobs (SAM's names); thresholds below SAM's own suit a small model."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.5  # chosen on 6 validation scenes with the shipped tiny (SAM: 0.88)
    stability_score_thresh: float = 0.8  # (SAM: 0.95, which keeps no mask of the shipped tiny)
    box_nms_thresh: float = 0.7
    fast: bool = False  # the fast decoder path (`fast_generate`) instead of SamAutomaticMaskGenerator
    skip_covered: bool = False  # with `fast`: coarse grid first, then only the points no mask covers
    cover_iou_thresh: float = 0.8  # with `skip_covered`: masks this sure (predicted IoU) cover their points
    # (0.8: recall as without skipping on 30 validation scenes; 0.7 lost objects, 0.9 skipped less)

    def check(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be 1 or more")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "cover_iou_thresh"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")


@contextmanager
def _timed(obj: object, method: str, seconds: list[float]) -> Iterator[None]:
    """Add the time of every call of obj.method to `seconds` while inside."""
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    setattr(obj, method, wrapper)
    try:
        yield
    finally:
        setattr(obj, method, original)


def generate(model: Sam, image: np.ndarray, cfg: EverythingConfig = EverythingConfig(),
             decode: Decoder | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every mask the generator keeps for `image` ((M, H, W) bool), each one's score (SAM's predicted
    IoU, (M,)) and the time in parts (seconds). A `decode` other than PyTorch's (an edge runtime's,
    `runtime_model`) needs the fast path."""
    if cfg.fast:
        return fast_generate(model, image, cfg, decode)
    if decode is not None:
        raise ValueError("a runtime decoder runs only on the fast path (EverythingConfig(fast=True))")
    gen = SamAutomaticMaskGenerator(model, points_per_side=cfg.points_per_side,
                                    points_per_batch=cfg.points_per_batch, pred_iou_thresh=cfg.pred_iou_thresh,
                                    stability_score_thresh=cfg.stability_score_thresh,
                                    box_nms_thresh=cfg.box_nms_thresh)
    enc: list[float] = []
    dec: list[float] = []
    t0 = time.perf_counter()
    with _timed(gen.predictor, "set_image", enc), _timed(gen.predictor, "predict_torch", dec), torch.inference_mode():
        found = gen.generate(image)
    total = time.perf_counter() - t0
    masks = np.stack([m["segmentation"] for m in found]) if found else np.zeros((0, *image.shape[:2]), bool)
    scores = np.array([m["predicted_iou"] for m in found], dtype=np.float32)
    return masks, scores, {"total_s": total, "encoder_s": sum(enc), "decoder_s": sum(dec),
                   "post_s": total - sum(enc) - sum(dec), "decoder_batches": len(dec)}


def _masks_for(model: Sam, pred: SamPredictor, pts: torch.Tensor, cfg: EverythingConfig,
               times: dict[str, float], decode: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `pts` in batches (`attention.decode_shared`: one image embedding for every prompt), keep the masks whose
    predicted IoU passes, upscale only those, keep the stable ones: (masks bool, scores)."""
    from segment_anything.utils.amg import calculate_stability_score

    t0 = time.perf_counter()
    outs = [decode(model, pred.features, chunk) for chunk in pts.split(cfg.points_per_batch)]
    low = torch.cat([o[0] for o in outs]).flatten(0, 1)
    iou = torch.cat([o[1] for o in outs]).flatten()
    t1 = time.perf_counter()
    keep = iou > cfg.pred_iou_thresh
    logits = model.postprocess_masks(low[keep][:, None], pred.input_size, pred.original_size)[:, 0]
    stable = calculate_stability_score(logits, model.mask_threshold, 1.0) >= cfg.stability_score_thresh
    times["decoder_s"] += t1 - t0
    times["post_s"] += time.perf_counter() - t1
    times["decoder_batches"] += len(outs)
    return logits[stable] > model.mask_threshold, iou[keep][stable]


def _coarse_to_fine(model: Sam, pred: SamPredictor, pts: torch.Tensor, grid: np.ndarray, cfg: EverythingConfig,
                    times: dict[str, float], decode: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid in rounds, every 4th point, then every 2nd, then the rest, each round decoding
    only the points that no mask found so far (with predicted IoU >= cover_iou_thresh) covers."""
    n = cfg.points_per_side
    i, j = np.divmod(np.arange(n * n), n)
    todo = np.ones(n * n, bool)
    xy = np.minimum(grid.astype(int), [pred.original_size[1] - 1, pred.original_size[0] - 1])
    masks = torch.zeros(0, *pred.original_size, dtype=torch.bool)
    scores = torch.zeros(0)
    for step in (4, 2, 1):
        t0 = time.perf_counter()
        level = (i % step == 0) & (j % step == 0)
        now, todo = todo & level, todo & ~level
        sure = masks[scores >= cfg.cover_iou_thresh]
        if len(sure) and now.any():
            idx = np.flatnonzero(now)
            now[idx[sure[:, xy[idx, 1], xy[idx, 0]].any(0).numpy()]] = False
        times["post_s"] += time.perf_counter() - t0
        if now.any():
            more, more_scores = _masks_for(model, pred, pts[torch.from_numpy(now)], cfg, times, decode)
            masks, scores = torch.cat([masks, more]), torch.cat([scores, more_scores])
    return masks, scores


@torch.inference_mode()
def fast_generate(model: Sam, image: np.ndarray, cfg: EverythingConfig = EverythingConfig(),
                  decode: Decoder | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """SAM's automatic mask generation for one crop, with the decoder's work cut (section
    "Segment everything"): the predicted-IoU filter runs on the low-resolution masks, so only the
    survivors are upscaled for the stability score, and there is no RLE round trip. With
    `cfg.skip_covered`, coarse to fine (`_coarse_to_fine`): a grid point that a sure mask already
    covers is not decoded. The same thresholds, stability score and box NMS as
    `SamAutomaticMaskGenerator`. `decode` runs the decoder batches (default: PyTorch's
    `attention.decode_shared`; `runtime_model` gives an edge runtime's)."""
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid
    from torchvision.ops import batched_nms

    from .attention import decode_shared
    decode = decode or decode_shared

    pred = SamPredictor(model)
    t0 = time.perf_counter()
    pred.set_image(image)
    times = {"encoder_s": time.perf_counter() - t0, "decoder_s": 0.0, "post_s": 0.0, "decoder_batches": 0}
    h, w = image.shape[:2]
    grid = build_point_grid(cfg.points_per_side) * np.array([[w, h]])
    pts = torch.as_tensor(pred.transform.apply_coords(grid, (h, w)), dtype=torch.float, device=model.device)
    if cfg.skip_covered:
        masks, scores = _coarse_to_fine(model, pred, pts, grid, cfg, times, decode)
    else:
        masks, scores = _masks_for(model, pred, pts, cfg, times, decode)
    t2 = time.perf_counter()
    kept = batched_nms(batched_mask_to_box(masks).float(), scores, torch.zeros_like(scores), cfg.box_nms_thresh)
    out = masks[kept].cpu().numpy()
    times["post_s"] += time.perf_counter() - t2
    return out, scores[kept].cpu().numpy(), {"total_s": time.perf_counter() - t0, **times}


def best_ious(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each ground-truth mask, its best IoU with any predicted mask (0 when none)."""
    if len(predicted) == 0:
        return np.zeros(len(truth))
    p = torch.from_numpy(predicted.reshape(len(predicted), -1)).float()
    t = torch.from_numpy(truth.reshape(len(truth), -1)).float()
    inter = t @ p.T
    union = t.sum(1, keepdim=True) + p.sum(1)[None] - inter
    return (inter / union.clamp(min=1)).max(dim=1).values.numpy()


def mask_ap(images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """COCO mask AP of generated masks against the scenes' instance masks, by pycocotools' COCOeval
    (iouType "segm", one class, up to 100 masks per image, ranked by their scores): AP averaged over
    IoU 0.5:0.95, AP at 0.5 and at 0.75. `images`: (masks (M, H, W), scores (M,), truth (K, H, W)).
    Where recall asks whether each object was found, AP also charges the extra masks (section
    "Segment everything")."""
    def encode(m: np.ndarray) -> dict:
        return rle.encode(np.asfortranarray(m.astype(np.uint8)))

    gt: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    found = []
    for i, (masks, scores, truth) in enumerate(images):
        gt["images"].append({"id": i, "height": truth.shape[1], "width": truth.shape[2]})
        for m in truth:
            r = encode(m)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "segmentation": r, "area": float(m.sum()), "bbox": rle.toBbox(r).tolist(),
                                      "iscrowd": 0})
        found += [{"image_id": i, "category_id": 1, "segmentation": encode(m), "score": float(s)}
                  for m, s in zip(masks, scores)]
    if not found:
        return {"mask_ap": 0.0, "mask_ap50": 0.0, "mask_ap75": 0.0}
    with redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(found), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mask_ap": float(ev.stats[0]), "mask_ap50": float(ev.stats[1]), "mask_ap75": float(ev.stats[2])}


def score(model: Sam, seeds: Sequence[int], cfg: EverythingConfig = EverythingConfig(),
          progress: bool = False, decode: Decoder | None = None) -> dict:
    """Recall at IoU 0.5 and 0.75 over the objects of the scenes of `seeds`, COCO mask AP
    (`mask_ap`), masks per image, and the median time per image in parts (the first image is a
    warm-up and is not timed)."""
    cfg.check()
    ious, parts, n_masks, found = [], [], [], []
    warm = scenes.make_scene(seeds[0])
    generate(model, warm.image, cfg, decode)
    for seed in tqdm(seeds, desc="segment everything", disable=not progress, leave=False):
        s = scenes.make_scene(seed)
        masks, scores, t = generate(model, s.image, cfg, decode)
        ious.append(best_ious(masks, s.masks))
        found.append((masks, scores, s.masks))
        parts.append(t)
        n_masks.append(len(masks))
    allv = np.concatenate(ious)
    med = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return {"median_s": med["total_s"], "encoder_s": med["encoder_s"], "decoder_s": med["decoder_s"],
            "post_s": med["post_s"], "decoder_batches": int(med["decoder_batches"]),
            "recall_50": float((allv >= 0.5).mean()), "recall_75": float((allv >= 0.75).mean()),
            **mask_ap(found), "masks_per_image": float(np.mean(n_masks)), "objects": int(len(allv)),
            "images": len(seeds), "config": asdict(cfg)}


def bench_everything(variants: Mapping[str, Sam | tuple], seeds: Sequence[int],
                     cfg: EverythingConfig = EverythingConfig(), weights: str = "trained",
                     progress: bool = False) -> dict:
    """`edgelab bench everything`: `score` for each variant on the same scenes, as a bench record
    (the first variant is the reference; speed-ups against it). A variant is a model (run with
    `cfg`), a (model, its own config) pair, or a (model, config, decoder) triple (`runtime_model`)."""
    from .bench import bench_record
    rows, extra = [], {}
    for name, v in variants.items():
        model, vcfg, decode = (*v, None)[:3] if isinstance(v, tuple) else (v, cfg, None)
        r = score(model, seeds, vcfg, progress=progress, decode=decode)
        rows.append({"name": name, **{k: r[k] for k in ("median_s", "encoder_s", "decoder_s", "post_s",
                                                         "recall_50", "recall_75", "mask_ap")}})
        extra[name] = {"masks_per_image": r["masks_per_image"], "decoder_batches": r["decoder_batches"],
                       "mask_ap50": r["mask_ap50"], "mask_ap75": r["mask_ap75"],
                       "config": r["config"]}
    record = bench_record(rows[0]["name"], weights, rows)
    base = rows[0]["median_s"]
    record["everything"] = {"config": asdict(cfg), "images": len(seeds), "objects": r["objects"],
                            "speedup": {row["name"]: base / row["median_s"] for row in rows}, "per_variant": extra}
    return record


# =============================================================== on an edge runtime

class GridDecoderForExport(nn.Module):
    """`attention.decode_shared` as one graph, for a runtime: the image embedding (1, C, h, w)
    and N single-point prompts (N, 2) in input pixels -> SAM's three low-resolution masks
    (N, 3, 4h, 4w) and their predicted IoU (N, 3). The points are padded with SAM's "not a
    point" as `SamPredictor` pads them; the point encoding is segment_anything's SamOnnxModel's."""

    def __init__(self, sam: Sam):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel
        self.onnx = SamOnnxModel(sam, return_single_mask=False)
        self.sam = sam

    def forward(self, image_embeddings: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .attention import _predict_masks_per_prompt
        n = points.shape[0]
        coords = torch.cat([points[:, None, :], torch.zeros(n, 1, 2)], dim=1)
        labels = torch.cat([torch.ones(n, 1), -torch.ones(n, 1)], dim=1)
        pe = self.sam.prompt_encoder
        h, w = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        return _predict_masks_per_prompt(self.sam.mask_decoder, image_embeddings, pe.get_dense_pe(),
                                         self.onnx._embed_points(coords, labels), dense)


class RuntimeEncoder(nn.Module):
    """Stands in for a Sam's image encoder and runs an edge runtime's session instead, so that
    `SamPredictor` (its resizing, normalising and padding) drives the runtime unchanged."""

    def __init__(self, session, img_size: int):
        super().__init__()
        self.session, self.img_size = session, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run({"image": x.numpy()})[0])


def runtime_model(sam: Sam, run_dir: str | Path, runtime: str = "onnxruntime", prefix: str = "tiny",
                  threads: int | None = None) -> tuple[Sam, Decoder]:
    """`sam` exported to `run_dir` and loaded on `runtime` ("onnxruntime" or "openvino", FP32):
    a Sam whose image encoder runs the exported encoder, and a `Decoder` that runs the exported
    grid decoder, for `fast_generate` (section "Segment everything"). The prompt encoder and mask
    decoder modules of the returned Sam are `sam`'s own (the filters need only its threshold)."""
    import copy

    from . import deploy, edge
    threads = threads or torch.get_num_threads()
    model = copy.deepcopy(sam).cpu().eval()
    folder = deploy._run_folder(run_dir)
    enc_path = deploy.export_encoder(model, folder / f"{prefix}_encoder.onnx", prefix)
    dec_path = folder / f"{prefix}_grid_decoder.onnx"
    emb = torch.zeros(1, *model.prompt_encoder.get_dense_pe().shape[1:])
    deploy._export(GridDecoderForExport(model), (emb, torch.rand(2, 2) * model.image_encoder.img_size), dec_path,
                   ["image_embeddings", "points"], ["low_res_masks", "iou_predictions"],
                   {"points": {0: "prompts"}, "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}},
                   f"{prefix}'s grid decoder")
    enc = edge.load_session(str(enc_path), runtime, threads)
    dec = edge.load_session(str(dec_path), runtime, threads)
    proxy = Sam(RuntimeEncoder(enc, model.image_encoder.img_size), model.prompt_encoder, model.mask_decoder,
                model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()).eval()

    def decode(_model: Sam, embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, iou = dec.run({"image_embeddings": embedding.numpy(), "points": points.numpy()})
        return torch.from_numpy(low), torch.from_numpy(iou)

    return proxy, decode


def runtime_reading(rows: Sequence[dict], base: str = "fast, coarse to fine",
                    runtimes: Sequence[str] = ("onnxruntime", "openvino")) -> str:
    """Each edge runtime's decoder batches against PyTorch's on the same points (the row named
    `base`; a runtime's row is named "<runtime>, " + `base`), and whether its recall and mask AP
    moved, in sentences built from `bench_everything`'s rows
    (notebook 05, section "Segment everything on a CPU"). A ratio within 5% reads as about the same."""
    by = {r["name"]: r for r in rows}
    if base not in by:
        return ""
    ref, out = by[base], []
    for rt in runtimes:
        r = by.get(f"{rt}, {base}")
        if r is None:
            continue
        ratio = r["decoder_s"] / ref["decoder_s"]
        verdict = "cheaper than" if ratio < 0.95 else "dearer than" if ratio > 1.05 else "about the same as"
        scores = (("recall_50", "recall@0.5"), ("recall_75", "recall@0.75"), ("mask_ap", "mask AP"))
        moved = [f"{label} {r[k]:.3f} vs {ref[k]:.3f}" for k, label in scores if abs(r[k] - ref[k]) > 1e-9]
        quality = ("the same recall and mask AP" if not moved else ", ".join(moved))
        out.append(f"On {rt} the decoder batches cost {r['decoder_s']:.3f} s per image against PyTorch's "
                   f"{ref['decoder_s']:.3f} s on the same points ({ratio:.2f}x): {verdict} PyTorch's decoder; "
                   f"{r['median_s']:.2f} s against {ref['median_s']:.2f} s per image in all; {quality}.")
    return " ".join(out)
