"""edgelab.models: building SAM, labelling its weights, and vetting checkpoint files."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from edgelab import models

needs_trained = pytest.mark.skipif(not models.TINY_WEIGHTS.exists(),
                                   reason=f"shipped weights {models.TINY_WEIGHTS} not built yet")


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


# --- building --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "vit_b"])
def test_load_sam_random_builds_a_labelled_sam(name):
    model = models.load_sam(name, weights="random")
    try:
        assert isinstance(model, Sam)
        assert not model.training
        assert model.edgelab.name == name
        assert model.edgelab.weights_kind == "random"
        assert models.weights_label(model) == "random"
        cfg = models.CONFIGS[name]
        assert model.image_encoder.img_size == cfg.img_size
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == models.build_shapes(name)
        assert next(model.parameters()).device.type == "cpu"
    finally:
        del model


@pytest.mark.parametrize("name, embed_dim, depth, millions", [
    ("tiny", 128, 6, 2.3),
    ("vit_b", 768, 12, 93.7),   # SAM paper / segment_anything: 93.7M, 312.3M, 641.1M
    ("vit_l", 1024, 24, 312.3),
    ("vit_h", 1280, 32, 641.1),
])
def test_build_shapes_without_allocating(name, embed_dim, depth, millions):
    shapes = models.build_shapes(name)
    cfg = models.CONFIGS[name]
    in_chans = cfg.stem[-1] if cfg.stem else 3  # tiny's conv stem feeds the patch embedding
    assert shapes["image_encoder.patch_embed.proj.weight"] == (embed_dim, in_chans, cfg.patch_stride, cfg.patch_stride)
    assert shapes["image_encoder.pos_embed"] == (1, cfg.grid, cfg.grid, embed_dim)
    blocks = {k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")}
    assert len(blocks) == depth
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 1) == millions
    assert models.build_shapes(name) is shapes  # cached


def test_weights_label_of_a_plain_module():
    assert models.weights_label(torch.nn.Linear(2, 2)) == "unknown"


def test_describe():
    d = models.describe("tiny")
    assert d["grid"] == d["img_size"] // d["patch_size"] and d["tokens"] == d["grid"] ** 2
    assert models.describe("vit_b")["tokens"] == 64 * 64


# --- SamPredictor on the tiny model ----------------------------------------------------------

@pytest.mark.parametrize("hw", [(256, 256), (300, 200), (200, 300)])
def test_sam_predictor_works_on_tiny(tiny_random, hw, rng):
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    predictor = SamPredictor(tiny_random)
    predictor.set_image(image)
    point = np.array([[hw[1] // 2, hw[0] // 2]], np.float32)
    masks, scores, logits = predictor.predict(point_coords=point, point_labels=np.array([1]),
                                              multimask_output=True)
    assert masks.shape == (3, *hw) and masks.dtype == bool
    assert scores.shape == (3,)
    grid = models.CONFIGS["tiny"].grid
    assert logits.shape == (3, 4 * grid, 4 * grid)  # SAM upscales the embedding grid 4x
    assert np.isfinite(scores).all()


# --- checkpoint round trips ------------------------------------------------------------------

def _assert_same_weights(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_checkpoint_round_trip(tiny_checkpoint, tiny_state):
    model = models.load_sam("tiny", checkpoint=tiny_checkpoint)
    assert model.edgelab.weights_kind == "checkpoint"
    assert model.edgelab.source == str(tiny_checkpoint)
    _assert_same_weights(model, tiny_state)


def test_checkpoint_round_trip_str_path_and_explicit_kind(tiny_checkpoint, tiny_state):
    model = models.load_sam("tiny", checkpoint=str(tiny_checkpoint), weights="checkpoint")
    assert models.weights_label(model) == "checkpoint"
    _assert_same_weights(model, tiny_state)


def test_checkpoint_wrapped_in_model_key(tmp_path, tiny_state):
    path = tmp_path / "train_step_250.pt"
    torch.save({"model": tiny_state, "step": 250}, path)
    model = models.load_sam("tiny", checkpoint=path)
    assert model.edgelab.weights_kind == "checkpoint"
    _assert_same_weights(model, tiny_state)


# --- checkpoint errors -----------------------------------------------------------------------

def _error(path, name="tiny", via_load_sam=True) -> str:
    with pytest.raises(models.CheckpointError) as info:
        if via_load_sam:
            models.load_sam(name, checkpoint=path)
        else:
            models.read_checkpoint(path, name)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg, f"message is not one clean line: {msg!r}"
    return msg


def test_checkpoint_error_is_a_value_error():
    assert issubclass(models.CheckpointError, ValueError)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    msg = _error(path)
    assert "not found" in msg and str(path) in msg


def test_directory_is_not_a_checkpoint(tmp_path):
    assert "is a folder: give the checkpoint file in it" in _error(tmp_path)


def test_empty_checkpoint(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    msg = _error(path)
    assert "empty" in msg and str(path) in msg


def test_random_bytes_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = _error(path)
    assert "not a loadable PyTorch checkpoint" in msg and "corrupt" in msg


def test_truncated_checkpoint(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    msg = _error(path)
    assert "corrupt or truncated" in msg


def test_checkpoint_holding_a_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], path)
    msg = _error(path)
    assert "holds a list" in msg and "not a SAM state dict" in msg


def test_checkpoint_holding_non_tensor_values(tmp_path):
    path = tmp_path / "hparams.pt"
    torch.save({"lr": 1e-3, "steps": 10}, path)
    assert "not a SAM state dict" in _error(path)


def test_checkpoint_needing_unsafe_globals_is_refused(tmp_path):
    path = tmp_path / "pickled_object.pt"
    torch.save({"weights": NotATensor()}, path)
    with pytest.raises(models.CheckpointError, match="weights_only=True refuses"):
        models.load_sam("tiny", checkpoint=path)


def test_unsafe_globals_message_names_the_refused_class(tmp_path):
    path = tmp_path / "pickled_object.pt"
    torch.save({"weights": NotATensor()}, path)
    msg = _error(path)
    assert "NotATensor" in msg
    assert "corrupt" not in msg


def test_checkpoint_of_another_architecture(tmp_path, tiny_checkpoint):
    msg = _error(tiny_checkpoint, name="vit_b")  # builds vit_b once (about 1 s)
    assert "tiny" in msg and "vit_b" in msg


@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_checkpoint_of_another_architecture_big_names(tiny_checkpoint, name):
    msg = _error(tiny_checkpoint, name=name, via_load_sam=False)
    assert re.search(r"\btiny\b", msg) and name in msg


def test_checkpoint_with_a_missing_key_is_refused(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["mask_decoder.iou_prediction_head.layers.0.weight"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    msg = _error(path)
    assert "not for tiny" in msg


def test_missing_key_message_names_the_key(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["mask_decoder.iou_prediction_head.layers.0.weight"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    assert "mask_decoder.iou_prediction_head.layers.0.weight" in _error(path)


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["image_encoder.pos_embed"] = torch.zeros(1, 7, 7, 128)  # any grid but tiny's
    path = tmp_path / "reshaped.pt"
    torch.save(state, path)
    assert "not for tiny" in _error(path)


def test_official_filename_with_wrong_size(tmp_path, tiny_checkpoint):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(tiny_checkpoint.read_bytes())
    size = path.stat().st_size
    msg = _error(path, name="vit_b", via_load_sam=False)
    assert f"{size:,}" in msg and "375,042,383" in msg and "incomplete download" in msg


def test_official_filename_with_right_size_and_wrong_contents(tmp_path):
    official = models.OFFICIAL["vit_b"]
    path = tmp_path / official.filename
    with open(path, "wb") as f:  # a sparse file of the official size: zeros, not Meta's weights
        f.truncate(official.size_bytes)
    msg = _error(path, name="vit_b", via_load_sam=False)
    assert "sha256" in msg and official.sha256 in msg and models.sha256_of(path) in msg
    assert "\n" not in msg


def test_official_digests_are_known_for_every_real_architecture():
    for name in ("vit_b", "vit_l", "vit_h"):
        digest = models.OFFICIAL[name].sha256
        assert digest and len(digest) == 64 and int(digest, 16) >= 0


def test_a_fine_tuned_file_under_another_name_loads_with_unknown_checksum(tmp_path, tiny_state):
    path = tmp_path / "my_finetuned_tiny.pt"
    torch.save(tiny_state, path)
    model = models.load_sam("tiny", checkpoint=path)
    assert model.edgelab.checksum == "unknown" and model.edgelab.weights_kind == "checkpoint"
    assert models.checksum_status(path, "vit_b") == "unknown"
    assert models.load_sam("tiny").edgelab.checksum == "shipped"


def test_official_filename_size_check_only_for_its_own_architecture(tmp_path, tiny_checkpoint):
    # the vit_b file name means nothing to tiny: it loads on its content alone
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(tiny_checkpoint.read_bytes())
    assert models.read_checkpoint(path, "tiny").keys() == models.build_shapes("tiny").keys()


# --- argument errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(name="vit_s", weights="random"), "unknown model 'vit_s'"),
    (dict(name="vit_b"), "sam_vit_b_01ec64.pth"),
    (dict(name="vit_h"), "weights='random'"),
    (dict(name="tiny", weights="random", checkpoint="x.pt"), "not both"),
    (dict(name="vit_b", weights="trained"), "only tiny ships trained weights"),
    (dict(name="tiny", weights="pretrained"), "weights must be one of"),
    (dict(name="tiny", weights="checkpoint"), "needs a checkpoint path"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        models.load_sam(**kwargs)
    assert not isinstance(info.value, models.CheckpointError)


def test_trained_with_a_checkpoint_is_an_argument_error(shipped_stand_in, tmp_path, tiny_state):
    other = tmp_path / "mine.pt"
    torch.save({k: v + 1 for k, v in tiny_state.items()}, other)
    with pytest.raises(ValueError, match="not both"):
        models.load_sam("tiny", checkpoint=other, weights="trained")  # today: path ignored


# --- the shipped tiny weights: logic, on a stand-in file ------------------------------------

@pytest.fixture
def shipped_stand_in(tmp_path, monkeypatch, tiny_checkpoint):
    """Point TINY_WEIGHTS / TINY_SHA256 at a copy of the random tiny checkpoint and its hash."""
    weights = tmp_path / "sam_tiny.pt"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    sha = tmp_path / "sam_tiny.sha256"
    sha.write_text(f"{models.sha256_of(weights)}  sam_tiny.pt\n")
    monkeypatch.setattr(models, "TINY_WEIGHTS", weights)
    monkeypatch.setattr(models, "TINY_SHA256", sha)
    return weights, sha


def test_trained_path_loads_and_is_labelled(shipped_stand_in, tiny_state):
    weights, _ = shipped_stand_in
    model = models.load_sam("tiny")
    assert model.edgelab.weights_kind == "trained"
    assert model.edgelab.source == str(weights)
    _assert_same_weights(model, tiny_state)


def test_trained_path_rejects_a_changed_file(shipped_stand_in):
    _, sha = shipped_stand_in
    sha.write_text("0" * 64 + "  sam_tiny.pt\n")
    with pytest.raises(models.CheckpointError, match="does not match"):
        models.load_sam("tiny")


def test_trained_path_needs_the_sha256_file(shipped_stand_in):
    _, sha = shipped_stand_in
    sha.unlink()
    with pytest.raises(models.CheckpointError, match="missing"):
        models.load_sam("tiny")


def test_trained_path_without_the_weights_file(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "TINY_WEIGHTS", tmp_path / "sam_tiny.pt")
    with pytest.raises(models.CheckpointError, match="not found"):
        models.load_sam("tiny")


# --- the shipped tiny weights themselves ---------------------------------------------------

@needs_trained
def test_shipped_tiny_loads_as_trained():
    model = models.load_sam("tiny")
    assert isinstance(model, Sam)
    assert model.edgelab.weights_kind == "trained"
    assert models.weights_label(model) == "trained"
    assert model.edgelab.source == str(models.TINY_WEIGHTS)


@needs_trained
def test_shipped_sha256_file_matches():
    assert models.TINY_SHA256.is_file()
    assert models.TINY_SHA256.read_text().split()[0] == models.sha256_of(models.TINY_WEIGHTS)


@needs_trained
def test_shipped_tiny_with_a_wrong_sha256_is_rejected(tmp_path, monkeypatch):
    sha = tmp_path / "sam_tiny.sha256"
    real = models.TINY_SHA256.read_text().split()[0]
    wrong = ("0" if real[0] != "0" else "1") + real[1:]
    sha.write_text(f"{wrong}  sam_tiny.pt\n")
    monkeypatch.setattr(models, "TINY_SHA256", sha)
    with pytest.raises(models.CheckpointError, match="does not match"):
        models.load_sam("tiny")


def test_a_device_this_machine_lacks_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this machine has no CUDA device"):
        models.load_sam("tiny", device="cuda")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        models.check_device("xpu")
    assert models.check_device("cpu") == "cpu"
    assert models.load_sam("vit_b", weights="random", device="meta").device.type == "meta"  # FLOPs, no data
