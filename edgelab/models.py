"""SAM models: the embedded `tiny` and SAM's real `vit_b`, `vit_l`, `vit_h`.

Taught in notebook 00, sections "SAM's three parts" and "Your own checkpoint". Every model is
built from segment_anything's own classes, so `SamPredictor` works on each of them unchanged.
Weights come from one of three places, and every result says which (`weights_kind`):
  - "trained":    the tiny model shipped in data/ (trained here on generated scenes);
  - "checkpoint": a file of the user's, loaded with torch.load(weights_only=True);
  - "random":     random initialisation, only when asked for, good for timing and nothing else.
"""
from __future__ import annotations

import copy
import hashlib
import re
import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)
from segment_anything.modeling.image_encoder import Attention as SamAttention, PatchEmbed

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TINY_WEIGHTS = DATA_DIR / "sam_tiny.pt"
TINY_SHA256 = DATA_DIR / "sam_tiny.sha256"
WEIGHT_KINDS = ("trained", "random", "checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, not a checkpoint, or another model's."""


@dataclass(frozen=True)
class SamConfig:
    """The numbers that fix a SAM architecture (segment_anything's builders, made explicit)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_dim: int = 256  # neck output = prompt embedding = decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    stem: tuple[int, ...] = ()  # widths of stride-2 3x3 convs in front of the patch embedding

    @property
    def patch_stride(self) -> int:
        """Stride of the patch embedding's own conv (what the stem leaves of the patch size)."""
        return self.patch_size // 2 ** len(self.stem)

    @property
    def grid(self) -> int:
        """Tokens per side of the image embedding."""
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class OfficialCheckpoint:
    """What edgelab knows of a file Meta published."""

    filename: str
    size_bytes: int
    sha256: str | None = None


CONFIGS: dict[str, SamConfig] = {
    # The embedded default: 256 px input, a conv stem (two stride-2 3x3 convs, 32 and 64 channels)
    # and a 4 px patch embedding -> 16x16 tokens, windows of 8x8 tokens.
    "tiny": SamConfig(img_size=256, patch_size=16, embed_dim=128, depth=6, num_heads=4,
                      global_attn_indexes=(2, 5), window_size=8, prompt_dim=128,
                      decoder_mlp_dim=512, decoder_heads=4, stem=(32, 64)),
    "vit_b": SamConfig(1024, 16, 768, 12, 12, (2, 5, 8, 11), 14),
    "vit_l": SamConfig(1024, 16, 1024, 24, 16, (5, 11, 17, 23), 14),
    "vit_h": SamConfig(1024, 16, 1280, 32, 16, (7, 15, 23, 31), 14),
}

OFFICIAL: dict[str, OfficialCheckpoint] = {  # Meta's published files: names, sizes and sha256
    "vit_b": OfficialCheckpoint("sam_vit_b_01ec64.pth", 375_042_383,
                                "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": OfficialCheckpoint("sam_vit_l_0b3195.pth", 1_249_524_607,
                                "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": OfficialCheckpoint("sam_vit_h_4b8939.pth", 2_564_550_879,
                                "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


def checksum_status(path: Path, name: str) -> str:
    """'official' for Meta's file of `name` with the published sha256; 'unknown' for any other
    file (a fine-tuned or renamed checkpoint still loads). Raises CheckpointError for a file
    named like the official one whose size or sha256 differs (a truncated or corrupt download)."""
    official = OFFICIAL.get(name)
    if official is None or path.name != official.filename:
        return "unknown"
    size = path.stat().st_size
    if size != official.size_bytes:
        raise CheckpointError(f"{path} is {size:,} bytes but the official {official.filename} "
                              f"is {official.size_bytes:,}: an incomplete download or a corrupt file")
    digest = sha256_of(path)
    if official.sha256 and digest != official.sha256:
        raise CheckpointError(f"{path}: sha256 {digest} is not the official {official.filename}'s "
                              f"{official.sha256}: a corrupt or altered file")
    return "official"


class StemPatchEmbed(PatchEmbed):
    """SAM's patch embedding behind a small convolutional stem (notebook 00, "The embedded model").

    The stem's stride-2 3x3 convs see pixels at full resolution before the patch conv folds them
    into tokens; `proj` stays the last conv (stride patch_size / 2**len(stem)), as in SAM, so the
    token grid, the blocks and the neck are unchanged.
    """

    def __init__(self, widths: tuple[int, ...], patch_stride: int, embed_dim: int):
        super().__init__(kernel_size=(patch_stride, patch_stride), stride=(patch_stride, patch_stride),
                         in_chans=widths[-1], embed_dim=embed_dim)
        layers: list[torch.nn.Module] = []
        for c_in, c_out in zip((3,) + widths[:-1], widths):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), torch.nn.GELU()]
        self.stem = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


def build_sam(cfg: SamConfig) -> Sam:
    """Assemble SAM from segment_anything's classes for the architecture `cfg` (random init)."""
    encoder = ImageEncoderViT(
        depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.num_heads,
        patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=cfg.global_attn_indexes, window_size=cfg.window_size,
        out_chans=cfg.prompt_dim)
    if cfg.stem:
        if cfg.patch_size % 2 ** len(cfg.stem):
            raise ValueError(f"a stem of {len(cfg.stem)} stride-2 convs does not divide patch size {cfg.patch_size}")
        encoder.patch_embed = StemPatchEmbed(cfg.stem, cfg.patch_stride, cfg.embed_dim)
    prompt = PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(cfg.grid, cfg.grid),
                           input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.prompt_dim,
                                      mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.prompt_dim)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def normalised(images: Sequence[np.ndarray] | torch.Tensor, sam: Sam) -> torch.Tensor:
    """HxWx3 uint8 images (or an (N,3,H,W) uint8 tensor) of the encoder's input size -> SAM's
    normalised input batch, on the model's device: `Sam.preprocess` without the padding, for
    the training loops of notebooks 00, 02 and 04, whose scenes are already that size."""
    if not torch.is_tensor(images):
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(i)) for i in images]).permute(0, 3, 1, 2)
    return (images.float().to(sam.device) - sam.pixel_mean) / sam.pixel_std


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _guess_architecture(state: dict[str, torch.Tensor]) -> str:
    """Name the architecture a state dict was saved from, from its shapes (or 'unknown')."""
    for name, cfg in CONFIGS.items():
        if _shape_mismatches(state, build_shapes(name)) == []:
            return name
    w = state.get("image_encoder.patch_embed.proj.weight")
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    if w is not None:
        return f"unknown (embed_dim {w.shape[0]}, depth {depth})"
    return "unknown (no SAM image encoder in it)"


_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def build_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of architecture `name`, without allocating its weights."""
    if name not in _SHAPES_CACHE:
        with torch.device("meta"):
            model = build_sam(CONFIGS[name])
        _SHAPES_CACHE[name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPES_CACHE[name]


def _shape_mismatches(state: dict, expected: dict[str, tuple[int, ...]]) -> list[str]:
    problems = [k for k in expected if k not in state]
    problems += [k for k in state if k not in expected]
    problems += [k for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    return problems


def read_checkpoint(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """Load and vet the state dict at `path` for architecture `name`; raise CheckpointError if unusable.

    Checks, in order: the file exists; its size and sha256 when it carries an official name;
    it unpickles with weights_only=True; it holds a state dict; its shapes fit `name`.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder: give the checkpoint file in it")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    checksum_status(p, name)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unsafe-global errors all mean: not a usable checkpoint
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        if unsafe:
            raise CheckpointError(f"{p} holds pickled Python objects ({unsafe.group(1)}) that "
                                  "weights_only=True refuses to load: not a plain state dict") from None
        kind = "corrupt or truncated" if p.stat().st_size else "empty"
        inner = re.search(r"WeightsUnpickler error: (.*)", text)
        msg = inner.group(1) if inner else (text.strip().splitlines()[0] if text.strip() else type(e).__name__)
        raise CheckpointError(f"{p} is not a loadable PyTorch checkpoint ({kind}: {msg[:160]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # our own training checkpoints wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} holds a {type(state).__name__}, not a SAM state dict")
    problems = _shape_mismatches(state, build_shapes(name))
    if problems:
        arch = _guess_architecture(state)
        detail = "" if not arch.startswith("unknown") else f"; first mismatching keys: {', '.join(problems[:3])}"
        raise CheckpointError(f"{p} is a checkpoint for {arch}, not for {name}{detail}")
    return state


@dataclass
class LoadedSam:
    """Not a model wrapper, only the label that goes with one (see `load_sam`)."""

    name: str
    weights_kind: str
    source: str
    checksum: str = "unknown"  # "official": Meta's file, sha256 verified; "shipped": data/'s tiny


def check_device(text: str) -> str:
    """`text` if it names a device this machine has ("cpu", "cuda", "cuda:1", or "meta": shapes
    without data, for counting FLOPs); else a ValueError that says what is there (a notebook's
    `device` parameter, the CLI's --device)."""
    if text in ("cpu", "meta"):
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"must be a torch device such as cpu or cuda, not {text!r}") from None
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{text}: edgelab runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{text}: this machine has no CUDA device (use cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def load_sam(name: str = "tiny", checkpoint: str | os.PathLike | None = None,
             weights: str | None = None, device: str | torch.device = "cpu",
             img_size: int | None = None) -> Sam:
    """Build SAM `name` and fill its weights; the result carries `.edgelab` = LoadedSam label.

    Arguments:
      name: "tiny", "vit_b", "vit_l" or "vit_h".
      checkpoint: path to a state dict for `name` (required for real vit_* accuracy).
      weights: "trained" (tiny only, the shipped file), "checkpoint" (implied by a path) or
        "random" (timing only). Default: "trained" for tiny, "checkpoint" when a path is given.
      device: where the model goes.
      img_size: another input side than the architecture's (random weights only: the position
        embeddings of trained weights fix the size). Must be a multiple of the patch size.
    Returns:
      the `Sam` module in eval mode; `model.edgelab.weights_kind` says where its weights came from.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(CONFIGS)}")
    check_device(str(device))
    if weights is None:
        weights = "checkpoint" if checkpoint else ("trained" if name == "tiny" else None)
    if weights is None:
        raise ValueError(f"{name} needs a checkpoint path (the official file is "
                         f"{OFFICIAL[name].filename}) or weights='random' for timing-only studies")
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, not {weights!r}")
    if weights in ("random", "trained") and checkpoint:
        raise ValueError(f"give either a checkpoint or weights={weights!r}, not both")
    if weights == "checkpoint" and not checkpoint:
        raise ValueError("weights='checkpoint' needs a checkpoint path")
    if weights == "trained" and name != "tiny":
        raise ValueError(f"only tiny ships trained weights; give a {name} checkpoint path instead")

    cfg = CONFIGS[name]
    if img_size is not None and img_size != cfg.img_size:
        if weights != "random":
            raise ValueError(f"{name} with {weights} weights runs at {cfg.img_size} px; "
                             "other input sizes need weights='random'")
        if img_size <= 0 or img_size % cfg.patch_size:
            raise ValueError(f"img_size must be a positive multiple of {name}'s patch size {cfg.patch_size}")
        cfg = replace(cfg, img_size=img_size)
    if weights == "trained":
        state = read_checkpoint(TINY_WEIGHTS, "tiny")
        verify_sha256(TINY_WEIGHTS, TINY_SHA256, "rerun `edgelab train-tiny`")
        source = str(TINY_WEIGHTS)
        checksum = "shipped"
    elif weights == "checkpoint":
        state = read_checkpoint(checkpoint, name)
        source = str(checkpoint)
        checksum = checksum_status(Path(checkpoint).expanduser(), name)
    else:
        source, checksum = "random init (timing only)", "none"
    model = build_sam(cfg)
    if weights != "random":
        model.load_state_dict(state)
    model.edgelab = LoadedSam(name, weights, source, checksum)
    return model.to(device).eval()


def verify_sha256(weights: Path, sha_file: Path, restore: str) -> None:
    """Raise CheckpointError unless `weights` matches the sha256 written in `sha_file`.

    `restore` says how to get the right file back (it ends the error message).
    """
    if not sha_file.is_file():
        raise CheckpointError(f"{sha_file} is missing: cannot verify the shipped {weights.name}")
    if sha256_of(weights) != sha_file.read_text().split()[0]:
        raise CheckpointError(f"{weights} does not match {sha_file.name}: the file was changed "
                              f"or corrupted; restore it from git or {restore}")


def weights_label(model: Sam) -> str:
    """'trained', 'random' or 'checkpoint' for a model made by load_sam ('unknown' otherwise)."""
    info = getattr(model, "edgelab", None)
    return info.weights_kind if info else "unknown"


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(name: str) -> dict:
    """The configuration of `name` as a plain dict (for tables and the closing note)."""
    cfg = CONFIGS[name]
    d = asdict(cfg)
    d.update(tokens=cfg.grid ** 2, grid=cfg.grid)
    return d


# --- models for timing studies (random weights, labelled so) ----------------------------------

def randomize_rel_pos(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> int:
    """Fill the relative-position tables (notebook 01, "Attention variants") with N(0, std) values; return how many tables.

    SAM initialises these tables to zero, so in a random-weights model the bias is 0 and an error
    check would not exercise the bias path of a variant. Timing does not depend on the values.
    """
    g = torch.Generator().manual_seed(seed)
    mods = [m for m in model.modules() if isinstance(m, SamAttention)]
    with torch.no_grad():
        for m in mods:
            for p in (m.rel_pos_h, m.rel_pos_w):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return len(mods)


def timing_model(name: str, img_size: int | None = None, device: str = "cpu", seed: int = 0):
    """SAM `name` with random weights (timing only) and random rel-pos tables, so errors see the bias."""
    torch.manual_seed(seed)
    model = load_sam(name, weights="random", img_size=img_size, device=device)
    randomize_rel_pos(model, seed=seed)
    return model


class BF16Encoder(torch.nn.Module):
    """The image encoder in BF16: `mode="autocast"` (weights fp32, ops cast) or `"weights"`
    (a BF16 copy of the weights and activations: post-training BF16). fp32 output.

    Notebook 01, "BF16 on this CPU"; notebook 03 races it against the INT8 variants."""

    def __init__(self, encoder: torch.nn.Module, mode: str = "autocast") -> None:
        super().__init__()
        if mode not in ("autocast", "weights"):
            raise ValueError(f"mode must be 'autocast' or 'weights', not {mode!r}")
        self.mode = mode
        if mode == "weights":
            encoder = copy.deepcopy(encoder).to(torch.bfloat16)
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "weights":
            return self.encoder(x.to(torch.bfloat16)).float()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.encoder(x).float()
