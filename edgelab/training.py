"""Training the embedded `tiny` SAM from scratch on generated scenes (`edgelab train-tiny`).

Taught in notebook 00, section "The embedded model". Prompts are sampled from the ground-truth
masks (one point, a noisy box, or two positive points and one negative), and the losses are SAM's:
focal + dice on the masks (1:1 here; SAM used 20:1), MSE between predicted and actual IoU. A single point is
ambiguous, so only the best of SAM's three masks is trained on it; boxes and several points use
the single-mask output, as at inference.

Two economies keep a run under an hour on 2 cores: masks are compared at 128 px rather than 256
(the loss was most of a step's time), and each batch of scenes serves two steps under random
flips and quarter turns (drawing a scene cost about as much as encoding it when the recipe was
fixed; since scenes paint textures only inside each shape's box, about 14 ms).

A run can last hours: `hours=` fits the cosine schedule to a budget of training time (each
step's wall time, or its CPU time over its threads where that is less, as on a shared machine;
added up over every resume), checkpoints land every few minutes (written atomically, with the
optimizer state), and the validation split's mIoU is logged at each one. On a CPU with BF16
instructions (avx512_bf16 or AMX) the forward pass runs under BF16 autocast. On a GPU, worker
processes draw the scenes and prompts ahead of the model (`step_batches`), the same batches as
the loop draws alone.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from . import bench, evaluate, models, scenes


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
    eval_scenes: int = 100  # validation-split scenes scored at each evaluation
    checkpoint_every: int = 250
    threads: int = 0  # 0: torch's default
    loss_size: int = 128  # masks are compared at this resolution (targets area-averaged down to it)
    scene_reuse: int = 2  # each batch of scenes serves this many steps, each under a random flip/rotation
    focal_weight: float = 1.0  # focal : dice = focal_weight : 1 (SAM: 20)
    bf16: str = "auto"  # "auto": BF16 autocast where the CPU has BF16 instructions; "on"; "off"
    hours: float | None = None  # wall-clock budget: the schedule spans it instead of `steps`
    checkpoint_minutes: float = 5.0  # with `hours`: a checkpoint (and validation) this often
    stem: tuple[int, ...] = (32, 64)  # conv stem of the encoder (models.SamConfig.stem)
    box_noise: float = 0.08  # std of the training boxes' corner noise, as a fraction of the box's side
    init: str | None = None  # start from these weights (a second phase) instead of random ones
    scene_offset: int = 0  # training scenes from this seed on (a second phase draws new scenes)
    freeze_encoder: bool = False  # train the prompt encoder and mask decoder only (a third phase)
    iou_weight: float = 1.0  # weight of the IoU head's MSE beside the mask loss
    workers: int = 0  # processes drawing scenes and prompts ahead of the model (0: in the training loop)


def tiny_config(cfg: TrainConfig) -> models.SamConfig:
    """The architecture a run trains: `tiny` with the run's conv stem."""
    return replace(models.CONFIGS["tiny"], stem=tuple(cfg.stem))


def cpu_has_bf16() -> bool:
    """Whether this CPU has BF16 instructions (avx512_bf16 or AMX), from `bench.machine_info`."""
    info = bench.machine_info()
    return bool(info["avx512_bf16"] or info["amx"])


def use_bf16(cfg: TrainConfig, device: str) -> bool:
    if cfg.bf16 not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be 'auto', 'on' or 'off', not {cfg.bf16!r}")
    if cfg.bf16 == "auto":
        return device.startswith("cuda") or (device == "cpu" and cpu_has_bf16())
    return cfg.bf16 == "on"


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


def _noisy_box(mask: np.ndarray, rng: np.random.Generator, size: int, noise: float = 0.08) -> list[float]:
    """The mask's box with each corner moved by N(0, noise x side), at most 2 x noise x 100 px."""
    x0, y0, x1, y1 = evaluate.box_prompt(mask)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    jitter = rng.normal(0, noise, 4) * np.array([w, h, w, h])
    limit = 200 * noise
    box = np.array([x0, y0, x1, y1]) + np.clip(jitter, -limit, limit)
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
    out["box"] = (np.array([_noisy_box(masks[i], rng, size, cfg.box_noise) for i in idx], np.float32), None, idx)
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
                 size: int = 128, focal_weight: float = 20.0, iou_weight: float = 1.0):
    """SAM's loss for a group of prompts; single points train only their best of masks 1-3.

    Masks are compared at `size` px: the target is area-averaged down (soft at the edges) and the
    logits upsampled bilinearly, as at inference. At 128 px this costs a quarter of full resolution.
    """
    if target.shape[-1] != size:
        target = F.interpolate(target[:, None], size=(size, size), mode="area")[:, 0]
    logits = F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)
    iou_pred = iou_pred.float()
    sl = slice(1, 4) if multimask else slice(0, 1)
    logits, iou_pred = logits[:, sl], iou_pred[:, sl]
    t = target[:, None].expand_as(logits)
    per_mask = focal_weight * focal_loss(logits, t) + dice_loss(logits, t)
    best = per_mask.argmin(dim=1)
    mask_loss = per_mask.gather(1, best[:, None]).mean()
    iou_loss = F.mse_loss(iou_pred, mask_iou(logits, t).detach())
    return mask_loss + iou_weight * iou_loss, mask_loss.detach(), iou_loss.detach()


def train_step(sam: Sam, batch: list[scenes.Scene], cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """One optimisation step's forward pass and loss on a batch of scenes (no backward)."""
    return step_loss(sam, [s.image for s in batch], prompt_groups(batch, cfg, rng), cfg)


def step_loss(sam: Sam, images: Sequence[np.ndarray], groups: dict, cfg: TrainConfig) -> dict:
    """The forward pass and loss of one step whose CPU side (`prepare_steps`) is done."""
    with torch.set_grad_enabled(not cfg.freeze_encoder and torch.is_grad_enabled()):
        emb = sam.image_encoder(models.normalised(images, sam))
    return groups_loss(sam, emb, groups, cfg)


def scene_loss(sam: Sam, emb: torch.Tensor, batch: list[scenes.Scene], cfg: TrainConfig,
               rng: np.random.Generator) -> dict:
    """SAM's loss on the exact masks of `batch`, given the image embeddings `emb` of its scenes:
    prompts drawn by `sample_prompts`, decoded by `decode`, scored by `_prompt_loss` per kind.
    Also the task loss of a student's fine-tuning (`distillation.task_loss`)."""
    return groups_loss(sam, emb, prompt_groups(batch, cfg, rng), cfg)


def prompt_groups(batch: list[scenes.Scene], cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """The prompts of a batch (`sample_prompts`, scene by scene), gathered per kind into arrays:
    {kind: (image index of each prompt, coords, labels or None, target masks as `np.packbits`
    along rows, their width)}. CPU work only, so `prepare_steps` can do it in a worker process; packed, the
    masks cross to the training process in an eighth of the bytes."""
    groups: dict[str, list] = {"point": [], "box": [], "multi": []}
    for b, s in enumerate(batch):
        for kind, (coords, labels, idx) in sample_prompts(s.masks, cfg, rng).items():
            groups[kind].append((b, coords, labels, s.masks[idx]))
    out = {}
    for kind, items in groups.items():
        which = np.concatenate([[b] * len(c) for b, c, _, _ in items]).astype(np.int64)
        coords = np.concatenate([c for _, c, _, _ in items])
        labels = None if kind == "box" else np.concatenate([lab for _, _, lab, _ in items])
        masks = np.concatenate([m for _, _, _, m in items])
        out[kind] = (which, coords, labels, np.packbits(masks, axis=-1), masks.shape[-1])
    return out


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    """`np.packbits(masks, axis=-1)` undone on the tensor's device: (..., ceil(W / 8)) uint8 -> (..., W) float."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :width].float()


def groups_loss(sam: Sam, emb: torch.Tensor, groups: dict, cfg: TrainConfig) -> dict:
    """Decode every group of `prompt_groups` on the embeddings `emb` and sum SAM's loss over kinds."""
    dev = sam.device
    total, parts = 0.0, {}
    for kind, (which, coords, labels, packed, width) in groups.items():
        which, coords = torch.from_numpy(which).to(dev), torch.from_numpy(coords).to(dev)
        target = unpack_masks(torch.from_numpy(packed).to(dev), width)
        if labels is None:
            low, iou = decode(sam, emb, which, boxes=coords)
        else:
            low, iou = decode(sam, emb, which, points=(coords, torch.from_numpy(labels).to(dev)))
        loss, ml, il = _prompt_loss(low, iou, target, multimask=(kind == "point"), size=cfg.loss_size,
                                    focal_weight=cfg.focal_weight, iou_weight=cfg.iou_weight)
        total = total + loss
        parts[f"mask_{kind}"], parts[f"iou_{kind}"] = ml.item(), il.item()
    parts["loss"] = float(total.detach())
    return {"loss_tensor": total, **parts}


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, done: float | None = None) -> float:
    """The learning rate of every training loop in the workbook (tiny's, the students' in
    notebook 04, the pruned models' fine-tune in notebook 02): a linear warm-up over `warmup`
    steps, then half a cosine from `lr` down to 0 over the rest of the `steps`, or over a time
    budget when `done` (the fraction of it spent) is given."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup) if done is None else done
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """`warmup_cosine` over the run: its steps, or with `cfg.hours` the fraction of the time
    budget already spent (`seconds` of training)."""
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, seconds / (cfg.hours * 3600) if cfg.hours else None)


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


@dataclass
class StepBatch:
    """The CPU side of one training step: its scenes' images and their prompts (`prompt_groups`)."""

    step: int
    images: list[np.ndarray]
    groups: dict


def prepare_steps(steps: Sequence[int], cfg: TrainConfig) -> list[StepBatch]:
    """Scenes, flips and prompts of consecutive `steps`, each from its own rng ([seed, step]):
    the same batches in the training loop or in a worker process."""
    draw = SceneBatches(cfg, offset=cfg.scene_offset)
    out = []
    for step in steps:
        rng = np.random.default_rng([cfg.seed, step])
        batch = draw(step, rng)
        out.append(StepBatch(step, [s.image for s in batch], prompt_groups(batch, cfg, rng)))
    return out


def _scene_blocks(start: int, reuse: int) -> Iterator[range]:
    """Steps from `start` on, cut where a new batch of scenes is drawn (every `reuse` steps)."""
    while True:
        stop = (start // reuse + 1) * reuse
        yield range(start, stop)
        start = stop


def _follow_parent(parent: int) -> None:
    """In a worker: exit when the training process is gone. A `kill -9` or a scheduler's SIGTERM
    skips `step_batches`' shutdown, and orphaned workers would hold their memory for good."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def step_batches(start: int, cfg: TrainConfig) -> Iterator[StepBatch]:
    """The prepared steps of a run from `start` on, in order, without end. With `cfg.workers`
    they are drawn that many processes ahead of the model (a GPU outruns one core drawing
    scenes); the batches are the same either way. The workers are forked: they run numpy only.
    Close the iterator to stop them."""
    blocks = _scene_blocks(start, cfg.scene_reuse)
    if not cfg.workers:
        for block in blocks:
            yield from prepare_steps(block, cfg)
        return
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_follow_parent, initargs=(os.getpid(),))
    try:
        ahead = deque(pool.submit(prepare_steps, next(blocks), cfg) for _ in range(2 * cfg.workers))
        while True:
            done = ahead.popleft().result()
            ahead.append(pool.submit(prepare_steps, next(blocks), cfg))
            yield from done
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _validate(sam: Sam, cfg: TrainConfig) -> dict:
    """Validation-split mIoU (point and box) on the first `cfg.eval_scenes` val scenes."""
    sam.eval()
    out = {f"val_{p}": round(evaluate.evaluate_scenes(sam, cfg.eval_scenes, p, split="val",
                                                      progress=False).miou, 4) for p in ("point", "box")}
    sam.train()
    return out


def step_seconds(wall: float, cpu: float, threads: int, device: str = "cpu", workers: int = 0) -> float:
    """The training time a step used: its wall time, or less when the machine was shared.

    On a shared machine wall time runs on while other work holds the cores; the process's CPU
    time over its threads counts only what training was given. The smaller of the two is what
    `hours` budgets (single-threaded parts, such as drawing scenes, count a little short). On a
    GPU, or with `workers` drawing the scenes, the process's CPU time measures neither the model
    nor the data (16 threads would count a sixteenth of a GPU step): wall time counts.
    """
    if device != "cpu" or workers:
        return wall
    return min(wall, cpu / max(1, threads))


def log_records(log: str | Path) -> list[dict]:
    """The step lines of a training log (a run folder's log.jsonl, or the file itself, such as
    data/sam_tiny_log.jsonl), as the run that went on logged them: a resume line supersedes what
    a killed run logged after its last checkpoint, so each step appears once."""
    path = Path(log)
    path = path / "log.jsonl" if path.is_dir() else path
    entries: list[dict] = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "resume":
            entries = [e for e in entries if e["step"] <= rec["step"]]
        elif "step" in rec and "event" not in rec:
            entries.append(rec)
    return entries


def append_phase(log: str | Path, phase: str | Path, out: str | Path) -> Path:
    """Write to `out` the training log `log` followed by a second phase's run folder (`phase`,
    trained with `--init` from the first phase's weights), its steps and training seconds counted
    on from where `log` ended, so `learning_curve` reads one run from 0 hours (the shipped
    `data/sam_tiny_log.jsonl` after a second phase). The phase's start line becomes a "phase"
    event that keeps its configuration."""
    first = log_records(log)
    step0, secs0 = (first[-1]["step"], first[-1]["train_s"]) if first else (0, 0.0)
    lines = Path(log).read_text().splitlines()
    config = json.loads((Path(phase) / "config.json").read_text())
    for line in (Path(phase) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "start":
            rec = {**rec, "event": "phase", "step": step0, "train_s": secs0, "config": config}
        elif "step" in rec:
            rec = {**rec, "step": rec["step"] + step0, "train_s": round(rec["train_s"] + secs0, 1)}
        lines.append(json.dumps(rec))
    Path(out).write_text("\n".join(lines) + "\n")
    return Path(out)


def phase_starts(log: str | Path) -> list[dict]:
    """The later phases of a training log (`append_phase`): step, training hours and the phase's
    configuration where each began. Notebook 00 marks them on its curves."""
    path = Path(log)
    path = path / "log.jsonl" if path.is_dir() else path
    events = [json.loads(line) for line in path.read_text().splitlines() if '"phase"' in line]
    return [{"step": e["step"], "hours": e["train_s"] / 3600, "config": e.get("config", {})}
            for e in events if e.get("event") == "phase"]


def learning_curve(log: str | Path) -> list[dict]:
    """The validation points of a training log (see `log_records`): step, training hours,
    val_point, val_box. Notebook 00 plots them."""
    return [{"step": e["step"], "hours": e["train_s"] / 3600, "val_point": e["val_point"],
             "val_box": e["val_box"]} for e in log_records(log) if "val_point" in e]


def _cpu_name() -> str:
    return bench.machine_info()["cpu"]


def _accelerator(device: str) -> dict:
    """{"gpu": its name} for a CUDA device (a log line names the machine that trained), else {}."""
    return {"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") else {}


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temporary file, so a run killed mid-write leaves the last checkpoint
    (tiny's training and the students' in notebook 04)."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_state(model: torch.nn.Module, opt: torch.optim.Optimizer, ckpt: Path, device) -> dict:
    """Load a run's checkpoint ({"model", "optimizer", "step", ...}) into `model` and `opt`; a file
    that cannot be resumed is one clear error (`models.CheckpointError`) naming the way out."""
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except Exception as e:
        raise models.CheckpointError(f"{ckpt} cannot be resumed ({type(e).__name__}: {str(e)[:120]}); "
                                     "move it away or pass --fresh") from None
    return state


def config_from_json(d: dict) -> TrainConfig:
    """A TrainConfig from its saved dict (unknown keys, such as `stop_after`, are ignored)."""
    names = {f.name for f in fields(TrainConfig)}
    d = {k: (tuple(v) if k == "stem" else v) for k, v in d.items() if k in names}
    return TrainConfig(**d)


RUN_CONTROLS = ("steps", "hours", "threads", "workers", "eval_scenes", "eval_every", "checkpoint_every", "checkpoint_minutes")


def _recipe(d: dict) -> dict:
    """The fields of a saved config that fix the weights (a resume may change the others: a
    longer --hours stretches the schedule from where it stands)."""
    return {k: v for k, v in d.items() if k not in RUN_CONTROLS}


def _resume(run: Path, cfg: TrainConfig, sam: Sam, opt: torch.optim.Optimizer, device: str) -> tuple[int, float]:
    """Load run/checkpoint.pt into sam and opt; return (step, training seconds so far)."""
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        return 0, 0.0
    state = resume_state(sam, opt, ckpt, device)
    saved = state.get("config")  # read through TrainConfig: fields newer than the run take their defaults
    if saved and _recipe(asdict(config_from_json(json.loads(saved)))) != _recipe(asdict(cfg)):
        raise ValueError(f"{ckpt} was written by a run with another configuration; "
                         "resume with the same options (see its config.json) or use --fresh")
    return int(state["step"]), float(state.get("train_seconds", 0.0))


def _progress_bar(budget: float | None, seconds: float, start: int, end: int, progress: bool) -> tqdm:
    """tqdm over the training seconds of an `hours` budget, or over the steps of a fixed run."""
    if budget is not None:
        return tqdm(total=budget, initial=min(seconds, budget), unit="s", desc="train tiny", disable=not progress,
                    bar_format="{desc}: {percentage:3.0f}% {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=end, initial=start, unit="it", desc="train tiny", disable=not progress)


def _advance(bar: tqdm, dt: float, budget: float | None) -> None:
    """One step on the bar: its seconds, up to the budget (tqdm drops a total the count passes,
    and the budget bar's format then fails: the last step of a run ends past its budget)."""
    bar.update(min(dt, max(0.0, budget - bar.n)) if budget is not None else 1)


def _run_event(start: int, seconds: float, cfg: TrainConfig, bf16: bool, device: str) -> dict:
    """The log line that opens a run ("start") or a resume (lines after the checkpoint's step, a
    killed run's, are superseded from it): where and how the training runs."""
    where = {"bf16": bf16, "threads": torch.get_num_threads(), "hours": cfg.hours, "cpu": _cpu_name(),
             **_accelerator(device)}
    return {"event": "resume", "step": start, "train_s": round(seconds, 1), **where} if start else {"event": "start", **where}


def _optimise(sam: Sam, opt: torch.optim.Optimizer, trained: list[torch.nn.Parameter], prepared: StepBatch,
              cfg: TrainConfig, lr: float, bf16: bool) -> dict:
    """One optimisation step at learning rate `lr`: forward (BF16 autocast where `bf16`), backward,
    gradient clipping at norm 1, AdamW. Returns `step_loss`'s record."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(sam.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = step_loss(sam, prepared.images, prepared.groups, cfg)
    opt.zero_grad(set_to_none=True)
    out["loss_tensor"].backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    return out


def train_tiny(run_dir: str | Path, cfg: TrainConfig = TrainConfig(), device: str = "cpu",
               resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train `tiny` from scratch into run_dir (checkpoints, log.jsonl, final weights); resumable.

    With `cfg.hours` the run ends when that much training time is spent (over all resumes) and
    the schedule follows the clock; otherwise it runs `cfg.steps`. `stop_after` ends the run early
    at that step (the schedule is unchanged), so a checkpoint taken part-way through a run can be
    reproduced exactly. Returns the path of the final state dict (`run_dir/sam_tiny.pt`).
    """
    models.check_device(device)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sam = models.build_sam(tiny_config(cfg)).to(device).train()
    if cfg.freeze_encoder:
        sam.image_encoder.requires_grad_(False)
    trained = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, seconds = _resume(run, cfg, sam, opt, device) if resume else (0, 0.0)
    if cfg.init and not start:  # a second phase: warm-start from earlier weights, new optimizer state
        sam.load_state_dict(models.read_checkpoint(cfg.init, "tiny"))
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    bf16 = use_bf16(cfg, device)
    budget = cfg.hours * 3600 if cfg.hours else None
    end = cfg.steps if budget is None else 10 ** 9
    end = end if stop_after is None else min(stop_after, end)
    bar = _progress_bar(budget, seconds, start, end, progress)
    batches = step_batches(start, cfg)
    last_ckpt = time.time()
    step = start
    with closing(batches), open(run / "log.jsonl", "a") as log:
        log.write(json.dumps(_run_event(start, seconds, cfg, bf16, device)) + "\n")
        while step < end and (budget is None or seconds < budget):
            t_step, cpu_step = time.time(), time.process_time()
            prepared = next(batches)
            lr = _lr_at(step, cfg, seconds)
            out = _optimise(sam, opt, trained, prepared, cfg, lr, bf16)
            step += 1
            dt = step_seconds(time.time() - t_step, time.process_time() - cpu_step, torch.get_num_threads(),
                              device, cfg.workers)
            seconds += dt
            rec = {k: round(v, 5) for k, v in out.items() if k != "loss_tensor"}
            rec.update(step=step, lr=lr, train_s=round(seconds, 1))
            _advance(bar, dt, budget)
            bar.set_postfix(step=step, loss=f"{rec['loss']:.3f}")
            done = step >= end or (budget is not None and seconds >= budget)
            due = (time.time() - last_ckpt >= cfg.checkpoint_minutes * 60) if budget else step % cfg.checkpoint_every == 0
            if done or due or (budget is None and step % cfg.eval_every == 0):
                rec.update(_validate(sam, cfg))
                bar.write(f"step {step} ({seconds / 3600:.2f} h): val point mIoU {rec['val_point']:.3f}, "
                          f"box {rec['val_box']:.3f}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if done or due:
                save_atomic({"model": sam.state_dict(), "optimizer": opt.state_dict(), "step": step,
                             "train_seconds": seconds, "config": json.dumps(asdict(cfg))}, run / "checkpoint.pt")
                last_ckpt = time.time()
    bar.close()
    final = run / "sam_tiny.pt"
    torch.save(sam.eval().state_dict(), final)
    return final


@torch.no_grad()
def iou_head_samples(sam: Sam, seeds: list[int], seed: int = 0,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The IoU head's inputs (its token from the decoder) and targets (the true IoU of each of the
    four masks at the image's resolution) on the scenes of `seeds`: for every object, its protocol
    point, a random point inside it and its exact box. Notebook 00, "What the IoU head's choice costs"."""
    sam.eval()
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(seed)
    feats: list[torch.Tensor] = []
    hook = sam.mask_decoder.iou_prediction_head.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    targets: list[list[float]] = []
    try:
        for s in tqdm(seeds, desc="IoU head samples", disable=not progress, leave=False):
            scene = scenes.make_scene(s)
            predictor.set_image(scene.image)
            size = scene.image.shape[:2]
            centre = np.array([evaluate.point_prompt(m) for m in scene.masks], np.float32)
            inside = np.array([_sample_point(m, rng) for m in scene.masks], np.float32)
            boxes = np.array([evaluate.box_prompt(m) for m in scene.masks], np.float32)
            labels = torch.ones((len(scene.masks), 1), dtype=torch.int)
            for pts in (centre, inside):
                coords = torch.as_tensor(predictor.transform.apply_coords(pts[:, None], size), dtype=torch.float)
                targets += _four_ious(predictor, scene.masks, points=(coords, labels))
            box_t = torch.as_tensor(predictor.transform.apply_boxes(boxes, size), dtype=torch.float)
            targets += _four_ious(predictor, scene.masks, boxes=box_t)
    finally:
        hook.remove()
    return torch.cat(feats), torch.tensor(targets)


def _four_ious(predictor: SamPredictor, gts: np.ndarray, points=None, boxes=None) -> list[list[float]]:
    """True IoU of all four of the decoder's masks (single-mask output first) for each prompt."""
    masks, _ = evaluate.four_masks(predictor, points=points, boxes=boxes)
    return [[evaluate.iou(m, gt) for m in ms] for ms, gt in zip(masks, gts)]


def fit_iou_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3000,
                 lr: float = 1e-3, rank_weight: float = 0.1, batch: int = 256, seed: int = 0) -> list[float]:
    """Fit SAM's IoU head on cached samples (`iou_head_samples`): SAM's squared error on all four
    IoUs, plus a ranking term (cross-entropy over masks 1-3 towards the truly best one, at
    temperature 0.05), since the protocol keeps only the mask ranked first. Returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    head.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, lr, 0, steps)
        idx = torch.randint(len(x), (batch,), generator=gen)
        pred, true = head(x[idx]), y[idx]
        loss = F.mse_loss(pred, true)
        if rank_weight:
            loss = loss + rank_weight * F.cross_entropy(pred[:, 1:] / 0.05, true[:, 1:].argmax(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    head.eval()
    return losses


def tune_iou_head(init: str | Path, out: str | Path, n_scenes: int = 3000, scene_offset: int = 5_000_000,
                  steps: int = 3000, lr: float = 1e-3, rank_weight: float = 0.1, val_scenes: int = 150,
                  threads: int = 0, progress: bool = True) -> dict:
    """A last training phase that refits only the IoU head of the tiny weights `init` (every mask
    stays as it was): samples from `n_scenes` training scenes from `scene_offset` on, a fit, and
    the point-prompt mIoU on `val_scenes` validation scenes before and after. Writes
    out/sam_tiny.pt and out/log.json; returns the log."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    sam = models.build_sam(models.CONFIGS["tiny"])
    sam.load_state_dict(models.read_checkpoint(init, "tiny"))
    sam.eval()
    before = evaluate.evaluate_scenes(sam, val_scenes, "point", split="val", progress=False)
    t0, c0 = time.time(), time.process_time()
    seeds = [scenes.TRAIN_SEED_BASE + scene_offset + i for i in range(n_scenes)]
    x, y = iou_head_samples(sam, seeds, progress=progress)
    losses = fit_iou_head(sam.mask_decoder.iou_prediction_head, x, y, steps, lr, rank_weight)
    train_s = step_seconds(time.time() - t0, time.process_time() - c0, torch.get_num_threads())
    after = evaluate.evaluate_scenes(sam, val_scenes, "point", split="val", progress=False)
    torch.save(sam.state_dict(), run / "sam_tiny.pt")
    log = {"init": str(init), "n_scenes": n_scenes, "scene_offset": scene_offset, "samples": len(x),
           "steps": steps, "lr": lr, "rank_weight": rank_weight, "train_s": round(train_s, 1),
           "cpu": _cpu_name(), "threads": torch.get_num_threads(), "first_loss": losses[0],
           "last_loss": float(np.mean(losses[-100:])), "val_scenes": val_scenes,
           "val_point_before": round(before.miou, 4), "val_point_after": round(after.miou, 4),
           "val_point_difference": evaluate.paired_difference(after, before)}
    (run / "log.json").write_text(json.dumps(log, indent=1))
    return log
