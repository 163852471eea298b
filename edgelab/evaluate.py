"""The evaluation protocol: prompts from ground truth, SAM's best mask, mIoU and agreement.

Taught in notebook 00, section "How we score a model". One point per object (its centre of mass
when that lies in the mask, else the point farthest from the boundary), or its bounding box;
SAM returns three masks for a point and we keep the one with the highest predicted IoU.
mIoU is the mean over all objects of the split. Without ground truth (a folder of photos),
the score is agreement: mIoU of a model's masks against a reference model's masks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import scenes as scenes_mod

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Intersection over union of two boolean masks; two empty masks agree perfectly (1.0)."""
    a = torch.as_tensor(np.asarray(a, bool) if not torch.is_tensor(a) else a).bool()
    b = torch.as_tensor(np.asarray(b, bool) if not torch.is_tensor(b) else b).bool()
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def point_prompt(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the object's prompt point: centre of mass if inside the mask, else the farthest
    point from the boundary (SAM-fast's rule). Pixel centres, in image coordinates."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("cannot place a prompt in an empty mask")
    cy, cx = ndimage.center_of_mass(mask)
    iy, ix = int(round(cy)), int(round(cx))
    if not mask[iy, ix]:
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(ix), float(iy)


def box_prompt(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) bounding box of the mask, inclusive pixel coordinates."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if len(xs) == 0:
        raise ValueError("cannot box an empty mask")
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


@torch.no_grad()
def predict_masks(predictor: SamPredictor, image: np.ndarray, masks: np.ndarray | None = None,
                  prompt: str = "point", points: np.ndarray | None = None,
                  boxes: np.ndarray | None = None) -> np.ndarray:
    """Segment every object of one image in one batched decoder call; return (N, H, W) bool.

    Prompts come from ground-truth `masks` (the protocol) unless `points` (N, 2) or `boxes`
    (N, 4) are given. Points keep the best of SAM's three masks by predicted IoU; boxes are
    unambiguous and use SAM's single-mask output.
    """
    predictor.set_image(image)
    if points is None and boxes is None:
        if masks is None:
            raise ValueError("predict_masks needs ground-truth masks, points or boxes to prompt with")
        if prompt == "point":
            points = np.array([point_prompt(m) for m in masks], np.float32)
        elif prompt == "box":
            boxes = np.array([box_prompt(m) for m in masks], np.float32)
        else:
            raise ValueError(f"prompt must be 'point' or 'box', not {prompt!r}")
    dev = predictor.device
    size = image.shape[:2]
    if points is not None:
        pts = predictor.transform.apply_coords(np.asarray(points, np.float32)[:, None, :], size)
        pts = torch.as_tensor(pts, dtype=torch.float, device=dev)
        labels = torch.ones(pts.shape[:2], dtype=torch.int, device=dev)
        out, scores, _ = predictor.predict_torch(pts, labels, multimask_output=True)
        best = scores.argmax(dim=1)
        out = out[torch.arange(len(out)), best]
    else:
        bx = predictor.transform.apply_boxes(np.asarray(boxes, np.float32), size)
        bx = torch.as_tensor(bx, dtype=torch.float, device=dev)
        out, _, _ = predictor.predict_torch(None, None, boxes=bx, multimask_output=False)
        out = out[:, 0]
    return out.cpu().numpy()


SIZE_BINS = {"small": (0, 300), "medium": (300, 4000), "large": (4000, None)}  # object area, px


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling objects), e.g. mIoU's.

    Taught in notebook 00, section "How we score a model": a few dozen scenes move mIoU by a
    point or two, so every mIoU is reported with this interval.
    """
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: "EvalResult", b: "EvalResult") -> dict:
    """mIoU of `a` minus `b` on the same objects, with a 95% bootstrap interval of the paired
    per-object differences; `within_noise` when the interval contains 0 (taught in notebook 02,
    "20 / 40 / 60% and fine-tuning": compare models on the same scenes, not by two separate intervals)."""
    if len(a.per_object) != len(b.per_object) or a.prompt != b.prompt:
        raise ValueError("a paired difference needs two results on the same scenes and prompts")
    return paired_ious(a.per_object, b.per_object)


def paired_ious(a: Sequence[float], b: Sequence[float]) -> dict:
    """`paired_difference` on two lists of per-object IoUs (the same objects, in the same order)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = bootstrap_ci(d)
    return {"diff": float(d.mean()), "ci": (lo, hi), "within_noise": bool(lo <= 0.0 <= hi), "n": len(d)}


def describe_difference(name_a: str, a: "EvalResult", name_b: str, b: "EvalResult") -> str:
    """One sentence on whether `a` beats `b`, generated from `paired_difference`."""
    p = paired_difference(a, b)
    lo, hi = (100 * x for x in p["ci"])
    span = f"{100 * p['diff']:+.1f} mIoU points [95% CI {lo:+.1f}, {hi:+.1f}] over {p['n']} objects"
    if p["within_noise"]:
        return f"{name_a} vs {name_b}: {span}: within noise, no winner at this many scenes."
    better, worse = (name_a, name_b) if p["diff"] > 0 else (name_b, name_a)
    return f"{name_a} vs {name_b}: {span}: {better} is better than {worse} beyond the noise."


def size_bin(area: int) -> str:
    """'small' (under 300 px), 'medium' or 'large' (over 4000 px)."""
    for name, (lo, hi) in SIZE_BINS.items():
        if area >= lo and (hi is None or area < hi):
            return name
    raise ValueError(f"bad area {area}")


@dataclass
class EvalResult:
    miou: float
    n_masks: int
    n_images: int
    prompt: str
    per_object: list[float]
    areas: list[int] = field(default_factory=list)  # ground-truth pixels of each object
    kinds: list[str] = field(default_factory=list)  # shape kind of each object (scenes only)

    @property
    def ci(self) -> tuple[float, float]:
        """95% bootstrap interval of the mIoU over objects."""
        return bootstrap_ci(self.per_object)

    def groups(self, labels: Sequence[str]) -> dict[str, dict]:
        """mIoU, its interval and the object count per label (size bin or shape kind)."""
        out = {}
        for name in dict.fromkeys(labels):
            vals = [v for v, lab in zip(self.per_object, labels) if lab == name]
            out[name] = {"miou": float(np.mean(vals)), "miou_ci": list(bootstrap_ci(vals)), "n": len(vals)}
        return out

    def as_dict(self) -> dict:
        d = {"miou": self.miou, "miou_ci": list(self.ci), "n_masks": self.n_masks,
             "n_images": self.n_images, "prompt": self.prompt}
        if self.areas:
            sizes = self.groups([size_bin(a) for a in self.areas])
            d["by_size"] = {k: sizes[k] for k in SIZE_BINS if k in sizes}
        if self.kinds:
            d["by_kind"] = dict(sorted(self.groups(self.kinds).items()))
        return d


def evaluate_scenes(model: Sam, n: int | None = None, prompt: str = "point",
                    seeds: Sequence[int] | None = None, size: int = 256,
                    progress: bool = True, split: str = "eval") -> EvalResult:
    """mIoU of `model` on generated scenes: a fixed split (first `n` of it) or `seeds`.

    `split` is "eval" (report only) or "val" (make choices on it).
    """
    ds = scenes_mod.SceneDataset(split, n, size=size, seeds=list(seeds) if seeds is not None else None)
    predictor = SamPredictor(model)
    ious: list[float] = []
    areas: list[int] = []
    kinds: list[str] = []
    for i in tqdm(range(len(ds)), desc=f"eval ({prompt})", disable=not progress, leave=False):
        s = ds.scene(i)
        pred = predict_masks(predictor, s.image, s.masks, prompt)
        ious += [iou(p, g) for p, g in zip(pred, s.masks)]
        areas += [int(m.sum()) for m in s.masks]
        kinds += list(s.shapes)
    return EvalResult(float(np.mean(ious)), len(ious), len(ds), prompt, ious, areas, kinds)


@torch.no_grad()
def four_masks(predictor: SamPredictor, points=None, boxes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All four of the decoder's masks (single-mask output first) at the image's resolution and
    their predicted IoUs, from one decoder call on the image set in `predictor` (prompts already
    in the model's input frame): what `predict_torch` returns, before it slices one or three."""
    sam = predictor.model
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    low, iou_pred = sam.mask_decoder.predict_masks(predictor.features, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    masks = sam.postprocess_masks(low, predictor.input_size, predictor.original_size) > sam.mask_threshold
    return masks, iou_pred


@torch.no_grad()
def kept_masks(model: Sam, n: int, split: str = "val") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every object of the first `n` scenes of `split`, one point per object (the protocol):
    the predicted IoU of the mask SAM keeps, that mask's area in pixels and its true IoU. What a
    labelling tool knows of its masks, and what it does not (notebook 00, exercise "a review queue")."""
    predictor = SamPredictor(model)
    pred, area, true = [], [], []
    for s in (scenes_mod.SceneDataset(split, n).scene(i) for i in range(n)):
        masks, scores = four_masks(predictor, points=_protocol_points(predictor, s))
        for j, gt in enumerate(s.masks):
            pick = 1 + int(scores[j, 1:].argmax())  # the protocol's mask: the head's pick of the three
            pred.append(float(scores[j, pick]))
            area.append(int(masks[j, pick].sum()))
            true.append(iou(masks[j, pick], gt))
    return np.array(pred), np.array(area), np.array(true)


def _protocol_points(predictor: SamPredictor, scene: scenes_mod.Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets the scene's image in `predictor`; returns one protocol point per object (`point_prompt`)
    in the model's input frame, with its labels, as `four_masks` takes them."""
    predictor.set_image(scene.image)
    pts = np.array([point_prompt(m) for m in scene.masks], np.float32)[:, None, :]
    pts = torch.as_tensor(predictor.transform.apply_coords(pts, scene.image.shape[:2]), dtype=torch.float)
    return pts, torch.ones(pts.shape[:2], dtype=torch.int)


@torch.no_grad()
def mask_choice(model: Sam, n: int | None = None, split: str = "eval",
                progress: bool = True) -> tuple[dict[str, EvalResult], float]:
    """What SAM's choice among its three masks costs for one point per object (notebook 00,
    "How we score a model"): mIoU of the mask the IoU head picks (the protocol), of the truly
    best of the three (an oracle: it reads the ground truth) and of the single-mask output, on
    the same objects; and how often the head's pick is the truly best one.
    """
    ds = scenes_mod.SceneDataset(split, n)
    predictor = SamPredictor(model)
    rows: dict[str, list[float]] = {"head's pick": [], "best of three": [], "single mask": []}
    hits = []
    for i in tqdm(range(len(ds)), desc="mask choice", disable=not progress, leave=False):
        s = ds.scene(i)
        masks, scores = four_masks(predictor, points=_protocol_points(predictor, s))
        for j, gt in enumerate(s.masks):
            single, *true = [iou(m, gt) for m in masks[j]]
            pick = int(scores[j, 1:].argmax())
            rows["head's pick"].append(true[pick])
            rows["best of three"].append(max(true))
            rows["single mask"].append(single)
            hits.append(true[pick] == max(true))
    results = {k: EvalResult(float(np.mean(v)), len(v), len(ds), "point", v) for k, v in rows.items()}
    return results, float(np.mean(hits))


def load_image(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG as HxWx3 uint8 RGB: grayscale, RGBA, palette and 16-bit are converted."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.max() > 0 else 1.0
            im = Image.fromarray((arr / hi * 255).round().astype(np.uint8))
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[2] == 3 and arr.dtype == np.uint8:
        return arr
    raise ValueError(f"{path}: unsupported pixel format")


def image_folder(folder: str | Path) -> list[tuple[Path, np.ndarray]]:
    """Every readable JPEG/PNG in `folder` (sorted by name) as (path, RGB array).

    Non-image or unreadable files are skipped with a warning; a folder with no image is an error.
    """
    root = Path(folder).expanduser()
    if root.is_file():
        raise ValueError(f"{root} is a file: give the folder that holds the images ({root.parent})")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    images = []
    for p in sorted(root.iterdir()):
        if p.is_dir() or p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            warnings.warn(f"skipping {p.name}: not a JPEG or PNG file", stacklevel=2)
            continue
        try:
            images.append((p, load_image(p)))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping {p.name}: cannot be read as an image ({type(e).__name__})", stacklevel=2)
    if not images:
        raise ValueError(f"no JPEG or PNG image in {root}")
    return images


def grid_points(shape: tuple[int, int], per_side: int = 4) -> np.ndarray:
    """A regular per_side x per_side grid of (x, y) prompt points over an image of `shape`."""
    h, w = shape
    xs = (np.arange(per_side) + 0.5) * w / per_side
    ys = (np.arange(per_side) + 0.5) * h / per_side
    return np.array([(x, y) for y in ys for x in xs], np.float32)


def agreement(model: Sam, reference: Sam, images: Iterable[np.ndarray], per_side: int = 4,
              progress: bool = True) -> EvalResult:
    """mIoU of `model`'s masks against `reference`'s masks on images without ground truth.

    Both models get the same grid of point prompts (MobileSAM's protocol for photos).
    """
    pm, pr = SamPredictor(model), SamPredictor(reference)
    ious: list[float] = []
    images = list(images)
    for img in tqdm(images, desc="agreement", disable=not progress, leave=False):
        pts = grid_points(img.shape[:2], per_side)
        a = predict_masks(pm, img, points=pts)
        b = predict_masks(pr, img, points=pts)
        ious += [iou(x, y) for x, y in zip(a, b)]
    return EvalResult(float(np.mean(ious)), len(ious), len(images), "point-grid", ious)
