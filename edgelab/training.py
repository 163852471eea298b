"""Training the embedded `tiny` SAM from scratch on generated scenes (`edgelab train-tiny`).

Taught in notebook 00, section "The embedded model". Prompts are sampled from the ground-truth
masks (one point, a noisy box, or two positive points and one negative), and the losses are SAM's:
focal + dice on the masks (20:1), MSE between predicted and actual IoU. A single point is
ambiguous, so only the best of SAM's three masks is trained on it; boxes and several points use
the single-mask output, as at inference.

Two economies keep a run under an hour on 2 cores: masks are compared at 128 px rather than 256
(the loss was most of a step's time), and each batch of scenes serves two steps under random
flips and quarter turns (drawing a scene cost about as much as encoding it when the recipe was
fixed; since scenes paint textures only inside each shape's box, about 14 ms).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import evaluate, models, scenes


@dataclass
class TrainConfig:
    """Everything that fixes a training run; `edgelab train-tiny` reproduces the shipped weights."""

    steps: int = 5000
    batch_images: int = 8
    point_prompts: int = 4  # per image: single positive point
    box_prompts: int = 2  # per image: noisy bounding box
    multi_prompts: int = 2  # per image: two positive points and one negative
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    eval_every: int = 250
    eval_scenes: int = 30
    checkpoint_every: int = 250
    threads: int = 0  # 0: torch's default
    loss_size: int = 128  # masks are compared at this resolution (targets area-averaged down to it)
    scene_reuse: int = 2  # each batch of scenes serves this many steps, each under a random flip/rotation


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, mean over pixels; (..., H, W) -> (...)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice coefficient; (..., H, W) -> (...)."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits with the target; (..., H, W) -> (...)."""
    pred = logits > 0
    t = target > 0.5
    inter = (pred & t).flatten(-2).sum(-1).float()
    union = (pred | t).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _sample_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _sample_negative(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ring = ndimage.binary_dilation(mask, iterations=12) & ~mask
    return _sample_point(ring, rng) if ring.any() else _sample_point(mask, rng)


def _noisy_box(mask: np.ndarray, rng: np.random.Generator, size: int) -> list[float]:
    x0, y0, x1, y1 = evaluate.box_prompt(mask)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    noise = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
    box = np.array([x0, y0, x1, y1]) + np.clip(noise, -16, 16)
    return list(np.clip(box, 0, size - 1))


def sample_prompts(masks: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """Prompts for one scene: {kind: (coords, labels, object indices)} in image pixels."""
    n, size = len(masks), masks.shape[-1]
    out = {}
    idx = rng.integers(n, size=cfg.point_prompts)
    pts = []
    for i in idx:  # a third of the points follow the eval protocol, the rest fall anywhere inside
        pts.append(evaluate.point_prompt(masks[i]) if rng.random() < 0.3 else _sample_point(masks[i], rng))
    out["point"] = (np.array(pts, np.float32)[:, None], np.ones((len(idx), 1), np.int64), idx)
    idx = rng.integers(n, size=cfg.box_prompts)
    out["box"] = (np.array([_noisy_box(masks[i], rng, size) for i in idx], np.float32), None, idx)
    idx = rng.integers(n, size=cfg.multi_prompts)
    coords = [[_sample_point(masks[i], rng), _sample_point(masks[i], rng), _sample_negative(masks[i], rng)] for i in idx]
    out["multi"] = (np.array(coords, np.float32), np.tile(np.array([1, 1, 0]), (len(idx), 1)), idx)
    return out


def decode(sam: Sam, embeddings: torch.Tensor, which_image: torch.Tensor, points=None, boxes=None):
    """SAM's mask decoder for prompts spread over several images: prompt j uses image which_image[j].

    The same modules as `MaskDecoder.predict_masks`, but the image embedding is gathered per
    prompt instead of repeated from a single image. Returns (all 4 low-res masks, IoU predictions).
    """
    dec = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings[which_image] + dense
    pos = sam.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    src = src.transpose(1, 2).reshape(b, c, h, w)
    up = dec.output_upscaling(src)
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    return masks, dec.iou_prediction_head(hs[:, 0])


def _prompt_loss(low_res: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, multimask: bool,
                 size: int = 128):
    """SAM's loss for a group of prompts; single points train only their best of masks 1-3.

    Masks are compared at `size` px: the target is area-averaged down (soft at the edges) and the
    logits upsampled bilinearly, as at inference. At 128 px this costs a quarter of full resolution.
    """
    if target.shape[-1] != size:
        target = F.interpolate(target[:, None], size=(size, size), mode="area")[:, 0]
    logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
    sl = slice(1, 4) if multimask else slice(0, 1)
    logits, iou_pred = logits[:, sl], iou_pred[:, sl]
    t = target[:, None].expand_as(logits)
    per_mask = 20 * focal_loss(logits, t) + dice_loss(logits, t)
    best = per_mask.argmin(dim=1)
    mask_loss = per_mask.gather(1, best[:, None]).mean()
    iou_loss = F.mse_loss(iou_pred, mask_iou(logits, t).detach())
    return mask_loss + iou_loss, mask_loss.detach(), iou_loss.detach()


def train_step(sam: Sam, batch: list[scenes.Scene], cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """One optimisation step's forward pass and loss on a batch of scenes (no backward)."""
    dev = sam.device
    imgs = torch.stack([torch.from_numpy(s.image.copy()) for s in batch]).permute(0, 3, 1, 2).float().to(dev)
    emb = sam.image_encoder((imgs - sam.pixel_mean) / sam.pixel_std)
    groups: dict[str, list] = {"point": [], "box": [], "multi": []}
    for b, s in enumerate(batch):
        for kind, (coords, labels, idx) in sample_prompts(s.masks, cfg, rng).items():
            groups[kind].append((b, coords, labels, s.masks[idx]))
    total, parts = 0.0, {}
    for kind, items in groups.items():
        which = torch.tensor(np.concatenate([[b] * len(c) for b, c, _, _ in items]), device=dev)
        coords = torch.from_numpy(np.concatenate([c for _, c, _, _ in items])).to(dev)
        target = torch.from_numpy(np.concatenate([m for _, _, _, m in items])).float().to(dev)
        if kind == "box":
            low, iou = decode(sam, emb, which, boxes=coords)
        else:
            labels = torch.from_numpy(np.concatenate([lab for _, _, lab, _ in items])).to(dev)
            low, iou = decode(sam, emb, which, points=(coords, labels))
        loss, ml, il = _prompt_loss(low, iou, target, multimask=(kind == "point"), size=cfg.loss_size)
        total = total + loss
        parts[f"mask_{kind}"], parts[f"iou_{kind}"] = ml.item(), il.item()
    parts["loss"] = float(total.detach())
    return {"loss_tensor": total, **parts}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def batch_seeds(step: int, cfg: TrainConfig) -> list[int]:
    """Training scene seeds of `step`: consecutive, new scenes every `cfg.scene_reuse` steps."""
    first = scenes.TRAIN_SEED_BASE + (step // cfg.scene_reuse) * cfg.batch_images
    return list(range(first, first + cfg.batch_images))


def dihedral(scene: scenes.Scene, k: int) -> scenes.Scene:
    """The scene rotated by k % 4 quarter turns and mirrored when k >= 4: pixels and masks stay exact."""
    image, masks = np.rot90(scene.image, k % 4, axes=(0, 1)), np.rot90(scene.masks, k % 4, axes=(1, 2))
    if k >= 4:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    return scenes.Scene(np.ascontiguousarray(image), np.ascontiguousarray(masks), scene.shapes, scene.seed)


class SceneBatches:
    """The training scenes of each step, each under a random flip or rotation drawn from the
    step's rng; one batch of scenes serves `cfg.scene_reuse` steps. `offset` shifts the seeds
    (fine-tuning in chapter 02 draws from another range than training)."""

    def __init__(self, cfg: TrainConfig, offset: int = 0):
        self.cfg, self.offset = cfg, offset
        self._cache: tuple[list[int], list[scenes.Scene]] = ([], [])

    def __call__(self, step: int, rng: np.random.Generator) -> list[scenes.Scene]:
        seeds = [s + self.offset for s in batch_seeds(step, self.cfg)]
        if seeds != self._cache[0]:
            self._cache = (seeds, [scenes.make_scene(s) for s in seeds])
        return [dihedral(s, int(k)) for s, k in zip(self._cache[1], rng.integers(8, size=len(seeds)))]


def train_tiny(run_dir: str | Path, cfg: TrainConfig = TrainConfig(), device: str = "cpu",
               resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train `tiny` from scratch into run_dir (checkpoints, log.jsonl, final weights); resumable.

    `stop_after` ends the run early at that step (the learning-rate schedule still spans
    cfg.steps), so a checkpoint taken part-way through a run can be reproduced exactly.
    Returns the path of the final state dict (`run_dir/sam_tiny.pt`).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sam = models.build_sam(models.CONFIGS["tiny"]).to(device).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, ckpt = 0, run / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = open(run / "log.jsonl", "a")
    t0 = time.time()
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = tqdm(range(start, end), initial=start, total=end, desc="train tiny", disable=not progress)
    draw = SceneBatches(cfg)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        batch = draw(step, rng)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        out = train_step(sam, batch, cfg, rng)
        opt.zero_grad(set_to_none=True)
        out["loss_tensor"].backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        rec = {k: round(v, 5) for k, v in out.items() if k != "loss_tensor"}
        rec.update(step=step + 1, lr=_lr_at(step, cfg), elapsed_s=round(time.time() - t0, 1))
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == end:
            sam.eval()
            rec["miou_point"] = evaluate.evaluate_scenes(sam, cfg.eval_scenes, "point", progress=False).miou
            rec["miou_box"] = evaluate.evaluate_scenes(sam, cfg.eval_scenes, "box", progress=False).miou
            sam.train()
            bar.write(f"step {step + 1}: point mIoU {rec['miou_point']:.3f}, box mIoU {rec['miou_box']:.3f}")
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            torch.save({"model": sam.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, ckpt)
    log.close()
    final = run / "sam_tiny.pt"
    torch.save(sam.eval().state_dict(), final)
    return final
