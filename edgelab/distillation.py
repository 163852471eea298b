"""Decoupled distillation of SAM's image encoder into small CNN students (chapter 04).

Taught in notebook 04. MobileSAM's recipe, as Adewale's thesis slides on compressing SAM apply it: the
teacher's image encoder turns an image into an embedding; a student encoder learns to produce
the same embedding (Huber loss by default, MSE or L1 as options); the teacher's prompt encoder
and mask decoder are reused frozen, so the student drops into `SamPredictor` unchanged.

Students (`STUDENTS`), all from random initialisation (nothing can be downloaded here):
  - resnet18:       ResNet-18's first three stages (torchvision's BasicBlock), width-scaled,
                    behind a strided stem that reads the full image (ResNet's own stem optional);
  - resnet18_w32:   the same at twice the width (32, 64, 128 channels), the shipped student;
  - mobilenet_v3:   torchvision's MobileNetV3-Large, its first stages up to stride 8;
  - efficientvit_b0: timm's EfficientViT-B0, its first stages up to stride 8.
A stride-8 trunk reads the image at half the teacher's side (a 2x2 average: the pixels a CNN
needs to find 16x16 tokens' worth of edges). Each student ends in a neck that maps its channels
to the teacher's embedding (a 1x1 convolution and LayerNorm2d, the first half of SAM's neck).
Two optional losses put the frozen decoder in the loop: `prompt_loss` (its masks from the
student's embedding against those from the teacher's, EdgeSAM's idea) and `task_loss` (against the
scenes' exact instance masks; the shipped student's last stage).

The same training runs under `torchrun` with DistributedDataParallel (section "More than one
machine"): `torchrun --nproc-per-node 2 -m edgelab distill --out runs/distill` (the CLI's verb calls `run`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from tqdm.auto import tqdm

from . import bench, evaluate, models, scenes, training

LOSSES = ("huber", "mse", "l1")
DATA_DIR = models.DATA_DIR
SCENE_OFFSET = 6_000_000  # distillation scenes: away from tiny's training seeds and the eval split


# ---------------------------------------------------------------- students

def resnet18_trunk(width: int = 16, stem: str = "strided") -> tuple[nn.Module, int, int]:
    """ResNet-18's first three stages (two torchvision BasicBlocks each), channels width, 2w, 4w.

    Stage 3 keeps stride 1 instead of 2 (the segmentation networks' "output stride 8" trick).
    `stem="resnet"` is ResNet's own stem (7x7 stride-2 convolution, 3x3 stride-2 max-pool) on a
    half-size image. `stem="strided"` (the default, section "Making the student fast") reads the
    full image with a 4x4 stride-4 convolution and a 3x3 stride-2 one: the same 32x32 map for
    stage 1 without the resampling, the 7x7 kernel and the max-pool, which cost a batch-1 CPU
    more than their MACs suggest. Returns (trunk, output channels, stride).
    """
    from torchvision.models.resnet import BasicBlock
    if stem not in ("strided", "resnet"):
        raise ValueError(f"unknown stem {stem!r}; choose strided or resnet")
    if stem == "strided":
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 4, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    else:
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, stride in enumerate((1, 2, 1)):
        c = width * 2 ** i
        down = None if (stride == 1 and cin == c) else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        layers += [BasicBlock(cin, c, stride, down), BasicBlock(c, c)]
        cin = c
    return nn.Sequential(*layers), cin, 16 if stem == "strided" else 8


def mobilenet_v3_trunk(width_mult: float = 1.0) -> tuple[nn.Module, int, int]:
    """torchvision's MobileNetV3-Large up to its last stride-8 block (features[:7])."""
    from torchvision.models import mobilenet_v3_large
    feats = mobilenet_v3_large(width_mult=width_mult).features[:7]
    return feats, feats[-1].out_channels, 8


class _TimmStage(nn.Module):
    """timm's features_only wrapper returns a list: keep its last map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


def efficientvit_trunk(name: str = "efficientvit_b0") -> tuple[nn.Module, int, int]:
    """timm's EfficientViT-B0 (MIT's, with ReLU linear attention) up to stride 8."""
    import timm
    m = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1,))
    return _TimmStage(m), m.feature_info.channels()[-1], m.feature_info.reduction()[-1]


STUDENTS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "resnet18": resnet18_trunk,
    "resnet18_w32": lambda: resnet18_trunk(width=32),  # twice the width: the shipped student
    "mobilenet_v3": mobilenet_v3_trunk,
    "efficientvit_b0": efficientvit_trunk,
}


class StudentEncoder(nn.Module):
    """A CNN trunk and a neck standing in for SAM's ImageEncoderViT (section "Training the students").

    Takes the same normalised, padded (img_size x img_size) input as the teacher's encoder and
    returns an embedding of the same shape: (B, out_chans, grid, grid).
    """

    def __init__(self, kind: str, img_size: int = 256, grid: int = 16, out_chans: int = 128,
                 input_size: int | None = None):
        super().__init__()
        if kind not in STUDENTS:
            raise ValueError(f"unknown student {kind!r}; choose from {', '.join(STUDENTS)}")
        self.trunk, chans, self.stride = STUDENTS[kind]()
        input_size = input_size or min(img_size, grid * self.stride)  # the trunk's output is the grid
        if img_size % input_size:
            raise ValueError(f"input_size {input_size} must divide img_size {img_size}")
        self.kind, self.img_size, self.grid, self.input_size = kind, img_size, grid, input_size
        for m in self.trunk.modules():  # torchvision's MobileNets keep 0.01: too slow for short runs
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        self.neck = nn.Sequential(nn.Conv2d(chans, out_chans, 1, bias=False), LayerNorm2d(out_chans))

    channels_last = False  # set by `deployable`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:  # at a factor of 2 this is exactly a 2x2 average
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.trunk(x)
        if f.shape[-1] != self.grid:
            f = F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.neck(f).contiguous()


def deployable(sam: Sam) -> Sam:
    """The student as it would ship (section "Making the student fast"): every BatchNorm folded
    into the convolution before it (torch.fx's `fuse`) and channels-last memory, which lets
    oneDNN skip a layout conversion per convolution. Same outputs up to float rounding."""
    from torch.fx.experimental.optimization import fuse
    enc = copy.deepcopy(sam.image_encoder).eval()
    try:
        enc.trunk = fuse(enc.trunk)
    except Exception as e:  # noqa: BLE001 - a trunk torch.fx cannot trace keeps its BatchNorms, and says so
        warnings.warn(f"{sam.edgelab.name}: BatchNorms left unfolded, torch.fx could not trace the trunk "
                      f"({type(e).__name__}: {e}); the student still runs, channels-last only", stacklevel=2)
    enc = enc.to(memory_format=torch.channels_last)
    enc.channels_last = True
    out = student_sam(sam, enc)
    out.edgelab = models.LoadedSam(sam.edgelab.name + " (deployable)", "trained", "distilled")
    return out


def student_sam(teacher: Sam, encoder: nn.Module) -> Sam:
    """A SAM whose image encoder is `encoder` and whose prompt encoder and mask decoder are the
    teacher's, frozen and shared (section "Training the students")."""
    for p in list(teacher.prompt_encoder.parameters()) + list(teacher.mask_decoder.parameters()):
        p.requires_grad_(False)
    sam = Sam(image_encoder=encoder, prompt_encoder=teacher.prompt_encoder,
              mask_decoder=teacher.mask_decoder, pixel_mean=teacher.pixel_mean.flatten().tolist(),
              pixel_std=teacher.pixel_std.flatten().tolist())
    sam.edgelab = models.LoadedSam(f"student:{getattr(encoder, 'kind', type(encoder).__name__)}",
                                   "trained", "distilled")
    return sam.to(teacher.device).eval()


def make_student(teacher: Sam, kind: str, seed: int = 0) -> Sam:
    """A fresh (randomly initialised) student of family `kind` wired to `teacher`'s decoder."""
    torch.manual_seed(seed)
    student = StudentEncoder(kind, img_size=teacher.image_encoder.img_size,
                             grid=teacher.prompt_encoder.image_embedding_size[0],
                             out_chans=teacher.prompt_encoder.embed_dim)
    return student_sam(teacher, student.to(teacher.device))


# ---------------------------------------------------------------- the loss

def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "huber",
                   delta: float = 1.0) -> torch.Tensor:
    """Distance between two embeddings, averaged over every element (section "Huber, MSE or L1?").

    huber: 0.5 e^2 where |e| <= delta, else delta (|e| - 0.5 delta), with e = student - teacher
    (quadratic near the target, linear for outliers); mse: e^2; l1: |e|.
    """
    if kind == "huber":
        return F.huber_loss(student, teacher, delta=delta)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "l1":
        return F.l1_loss(student, teacher)
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


def prompt_loss(sam: Sam, student_emb: torch.Tensor, teacher_emb: torch.Tensor, points: int,
                gen: torch.Generator) -> torch.Tensor:
    """Prompt-in-the-loop distillation (EdgeSAM's idea; section "Training the students"): for
    `points` random one-point prompts per image, SAM's frozen decoder draws its three masks from
    the student's embedding and from the teacher's; the loss is the binary cross-entropy of the
    student's mask logits against the teacher's mask probabilities. Gradients reach the student
    through the decoder, whose weights stay as they are."""
    size = sam.image_encoder.img_size
    pe = sam.prompt_encoder.get_dense_pe()
    losses = []
    for i in range(student_emb.shape[0]):
        pts = torch.rand(points, 1, 2, generator=gen).to(student_emb.device) * size
        labels = torch.ones(points, 1, dtype=torch.int, device=student_emb.device)
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
            target, _ = sam.mask_decoder(teacher_emb[i:i + 1], pe, sparse, dense, multimask_output=True)
        logits, _ = sam.mask_decoder(student_emb[i:i + 1], pe, sparse, dense, multimask_output=True)
        losses.append(F.binary_cross_entropy_with_logits(logits, torch.sigmoid(target)))
    return torch.stack(losses).mean()


# The prompts of task_loss: tiny's own mix per image (section "The shipped student"), one
# two-points-and-a-negative prompt instead of two.
TASK_PROMPTS = training.TrainConfig(point_prompts=4, box_prompts=2, multi_prompts=1)


def task_loss(sam: Sam, student_emb: torch.Tensor, seeds: list[int], rng: np.random.Generator) -> torch.Tensor:
    """Fine-tuning on the task itself (section "The shipped student"): the scenes of `seeds`
    are drawn again for their exact instance masks, prompted as tiny was trained, and the frozen
    decoder's masks from the student's embedding are scored with SAM's loss against them
    (`training.scene_loss`). Unlike the embedding and prompt losses, the target is the ground
    truth, not the teacher: the student can learn what the teacher gets wrong."""
    batch = [scenes.make_scene(s, size=sam.image_encoder.img_size) for s in seeds]
    return training.scene_loss(sam, student_emb, batch, TASK_PROMPTS, rng)["loss_tensor"]


# ---------------------------------------------------------------- training

@dataclass
class DistillConfig:
    """Everything that fixes a distillation run (quick profile by default)."""

    student: str = "resnet18"
    steps: int = 600
    batch_images: int = 16
    lr: float = 3e-3  # peak of a cosine decay after warm-up
    weight_decay: float = 1e-4
    warmup: int = 20
    loss: str = "huber"
    delta: float = 1.0  # Huber's switch from quadratic to linear
    seed: int = 0
    pool_scenes: int = 768  # training scenes embedded once by the teacher
    eval_every: int = 0  # 0: evaluate only at the end
    eval_scenes: int = 20
    checkpoint_every: int = 100
    threads: int = 0  # 0: torch's default
    init: str = ""  # a saved student to start from (a warm start) instead of random weights
    prompt_weight: float = 0.0  # > 0: add prompt_loss, this many times, to the embedding loss
    prompt_points: int = 8  # random point prompts per image for prompt_loss
    task_weight: float = 0.0  # > 0: add task_loss (the scenes' exact masks), this many times

    def check(self) -> None:
        """Raise ValueError for a parameter out of range."""
        if self.student not in STUDENTS:
            raise ValueError(f"unknown student {self.student!r}; choose from {', '.join(STUDENTS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.steps < 1 or self.batch_images < 1 or self.pool_scenes < self.batch_images:
            raise ValueError("steps and batch_images must be 1 or more, pool_scenes at least batch_images")
        if self.prompt_weight < 0 or self.prompt_points < 1:
            raise ValueError("prompt_weight must be 0 or more and prompt_points 1 or more")
        if self.task_weight < 0:
            raise ValueError(f"task_weight must be 0 or more, not {self.task_weight}")
        if not (self.lr > 0 and self.delta > 0):
            raise ValueError("lr and delta must be positive")


def _lr_at(step: int, cfg: DistillConfig) -> float:
    return training.warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)


@dataclass
class EmbeddingPool:
    """Training scenes and the teacher's embedding of each, computed once (section "Decoupled").

    Decoupling is what makes distillation cheap: the teacher runs once per scene, not once per
    step, and a step costs only the student's forward and backward pass.
    """

    images: torch.Tensor  # (N, 3, S, S) uint8, the teacher's input size
    targets: torch.Tensor  # (N, C, g, g) float16 teacher embeddings
    seeds: list[int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.seeds)

    def batch(self, idx: torch.Tensor, sam: Sam) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and float32 targets of the scenes at `idx`."""
        return normalised(self.images[idx], sam), self.targets[idx].float().to(sam.device)


normalised = models.normalised  # notebook 04 calls it as D.normalised


def build_pool(teacher: Sam, n: int, offset: int = SCENE_OFFSET, chunk: int = 32,
               progress: bool = True) -> EmbeddingPool:
    """Draw `n` training scenes (seeds offset, offset+1, ...) and the teacher's embedding of each."""
    if n < 1:
        raise ValueError(f"the pool needs at least one scene, not {n}")
    seeds = list(range(offset, offset + n))
    images, targets = [], []
    with torch.inference_mode():
        for i in tqdm(range(0, n, chunk), desc="teacher embeddings", disable=not progress, leave=False):
            imgs = torch.stack([torch.from_numpy(scenes.make_scene(s).image) for s in seeds[i:i + chunk]])
            imgs = imgs.permute(0, 3, 1, 2).contiguous()
            images.append(imgs)
            targets.append(teacher.image_encoder(normalised(imgs, teacher)).half().cpu())
    return EmbeddingPool(torch.cat(images), torch.cat(targets), seeds)


def warm_start(sam: Sam, teacher: Sam, path: str | Path) -> Sam:
    """`sam`'s student with the weights of the student saved at `path` (same family, or an error)."""
    start = load_student(path, teacher)
    if start.image_encoder.kind != sam.image_encoder.kind:
        raise ValueError(f"{path} holds a {start.image_encoder.kind} student, not {sam.image_encoder.kind}")
    return start


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers, in order: equal digests, equal weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _advance(perm: torch.Tensor, pos: int, batch: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Move through a shuffled epoch of the pool; draw a new order when fewer than `batch` remain."""
    pos += batch
    if pos + batch > n:
        return torch.randperm(n, generator=gen), 0
    return perm, pos


def train_student(teacher: Sam, run_dir: str | Path, cfg: DistillConfig = DistillConfig(),
                  pool: EmbeddingPool | None = None, resume: bool = True, progress: bool = True) -> Sam:
    """Distil `teacher`'s image encoder into a new student (section "Training the student").

    Writes to run_dir: config.json, log.jsonl (step, loss, lr, elapsed_s; point mIoU on validation
    scenes at evaluations),
    checkpoint.pt (student, optimizer, step; resumed when present) and student.pt (the final
    encoder weights with its family). Under torchrun, each rank draws its own scenes and
    DistributedDataParallel averages the gradients; rank 0 writes the files.
    Returns the student wired to the teacher's frozen prompt encoder and mask decoder.
    """
    cfg.check()
    rank, world = _rank_world()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = teacher.eval()
    sam = make_student(teacher, cfg.student, seed=cfg.seed)
    if cfg.init:
        sam = warm_start(sam, teacher, cfg.init)
    student = sam.image_encoder.train()
    prompts = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7)
    task_rng = np.random.default_rng(cfg.seed * 1000 + rank + 11)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, ckpt = 0, run / "checkpoint.pt"
    if resume and ckpt.is_file():
        start = int(training.resume_state(student, opt, ckpt, teacher.device)["step"])
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    if rank == 0:
        (run / "config.json").write_text(json.dumps({**asdict(cfg), "world_size": world}, indent=1))
        log = open(run / "log.jsonl", "a")
    if pool is None:  # under torchrun each rank embeds its own share of the scenes
        share = math.ceil(cfg.pool_scenes / world)
        pool = build_pool(teacher, share, SCENE_OFFSET + rank * share, progress=progress and rank == 0)
    order = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    perm, pos = torch.randperm(len(pool), generator=order), 0
    for _ in range(start):  # resume: replay the draws of the steps already done
        perm, pos = _advance(perm, pos, cfg.batch_images, len(pool), order)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"distil {cfg.student}",
               disable=not progress or rank != 0)
    for step in bar:
        idx = perm[pos:pos + cfg.batch_images]
        perm, pos = _advance(perm, pos, cfg.batch_images, len(pool), order)
        x, target = pool.batch(idx, teacher)
        emb = model(x)
        loss = embedding_loss(emb, target, cfg.loss, cfg.delta)
        if cfg.prompt_weight > 0:
            loss = loss + cfg.prompt_weight * prompt_loss(sam, emb, target.float(), cfg.prompt_points, prompts)
        if cfg.task_weight > 0:
            loss = loss + cfg.task_weight * task_loss(sam, emb, [pool.seeds[i] for i in idx.tolist()], task_rng)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank != 0:
            continue
        rec = {"step": step + 1, "loss": round(float(loss.detach()), 6), "lr": _lr_at(step, cfg),
               "elapsed_s": round(time.time() - t0, 1)}
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        last = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            student.eval()
            rec["miou_point"] = evaluate.evaluate_scenes(sam, cfg.eval_scenes, "point", progress=False,
                                                         split="val").miou
            student.train()
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            training.save_atomic({"model": student.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, ckpt)
    student.eval()
    if world > 1:  # DDP keeps parameters equal; BatchNorm statistics of the last step are rank 0's
        for b in student.buffers():
            dist.broadcast(b, 0)
    if rank == 0:
        log.close()
        save_student(sam, run / "student.pt", cfg=cfg)
    return sam


# ---------------------------------------------------------------- saving and loading

def save_student(sam: Sam, path: str | Path, cfg: DistillConfig | None = None) -> Path:
    """Write the student encoder's weights with its family and sizes (weights_only loadable)."""
    enc = sam.image_encoder
    meta = {"kind": enc.kind, "img_size": enc.img_size, "grid": enc.grid, "input_size": enc.input_size,
            "out_chans": enc.neck[0].out_channels, "config": asdict(cfg) if cfg else None}
    path = Path(path)
    torch.save({"student": json.dumps(meta), "model": enc.state_dict()}, path)
    return path


def load_student(path: str | Path, teacher: Sam) -> Sam:
    """Rebuild a saved student and wire it to `teacher`'s decoder; clear errors for bad files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise models.CheckpointError(f"student checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise models.CheckpointError(f"{p} is not a loadable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "student" not in state or "model" not in state:
        raise models.CheckpointError(f"{p} is not a student saved by edgelab (no 'student' entry)")
    meta = json.loads(state["student"])
    if meta["out_chans"] != teacher.prompt_encoder.embed_dim:
        raise models.CheckpointError(f"{p} is a student for a {meta['out_chans']}-channel embedding, "
                                     f"but this teacher's decoder takes {teacher.prompt_encoder.embed_dim}")
    enc = StudentEncoder(meta["kind"], meta["img_size"], meta["grid"], meta["out_chans"], meta["input_size"])
    try:
        enc.load_state_dict(state["model"])
    except RuntimeError as e:
        raise models.CheckpointError(f"{p}: weights do not fit a {meta['kind']} student "
                                     f"({str(e).splitlines()[0][:120]})") from None
    return student_sam(teacher, enc.to(teacher.device))


SHIPPED = DATA_DIR / "sam_tiny_student.pt"
SHIPPED_SHA256 = DATA_DIR / "sam_tiny_student.sha256"


def load_shipped_student(teacher: Sam) -> Sam:
    """The student shipped in data/ (trained with the full recipe), its sha256 verified first."""
    if not SHIPPED.is_file():
        raise models.CheckpointError(f"no shipped student at {SHIPPED}: run `edgelab distill --profile full`")
    models.verify_sha256(SHIPPED, SHIPPED_SHA256, "rerun `edgelab distill --profile full --student resnet18_w32`")
    return load_student(SHIPPED, teacher)


# ---------------------------------------------------------------- the students table

def eval_images(n: int) -> list[np.ndarray]:
    """The first `n` images of the fixed eval split."""
    ds = scenes.SceneDataset("eval", n)
    return [ds.scene(i).image for i in range(len(ds))]


def students_table(teacher: Sam, students: dict[str, Sam], n_eval: int = 20, repeats: int = 30,
                   progress: bool = True, number: int = 10) -> list[dict]:
    """The slides' table on our models (section "The slides' table on our models"): one row per model with
    params, MACs, encoder latency (batch 1, blocks of `number` consecutive frames, all models
    interleaved in one run), speed-up over the teacher, point mIoU against the ground truth and
    agreement (mIoU) with the teacher's masks."""
    everyone = {"teacher": teacher, **students}
    x = torch.randn(1, 3, teacher.image_encoder.img_size, teacher.image_encoder.img_size, device=teacher.device)
    with torch.inference_mode():  # blocks of `number` frames: the steady state of a video stream
        times = {r["name"]: r for r in bench.race({k: (lambda m=m: m.image_encoder(x)) for k, m in everyone.items()},
                                                  "teacher", warmup=3, repeats=repeats, number=number)}
    images = eval_images(n_eval)
    rows = []
    for name, sam in tqdm(everyone.items(), desc="students table", disable=not progress, leave=False):
        row = {"name": name, "params": models.count_params(sam.image_encoder), "macs": bench.encoder_macs(sam),
               "median_s": times[name]["median_s"], "iqr_s": times[name]["iqr_s"],
               "embedding_rel_err": times[name]["rel_err"],
               "speedup": times["teacher"]["median_s"] / times[name]["median_s"],
               "miou": evaluate.evaluate_scenes(sam, n_eval, "point", progress=False).miou}
        row["agreement"] = 1.0 if sam is teacher else evaluate.agreement(sam, teacher, images, progress=False).miou
        rows.append(row)
    return rows


def students_reading(rows: list[dict]) -> str:
    """The reading of the students table (section "The slides' table on our models"), generated from its rows.

    Arguments:
        rows: `students_table`'s rows; the one named "teacher" is the reference.
    Returns:
        Sentences naming the student that keeps the most of the teacher's mIoU per millisecond of
        encoder time (its share of the teacher's mIoU and its speed-up), the most accurate student
        when that is another one, and the students whose agreement with the teacher's masks is
        below their own mIoU against the ground truth.
    """
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    students = [r for r in rows if r["name"] != "teacher"]
    if teacher is None or not students:
        raise ValueError("the students table needs a row named 'teacher' and at least one student")

    def kept(r: dict) -> float:
        return r["miou"] / teacher["miou"] if teacher["miou"] > 0 else 0.0

    def pace(r: dict) -> str:
        s = teacher["median_s"] / r["median_s"]
        return f"{s:.2f}x faster than" if s >= 1 else f"{1 / s:.2f}x slower than"

    best = max(students, key=lambda r: kept(r) / r["median_s"])
    text = (f"Per millisecond of encoder time, {best['name']} keeps the most of the teacher's mIoU: {kept(best):.0%} of it "
            f"({best['miou']:.3f} against {teacher['miou']:.3f}) in {best['median_s'] * 1e3:.2f} ms, {pace(best)} "
            f"the teacher's encoder ({teacher['median_s'] * 1e3:.2f} ms).")
    top = max(students, key=lambda r: r["miou"])
    if top["miou"] > best["miou"]:
        text += (f" The most accurate student is {top['name']} ({kept(top):.0%} of the teacher's mIoU, "
                 f"{pace(top)} the teacher).")
    else:
        text += " No student is more accurate than it."
    below = [r["name"] for r in students if r["agreement"] < r["miou"]]
    text += (f" Agreement with the teacher's masks is below the mIoU against the ground truth for {', '.join(below)}."
             if below else " Every student agrees with the teacher's masks at least as well as with the ground truth.")
    return text


def bench_distill(teacher: Sam, students: dict[str, Sam], scenes: int = 20, repeats: int = 30,
                  progress: bool = False) -> dict:
    """`edgelab bench distill`: `students_table` as a bench record, with each student's mIoU as a
    fraction of the teacher's."""
    rows = students_table(teacher, students, n_eval=scenes, repeats=repeats, progress=progress)
    keep = ("name", "params", "macs", "median_s", "miou", "agreement")
    record = bench.bench_record("teacher", "trained", [{k: r[k] for k in keep} for r in rows])
    record["distill"] = {"speedup_vs_teacher": {r["name"]: r["speedup"] for r in rows},
                         "miou_vs_teacher": {r["name"]: r["miou"] / rows[0]["miou"] for r in rows},
                         "eval_scenes": scenes, "image_size": teacher.image_encoder.img_size}
    return record


# ---------------------------------------------------------------- one run, alone or under torchrun

PROFILES = {"quick": {"steps": 600, "pool_scenes": 768},
            "full": {"steps": 8000, "pool_scenes": 4096}}


def profile_config(profile: str = "quick", **overrides) -> DistillConfig:
    """A `DistillConfig` with a profile's steps and scene pool, then `overrides` (None: keep)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    cfg = DistillConfig(**{**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}})
    cfg.check()
    return cfg


def run(cfg: DistillConfig, out: str | Path, fresh: bool = False, progress: bool = True) -> dict | None:
    """Train one student (`edgelab distill`), alone or as one rank of a torchrun job (section
    "More than one machine"). Rank 0 returns (and writes to ranks.json) every rank's weights
    digest, so a run can prove they agree; other ranks return None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cpu"
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    elif torch.cuda.is_available():
        device = "cuda"
    rank, world = _rank_world()
    try:
        teacher = models.load_sam("tiny", device=device)
        sam = train_student(teacher, out, cfg, resume=not fresh, progress=progress and rank == 0)
        digests = [weights_digest(sam.image_encoder)]
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, weights_digest(sam.image_encoder))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    last = [json.loads(line) for line in open(Path(out) / "log.jsonl")][-1]
    record = {"student": str(Path(out) / "student.pt"), "world_size": world, "rank_digests": digests,
              "ranks_agree": len(set(digests)) == 1, "steps": last["step"], "loss": last["loss"],
              "miou_point": last.get("miou_point"), "train_s": last["elapsed_s"]}
    (Path(out) / "ranks.json").write_text(json.dumps(record, indent=1))
    return record
