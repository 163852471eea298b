"""Segment everything on a CPU: SAM's automatic mask generator, timed in parts and scored.

Chapter 05's "segment everything" study (`edgelab bench everything`). `SamAutomaticMaskGenerator`
prompts the model with a grid of points, decodes them in batches, keeps the masks whose
predicted IoU and stability pass its thresholds, and removes duplicates with box NMS. Here its
time per image is split into the image encoder, the decoder batches and the rest (filtering,
NMS, mask encoding), and its masks are scored against the scenes' exact instance masks: the
recall of ground-truth objects at IoU 0.5 and 0.75 (an object counts when some generated mask
covers it that well).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import scenes


@dataclass(frozen=True)
class EverythingConfig:
    """The generator's knobs (SAM's names); thresholds below SAM's own suit a small model."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.5  # chosen on 6 validation scenes with the shipped tiny (SAM: 0.88)
    stability_score_thresh: float = 0.8  # (SAM: 0.95, which keeps no mask of the shipped tiny)
    box_nms_thresh: float = 0.7

    def check(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be 1 or more")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
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


def generate(model: Sam, image: np.ndarray, cfg: EverythingConfig = EverythingConfig()) -> tuple[np.ndarray, dict]:
    """Every mask the generator keeps for `image` ((M, H, W) bool) and its time in parts (seconds)."""
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
    return masks, {"total_s": total, "encoder_s": sum(enc), "decoder_s": sum(dec),
                   "post_s": total - sum(enc) - sum(dec), "decoder_batches": len(dec)}


def best_ious(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each ground-truth mask, its best IoU with any predicted mask (0 when none)."""
    if len(predicted) == 0:
        return np.zeros(len(truth))
    p = torch.from_numpy(predicted.reshape(len(predicted), -1)).float()
    t = torch.from_numpy(truth.reshape(len(truth), -1)).float()
    inter = t @ p.T
    union = t.sum(1, keepdim=True) + p.sum(1)[None] - inter
    return (inter / union.clamp(min=1)).max(dim=1).values.numpy()


def score(model: Sam, seeds: Sequence[int], cfg: EverythingConfig = EverythingConfig(),
          progress: bool = False) -> dict:
    """Recall at IoU 0.5 and 0.75 over the objects of the scenes of `seeds`, masks per image, and
    the median time per image in parts (the first image is a warm-up and is not timed)."""
    cfg.check()
    ious, parts, n_masks = [], [], []
    warm = scenes.make_scene(seeds[0])
    generate(model, warm.image, cfg)
    for seed in tqdm(seeds, desc="segment everything", disable=not progress, leave=False):
        s = scenes.make_scene(seed)
        masks, t = generate(model, s.image, cfg)
        ious.append(best_ious(masks, s.masks))
        parts.append(t)
        n_masks.append(len(masks))
    allv = np.concatenate(ious)
    med = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return {"median_s": med["total_s"], "encoder_s": med["encoder_s"], "decoder_s": med["decoder_s"],
            "post_s": med["post_s"], "decoder_batches": int(med["decoder_batches"]),
            "recall_50": float((allv >= 0.5).mean()), "recall_75": float((allv >= 0.75).mean()),
            "masks_per_image": float(np.mean(n_masks)), "objects": int(len(allv)), "images": len(seeds),
            "config": asdict(cfg)}


def bench_everything(variants: dict[str, Sam], seeds: Sequence[int], cfg: EverythingConfig = EverythingConfig(),
                     weights: str = "trained", progress: bool = False) -> dict:
    """`edgelab bench everything`: `score` for each variant on the same scenes, as a bench record
    (the first variant is the reference; speed-ups against it)."""
    from .bench import bench_record
    rows, extra = [], {}
    for name, model in variants.items():
        r = score(model, seeds, cfg, progress=progress)
        rows.append({"name": name, **{k: r[k] for k in ("median_s", "encoder_s", "decoder_s", "post_s",
                                                         "recall_50", "recall_75")}})
        extra[name] = {"masks_per_image": r["masks_per_image"], "decoder_batches": r["decoder_batches"]}
    record = bench_record(rows[0]["name"], weights, rows)
    base = rows[0]["median_s"]
    record["everything"] = {"config": asdict(cfg), "images": len(seeds), "objects": r["objects"],
                            "speedup": {row["name"]: base / row["median_s"] for row in rows}, "per_variant": extra}
    return record
