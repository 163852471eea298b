"""edgelab.evaluate: IoU, prompts from masks, image folders, and scoring a model."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from segment_anything import SamPredictor

from edgelab import evaluate, scenes


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _assert_inside(mask, point):
    x, y = point
    assert float(x).is_integer() and float(y).is_integer()
    assert 0 <= x < mask.shape[1] and 0 <= y < mask.shape[0]
    assert mask[int(y), int(x)], f"prompt {point} is not in the mask"


# --- iou -------------------------------------------------------------------------------------

def test_iou_identical_and_disjoint():
    a = np.zeros((8, 8), bool)
    a[2:5, 2:5] = True
    b = np.zeros((8, 8), bool)
    b[6:, 6:] = True
    assert evaluate.iou(a, a) == 1.0
    assert evaluate.iou(a, b) == 0.0


def test_iou_exact_fraction():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, 0:2] = True   # two pixels
    b[0, 1:3] = True   # two pixels, one shared
    assert evaluate.iou(a, b) == pytest.approx(1 / 3, abs=0)
    c = np.zeros((10, 10), bool)
    d = np.zeros((10, 10), bool)
    c[:, :6] = True    # 60 px
    d[:, 3:] = True    # 70 px, 30 shared, union 100
    assert evaluate.iou(c, d) == 0.3


def test_iou_both_empty_is_one():
    z = np.zeros((5, 7), bool)
    assert evaluate.iou(z, z) == 1.0


def test_iou_one_empty_is_zero():
    a = np.zeros((5, 5), bool)
    a[1, 1] = True
    assert evaluate.iou(a, np.zeros((5, 5), bool)) == 0.0


def test_iou_accepts_tensors_and_non_bool():
    a = np.zeros((4, 4), np.uint8)
    a[:2] = 1
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:1] = True
    assert evaluate.iou(a, b) == 0.5
    assert evaluate.iou(torch.as_tensor(a), torch.as_tensor(a)) == 1.0
    assert isinstance(evaluate.iou(a, b), float)


def test_iou_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        evaluate.iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# --- point and box prompts ------------------------------------------------------------------

def test_point_prompt_disk_is_its_centre():
    mask = _disk(40, 50, cy=17, cx=31, r=9)
    assert evaluate.point_prompt(mask) == (31.0, 17.0)  # (x, y)


def test_point_prompt_ring_uses_farthest_from_boundary():
    ring = _disk(41, 41, 20, 20, 14) & ~_disk(41, 41, 20, 20, 8)
    cy, cx = ndimage.center_of_mass(ring)
    assert not ring[round(cy), round(cx)]  # centre of mass is in the hole
    x, y = evaluate.point_prompt(ring)
    _assert_inside(ring, (x, y))
    dist = ndimage.distance_transform_edt(np.pad(ring, 1))[1:-1, 1:-1]
    assert dist[int(y), int(x)] == dist.max()


def test_point_prompt_l_shape():
    mask = np.zeros((30, 30), bool)
    mask[:, :4] = True
    mask[-4:, :] = True
    _assert_inside(mask, evaluate.point_prompt(mask))


def test_point_prompt_c_shape_centre_outside():
    mask = np.zeros((30, 30), bool)
    mask[:3, :] = True
    mask[-3:, :] = True
    mask[:, :3] = True
    cy, cx = ndimage.center_of_mass(mask)
    assert not mask[round(cy), round(cx)]
    _assert_inside(mask, evaluate.point_prompt(mask))


@pytest.mark.parametrize("line", [np.eye(40, dtype=bool), np.fliplr(np.eye(40, dtype=bool)),
                                  np.eye(31, dtype=bool), np.fliplr(np.eye(31, dtype=bool))],
                         ids=["diag40", "antidiag40", "diag31", "antidiag31"])
def test_point_prompt_thin_diagonal_line(line):
    _assert_inside(line, evaluate.point_prompt(line))


def test_point_prompt_one_pixel():
    mask = np.zeros((9, 12), bool)
    mask[3, 7] = True
    assert evaluate.point_prompt(mask) == (7.0, 3.0)


def test_point_prompt_pixel_at_the_image_border():
    mask = np.zeros((9, 12), bool)
    mask[8, 11] = True
    assert evaluate.point_prompt(mask) == (11.0, 8.0)


def test_point_prompt_two_blobs():
    mask = _disk(30, 60, 15, 10, 5) | _disk(30, 60, 15, 50, 5)  # centre of mass between them
    _assert_inside(mask, evaluate.point_prompt(mask))


def test_point_prompt_inside_every_scene_mask():
    for seed in scenes.split_seeds("train", 30):
        for m in scenes.make_scene(seed).masks:
            _assert_inside(m, evaluate.point_prompt(m))


def test_box_prompt_rectangle():
    mask = np.zeros((20, 30), bool)
    mask[5:11, 2:21] = True
    assert evaluate.box_prompt(mask) == (2.0, 5.0, 20.0, 10.0)


def test_box_prompt_one_pixel():
    mask = np.zeros((5, 5), bool)
    mask[4, 1] = True
    assert evaluate.box_prompt(mask) == (1.0, 4.0, 1.0, 4.0)


@pytest.mark.parametrize("fn", [evaluate.point_prompt, evaluate.box_prompt])
def test_prompts_of_an_empty_mask_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((6, 6), bool))


def test_grid_points():
    pts = evaluate.grid_points((100, 200), per_side=2)
    assert pts.dtype == np.float32
    assert pts.tolist() == [[50, 25], [150, 25], [50, 75], [150, 75]]


# --- image folders --------------------------------------------------------------------------

def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header_only(width, height) -> bytes:
    """A PNG whose IHDR claims `width` x `height` pixels (valid CRCs, almost no data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def test_image_folder_reads_every_format(make_image_folder, rng):
    rgba = np.zeros((13, 17, 4), np.uint8)
    rgba[..., :3] = 40
    rgba[:, :8, 3] = 255  # left half opaque, right half transparent
    sixteen = np.zeros((11, 23), np.uint16)
    sixteen[0, 0] = 65535
    sixteen[1, 1] = 32768
    palette = Image.fromarray(_rgb(rng, 21, 19)).quantize(colors=16)
    gray = rng.integers(0, 256, (31, 7), dtype=np.uint8)
    folder = make_image_folder({
        "a.jpg": _rgb(rng, 37, 53),
        "b.JPEG": _rgb(rng, 9, 5),
        "c.png": _rgb(rng, 41, 29),
        "d_gray.png": gray,
        "e_rgba.png": rgba,
        "f_palette.png": palette,
        "g_16bit.png": Image.fromarray(sixteen),
    })
    assert Image.open(folder / "g_16bit.png").mode == "I;16"
    assert Image.open(folder / "f_palette.png").mode == "P"
    got = evaluate.image_folder(folder)
    assert [p.name for p, _ in got] == ["a.jpg", "b.JPEG", "c.png", "d_gray.png", "e_rgba.png",
                                        "f_palette.png", "g_16bit.png"]
    shapes = {p.name: a.shape for p, a in got}
    assert shapes == {"a.jpg": (37, 53, 3), "b.JPEG": (9, 5, 3), "c.png": (41, 29, 3),
                      "d_gray.png": (31, 7, 3), "e_rgba.png": (13, 17, 3),
                      "f_palette.png": (21, 19, 3), "g_16bit.png": (11, 23, 3)}
    arrays = {p.name: a for p, a in got}
    for a in arrays.values():
        assert a.dtype == np.uint8 and a.ndim == 3
    # lossless formats keep their values
    assert np.array_equal(arrays["d_gray.png"], np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(arrays["f_palette.png"], np.asarray(palette.convert("RGB")))
    assert (arrays["e_rgba.png"][:, :8] == 40).all()     # opaque: its own colour
    assert (arrays["e_rgba.png"][:, 8:] == 255).all()    # transparent: white background
    assert arrays["g_16bit.png"][0, 0].tolist() == [255] * 3
    assert arrays["g_16bit.png"][1, 1].tolist() == [128] * 3
    assert arrays["g_16bit.png"][5, 5].tolist() == [0] * 3


def test_image_folder_skips_non_images_and_corrupt_files(make_image_folder, rng):
    good = make_image_folder({"ok.png": _rgb(rng, 10, 12)}, name="src")
    png = (good / "ok.png").read_bytes()
    folder = make_image_folder({
        "a.png": _rgb(rng, 10, 12),
        "b_garbage.png": b"this is not a png",
        "c_truncated.png": png[: len(png) // 2],
        "d_empty.jpg": b"",
        "notes.txt": "some notes",
        "z.jpg": _rgb(rng, 8, 8),
    })
    with pytest.warns(UserWarning) as record:
        got = evaluate.image_folder(folder)
    assert [p.name for p, _ in got] == ["a.png", "z.jpg"]
    messages = " | ".join(str(w.message) for w in record)
    for name in ["b_garbage.png", "c_truncated.png", "d_empty.jpg", "notes.txt"]:
        assert name in messages
    assert "not a JPEG or PNG" in messages


def test_image_folder_ignores_hidden_files_and_subfolders(make_image_folder, rng):
    folder = make_image_folder({"a.png": _rgb(rng, 6, 6), ".DS_Store": b"\0\1\2"})
    (folder / "sub").mkdir()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = evaluate.image_folder(folder)
    assert [p.name for p, _ in got] == ["a.png"]


def test_image_folder_skips_a_png_claiming_a_huge_size(make_image_folder, rng):
    folder = make_image_folder({"a.png": _rgb(rng, 6, 6), "bomb.png": _png_header_only(30000, 30000)})
    with pytest.warns(UserWarning, match="bomb.png"):
        got = evaluate.image_folder(folder)
    assert [p.name for p, _ in got] == ["a.png"]


def test_image_folder_empty_folder(make_image_folder):
    folder = make_image_folder({})
    with pytest.raises(ValueError, match="no JPEG or PNG") as info:
        evaluate.image_folder(folder)
    assert str(folder) in str(info.value)


def test_image_folder_with_only_unusable_files(make_image_folder):
    folder = make_image_folder({"readme.txt": "hi", "x.png": b"junk"})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=str(folder.name)):
        evaluate.image_folder(folder)


def test_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate.image_folder(tmp_path / "nowhere")


def test_image_folder_given_a_file(make_image_folder, rng):
    folder = make_image_folder({"a.png": _rgb(rng, 6, 6)})
    with pytest.raises(FileNotFoundError):
        evaluate.image_folder(folder / "a.png")


def test_load_image_single_file(make_image_folder, rng):
    img = _rgb(rng, 7, 9)
    folder = make_image_folder({"a.png": img})
    assert np.array_equal(evaluate.load_image(folder / "a.png"), img)
    assert np.array_equal(evaluate.load_image(str(folder / "a.png")), img)


# --- scoring a model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_scene():
    return scenes.make_scene(scenes.EVAL_SEED_BASE)


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_predict_masks_from_ground_truth(tiny_random, one_scene, prompt):
    out = evaluate.predict_masks(SamPredictor(tiny_random), one_scene.image, one_scene.masks, prompt)
    assert out.shape == one_scene.masks.shape and out.dtype == bool


def test_predict_masks_explicit_points_on_a_non_square_image(tiny_random, rng):
    image = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    pts = evaluate.grid_points(image.shape[:2], per_side=2)
    out = evaluate.predict_masks(SamPredictor(tiny_random), image, points=pts)
    assert out.shape == (4, 120, 200) and out.dtype == bool
    boxes = np.array([[10, 10, 50, 60], [0, 0, 199, 119]], np.float32)
    out = evaluate.predict_masks(SamPredictor(tiny_random), image, boxes=boxes)
    assert out.shape == (2, 120, 200)


def test_predict_masks_bad_prompt(tiny_random, one_scene):
    with pytest.raises(ValueError, match="prompt"):
        evaluate.predict_masks(SamPredictor(tiny_random), one_scene.image, one_scene.masks, "scribble")


def test_evaluate_scenes_on_two_scenes(tiny_random):
    result = evaluate.evaluate_scenes(tiny_random, n=2, progress=False)
    assert isinstance(result, evaluate.EvalResult)
    expected = sum(len(scenes.make_scene(s).masks) for s in scenes.split_seeds("eval", 2))
    assert result.n_masks == expected == len(result.per_object)
    assert result.n_images == 2 and result.prompt == "point"
    assert 0.0 <= result.miou <= 1.0
    assert all(0.0 <= v <= 1.0 for v in result.per_object)
    assert result.miou == pytest.approx(float(np.mean(result.per_object)))
    d = result.as_dict()
    assert {k: d[k] for k in ("miou", "n_masks", "n_images", "prompt")} == {
        "miou": result.miou, "n_masks": expected, "n_images": 2, "prompt": "point"}
    lo, hi = d["miou_ci"]
    assert lo <= result.miou <= hi
    assert sum(g["n"] for g in d["by_size"].values()) == expected
    assert sum(g["n"] for g in d["by_kind"].values()) == expected
    assert set(d["by_kind"]) <= set(scenes.SHAPES) and set(d["by_size"]) <= {"small", "medium", "large"}


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_more_objects():
    rng = np.random.default_rng(1)
    few, many = rng.uniform(size=30), rng.uniform(size=3000)
    lo, hi = evaluate.bootstrap_ci(few)
    assert lo < few.mean() < hi
    lo2, hi2 = evaluate.bootstrap_ci(many)
    assert (hi2 - lo2) < 0.3 * (hi - lo)
    assert evaluate.bootstrap_ci([0.5] * 10) == (0.5, 0.5)


@pytest.mark.parametrize("area,name", [(40, "small"), (299, "small"), (300, "medium"),
                                       (3999, "medium"), (4000, "large"), (65536, "large")])
def test_size_bins(area, name):
    assert evaluate.size_bin(area) == name


def test_groups_split_objects_by_label():
    r = evaluate.EvalResult(0.5, 4, 1, "point", [0.0, 1.0, 0.2, 0.8], [10, 5000, 20, 400],
                            ["star", "star", "thin", "ellipse"])
    d = r.as_dict()
    assert d["by_size"]["small"]["miou"] == pytest.approx(0.1) and d["by_size"]["small"]["n"] == 2
    assert d["by_kind"]["star"]["miou"] == pytest.approx(0.5) and list(d["by_kind"]) == ["ellipse", "star", "thin"]


def test_evaluate_scenes_on_the_val_split(tiny_random):
    result = evaluate.evaluate_scenes(tiny_random, n=1, progress=False, split="val")
    assert result.n_masks == len(scenes.make_scene(scenes.VAL_SEED_BASE).masks)


def test_evaluate_scenes_with_seeds_and_boxes(tiny_random):
    result = evaluate.evaluate_scenes(tiny_random, seeds=[3], prompt="box", progress=False)
    assert result.n_images == 1 and result.prompt == "box"
    assert result.n_masks == len(scenes.make_scene(3).masks)
    assert 0.0 <= result.miou <= 1.0


def test_agreement_with_itself_is_one(tiny_random, rng):
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), scenes.make_scene(1).image]
    result = evaluate.agreement(tiny_random, tiny_random, images, per_side=2, progress=False)
    assert result.miou == 1.0
    assert result.n_masks == 2 * 2 * 2 and result.n_images == 2
    assert result.prompt == "point-grid"


def test_agreement_accepts_a_generator(tiny_random):
    gen = (scenes.make_scene(s).image for s in (0, 1))
    result = evaluate.agreement(tiny_random, tiny_random, gen, per_side=1, progress=False)
    assert result.n_images == 2 and result.miou == 1.0


def test_agreement_of_two_different_models_is_below_one(tiny_random):
    from edgelab import models
    torch.manual_seed(1)
    other = models.load_sam("tiny", weights="random")
    images = [scenes.make_scene(1).image]
    result = evaluate.agreement(other, tiny_random, images, per_side=2, progress=False)
    assert 0.0 <= result.miou < 1.0


def test_paired_difference_flags_noise_and_a_real_gap():
    from edgelab.evaluate import EvalResult, describe_difference, paired_difference
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 200)
    same = EvalResult(float(base.mean()), 200, 20, "point", list(base))
    jitter = EvalResult(0.0, 200, 20, "point", list(base + rng.normal(0, 0.01, 200)))
    better = EvalResult(0.0, 200, 20, "point", list(base + 0.05))
    assert paired_difference(jitter, same)["within_noise"]
    p = paired_difference(better, same)
    assert not p["within_noise"] and abs(p["diff"] - 0.05) < 1e-9 and p["ci"][0] > 0
    assert evaluate.paired_ious(better.per_object, same.per_object) == p  # the same on plain per-object lists
    assert "b is better than a beyond the noise" in describe_difference("b", better, "a", same)
    with pytest.raises(ValueError):
        paired_difference(EvalResult(0.0, 3, 1, "point", [0.1, 0.2, 0.3]), same)


def test_mask_choice_brackets_the_protocol(tiny_trained):
    """The head's pick scores what the protocol scores, never more than the truly best of three."""
    res, picked = evaluate.mask_choice(tiny_trained, 3, progress=False)
    proto = evaluate.evaluate_scenes(tiny_trained, 3, "point", progress=False)
    assert res["head's pick"].miou == pytest.approx(proto.miou)
    assert all(b >= p for b, p in zip(res["best of three"].per_object, res["head's pick"].per_object))
    assert 0.0 <= picked <= 1.0 and res["single mask"].n_masks == proto.n_masks


def test_image_folder_given_a_file(make_image_folder, rng):
    folder = make_image_folder({"a.png": _rgb(rng, 6, 6)})
    with pytest.raises(ValueError, match="is a file: give the folder that holds the images"):
        evaluate.image_folder(folder / "a.png")
