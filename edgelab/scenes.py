"""Generated segmentation scenes with exact instance masks.

Taught in notebook 00, section "Scenes with exact answers". A scene is drawn from a seed alone:
the same seed gives the same pixels and the same masks on every machine. Shapes are painted
back to front without anti-aliasing, so each object's visible mask is exact: the pixels it
covers minus the pixels of every object painted over it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("ellipse", "rectangle", "polygon", "star", "thin", "small")
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 10_000_000  # eval seeds never overlap train seeds for any realistic run
EVAL_SIZE = 200  # scenes in the fixed held-out eval split
VAL_SEED_BASE = 20_000_000  # the validation split: every choice is made here, never on eval
VAL_SIZE = 200
MIN_VISIBLE_PX = 40  # an object seen through less than this is dropped from the ground truth


@dataclass
class Scene:
    """One generated scene: an RGB image and the visible mask of each object."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool, front-most occlusion already applied
    shapes: list[str]  # the shape kind of each mask
    seed: int


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


Window = tuple[slice, slice]


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float,
             window: Window | None = None) -> np.ndarray:
    """A (h, w, 3) float texture around colour `base`: solid, gradient, stripes, checker or noise.

    With `window` (rows, columns) only that part is returned, and computed where that is cheaper;
    it equals the same part of the whole texture and draws the same random numbers.
    """
    full = (slice(0, h), slice(0, w))
    win = window or full
    kind = rng.choice(["solid", "gradient", "stripes", "checker", "noise", "blotch"])
    yy, xx = np.mgrid[win].astype(np.float32)
    other = base + rng.normal(0, 60 * strength, size=3)
    if kind == "solid":
        t = np.zeros(yy.shape, np.float32)
    elif kind == "gradient":  # shifted by its minimum over the whole image
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[full].astype(np.float32)
        t = (np.cos(a) * xx + np.sin(a) * yy) / max(h, w)
        t = (t - t.min())[win]
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 14)
        t = (np.floor((np.cos(a) * xx + np.sin(a) * yy) / period) % 2).astype(np.float32)
    elif kind == "checker":
        p = rng.uniform(4, 14)
        t = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float32)
    elif kind == "noise":
        t = rng.random((h, w)).astype(np.float32)[win]
    else:  # smooth blotches: a coarse random grid upsampled
        g = rng.random((rng.integers(3, 8), rng.integers(3, 8))).astype(np.float32)
        t = (np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0)[win]
    t = np.clip(t, 0, 1)[..., None]
    return base * (1 - t) + other * t


def _bounding_window(mask: np.ndarray) -> Window:
    """The rows and columns of the smallest rectangle holding every pixel of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _star(cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    n = int(rng.integers(4, 8))
    inner = r * rng.uniform(0.35, 0.6)
    a0 = rng.uniform(0, 2 * math.pi)
    pts = []
    for i in range(2 * n):
        rad = r if i % 2 == 0 else inner
        a = a0 + i * math.pi / n
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _polygon(cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = r * rng.uniform(0.55, 1.0, n)
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)]


def _rotated_rect(cx: float, cy: float, w: float, h: float, a: float) -> list[tuple[float, float]]:
    c, s = math.cos(a), math.sin(a)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one shape of `kind` at a random place and scale; return its (size, size) bool mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.05, 0.95, 2) * size
    r = size * rng.uniform(0.06, 0.28) if kind != "small" else size * rng.uniform(0.025, 0.05)
    if kind in ("ellipse", "small"):
        rx, ry = r, r * rng.uniform(0.4, 1.0)
        if kind == "ellipse" and rng.random() < 0.5:  # a rotated ellipse as a 48-gon
            a = rng.uniform(0, math.pi)
            t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            pts = [(cx + rx * math.cos(u) * math.cos(a) - ry * math.sin(u) * math.sin(a),
                    cy + rx * math.cos(u) * math.sin(a) + ry * math.sin(u) * math.cos(a)) for u in t]
            draw.polygon(pts, fill=255)
        else:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "rectangle":
        draw.polygon(_rotated_rect(cx, cy, 2 * r, 2 * r * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi)), fill=255)
    elif kind == "polygon":
        draw.polygon(_polygon(cx, cy, r, rng), fill=255)
    elif kind == "star":
        draw.polygon(_star(cx, cy, r, rng), fill=255)
    elif kind == "thin":
        length, a = 2 * r * rng.uniform(1.0, 1.8), rng.uniform(0, math.pi)
        width = rng.uniform(0.015, 0.03) * size
        draw.polygon(_rotated_rect(cx, cy, length, max(width, 4.0), a), fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    return _texture(rng, size, size, _random_color(rng), strength=rng.uniform(0.2, 1.0))


def _distinct_color(rng: np.random.Generator, taken: list[np.ndarray], min_dist: float = 60.0) -> np.ndarray:
    """A colour at least `min_dist` (RGB Euclidean) from the background and every object so far."""
    for _ in range(50):
        c = _random_color(rng)
        if all(np.linalg.norm(c - t) >= min_dist for t in taken):
            return c
    return c


def make_scene(seed: int, size: int = 256, n_objects: tuple[int, int] = (2, 12)) -> Scene:
    """Generate the scene of `seed`: a (size, size) RGB image and one exact visible mask per object.

    Arguments:
      seed: every pixel and mask follows from it.
      size: image side in pixels.
      n_objects: inclusive range of objects painted (some may end up fully hidden and dropped).
    Returns:
      a Scene; masks are ordered back to front and never empty.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    taken = [image.reshape(-1, 3).mean(0)]
    owner = np.full((size, size), -1, np.int16)
    kinds: list[str] = []
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    weights = np.array([0.22, 0.2, 0.18, 0.16, 0.1, 0.14])
    for i in range(n):
        kind = str(rng.choice(SHAPES, p=weights / weights.sum()))
        mask = _shape_mask(kind, size, rng)
        if not mask.any():
            continue
        color = _distinct_color(rng, taken)
        taken.append(color)
        win = _bounding_window(mask)  # textures are painted only where the shape can be
        tex = _texture(rng, size, size, color, strength=rng.uniform(0.1, 0.7), window=win)
        inside = mask[win]
        image[win][inside] = tex[inside]
        owner[mask] = len(kinds)
        kinds.append(kind)
    image = image + rng.normal(0, rng.uniform(0, 8), image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    masks, shapes = [], []
    for k, kind in enumerate(kinds):
        m = owner == k
        if m.sum() >= MIN_VISIBLE_PX:
            masks.append(m)
            shapes.append(kind)
    if not masks:  # vanishingly rare at sensible sizes; keep every scene non-empty
        if size < 64:
            raise ValueError(f"size {size} px is too small for scenes: use 64 px or more")
        return make_scene(seed + 7_919_000, size, n_objects)
    return Scene(np.array(pil), np.stack(masks), shapes, seed)


def split_seeds(split: str, n: int | None = None) -> list[int]:
    """The seeds of a split: `eval` (reporting only) and `val` (choices) are fixed, 200 scenes
    each; `train` counts up from 0. The three ranges never overlap."""
    if split in ("eval", "val"):
        base, size = (EVAL_SEED_BASE, EVAL_SIZE) if split == "eval" else (VAL_SEED_BASE, VAL_SIZE)
        n = size if n is None else n
        if not 0 < n <= size:
            raise ValueError(f"the {split} split has {size} scenes: ask for 1 to {size}, not {n}")
        return [base + i for i in range(n)]
    if split == "train":
        if n is None or n <= 0:
            raise ValueError("the train split needs a positive number of scenes")
        return [TRAIN_SEED_BASE + i for i in range(n)]
    raise ValueError(f"unknown split {split!r}: use 'train', 'val' or 'eval'")


class SceneDataset(torch.utils.data.Dataset):
    """Scenes as a torch Dataset: item i is (image uint8 HxWx3 tensor, masks bool NxHxW tensor).

    `SceneDataset("eval")` is the fixed held-out split every chapter reports mIoU on;
    `SceneDataset("train", n)` the first n training scenes; `seeds=` any other list.
    """

    def __init__(self, split: str = "eval", n: int | None = None, size: int = 256,
                 seeds: list[int] | None = None):
        self.seeds = list(seeds) if seeds is not None else split_seeds(split, n)
        self.size = size

    def __len__(self) -> int:
        return len(self.seeds)

    def scene(self, i: int) -> Scene:
        return make_scene(self.seeds[i], self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scene(i)
        return torch.from_numpy(s.image), torch.from_numpy(s.masks)
