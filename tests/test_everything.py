"""edgelab.everything: segment everything, timed in parts and scored against exact masks."""
import json

import numpy as np
import pytest

from edgelab import everything as E
from conftest import run_cli


def test_best_ious_takes_each_objects_best_mask():
    truth = np.zeros((2, 8, 8), bool)
    truth[0, :4], truth[1, 4:] = True, True
    pred = np.zeros((2, 8, 8), bool)
    pred[0, :4], pred[1, 4:, :4] = True, True  # the first exactly, half of the second
    assert E.best_ious(pred, truth).tolist() == [1.0, 0.5]
    assert E.best_ious(pred[:0], truth).tolist() == [0.0, 0.0]


def test_mask_ap_by_pycocotools():
    truth = np.zeros((2, 32, 32), bool)
    truth[0, :16], truth[1, 16:, :16] = True, True
    perfect = E.mask_ap([(truth, np.array([0.9, 0.8]), truth)])
    assert perfect == {"mask_ap": pytest.approx(1.0), "mask_ap50": pytest.approx(1.0), "mask_ap75": pytest.approx(1.0)}
    # the second object only half covered (IoU 0.5): found at 0.5, missed at 0.75 and above
    half = truth.copy()
    half[1, 16:, 8:16] = False
    r = E.mask_ap([(half, np.array([0.9, 0.8]), truth)])
    assert r["mask_ap50"] == pytest.approx(1.0) and r["mask_ap75"] == pytest.approx(0.5, abs=0.01)
    assert 0.5 < r["mask_ap"] < 1.0
    # a spurious mask ranked first costs precision; recall would not see it
    junk = np.zeros((1, 32, 32), bool)
    junk[0, 30:, 30:] = True
    r = E.mask_ap([(np.concatenate([junk, truth]), np.array([0.99, 0.9, 0.8]), truth)])
    assert r["mask_ap50"] < 1.0
    assert E.mask_ap([(truth[:0], np.zeros(0), truth)]) == {"mask_ap": 0.0, "mask_ap50": 0.0, "mask_ap75": 0.0}


def test_score_splits_the_time_and_counts_recall(tiny_random):
    cfg = E.EverythingConfig(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    r = E.score(tiny_random, [3], cfg)
    assert r["decoder_batches"] == 2 and r["images"] == 1 and r["objects"] > 0
    assert r["median_s"] == pytest.approx(r["encoder_s"] + r["decoder_s"] + r["post_s"])
    assert 0 <= r["recall_75"] <= r["recall_50"] <= 1 and 0 <= r["mask_ap"] <= r["mask_ap50"] <= 1


def test_config_is_checked():
    with pytest.raises(ValueError, match="points_per_side"):
        E.EverythingConfig(points_per_side=0).check()
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        E.EverythingConfig(pred_iou_thresh=1.5).check()


def test_bench_everything_json():
    code, out, err = run_cli("bench", "everything", "--scenes", "1", "--points-per-side", "4", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["reference"] == "pytorch fp32" and rec["weights"] == "trained"
    for v in rec["variants"]:
        assert {"median_s", "recall_50", "recall_75", "mask_ap", "encoder_s", "decoder_s", "post_s"} <= set(v)
    assert [v["name"] for v in rec["variants"]] == ["pytorch fp32", "sdpa attention", "w8a8", "student", "fast decoder",
                                                    "fast decoder, one batch", "fast decoder, coarse to fine",
                                                    "student, fast, coarse to fine", "onnxruntime, fast, coarse to fine",
                                                    "openvino, fast, coarse to fine"]
    assert rec["everything"]["per_variant"]["fast decoder, coarse to fine"]["config"]["skip_covered"]


def test_bench_everything_bad_input_is_one_line():
    code, out, err = run_cli("bench", "everything", "--scenes", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--scenes" in err


def test_fast_path_keeps_the_generators_masks(tiny_trained):
    """Filtering before upscaling and the shared decoder change the work, not the masks."""
    from dataclasses import replace
    from edgelab import scenes
    cfg = E.EverythingConfig(points_per_side=8, points_per_batch=16)
    image = scenes.make_scene(20_000_000).image
    slow, _, t_slow = E.generate(tiny_trained, image, cfg)
    fast, _, t_fast = E.generate(tiny_trained, image, replace(cfg, fast=True))
    assert t_fast["decoder_batches"] == t_slow["decoder_batches"] == 4
    assert len(fast) == len(slow) and E.best_ious(fast, slow).min() > 0.99
    c2f, _, t = E.generate(tiny_trained, image, replace(cfg, fast=True, skip_covered=True))
    assert 3 <= t["decoder_batches"] <= 5 and len(c2f) <= len(slow)  # three rounds, the last in up to 3 batches


def test_decode_shared_matches_decode_batched(tiny_trained):
    import torch
    from edgelab import attention
    emb = tiny_trained.image_encoder(torch.randn(1, 3, 256, 256))
    pts = torch.rand(5, 2) * 256
    with torch.inference_mode():
        a, b = attention.decode_batched(tiny_trained, emb, pts), attention.decode_shared(tiny_trained, emb, pts)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_model_gives_pytorchs_masks(tiny_trained, tmp_path, runtime):
    """The grid decoder on an edge runtime decodes what attention.decode_shared decodes, and the
    coarse-to-fine path on it keeps the same masks."""
    import torch
    from dataclasses import replace
    from edgelab import attention, scenes
    model, decode = E.runtime_model(tiny_trained, tmp_path, runtime)
    emb = tiny_trained.image_encoder(torch.randn(1, 3, 256, 256))
    pts = torch.rand(7, 2) * 256
    with torch.inference_mode():
        ref, got = attention.decode_shared(tiny_trained, emb, pts), decode(model, emb, pts)
    assert got[0].shape == ref[0].shape == (7, 3, 64, 64) and got[1].shape == (7, 3)
    assert torch.allclose(got[0], ref[0], atol=1e-3) and torch.allclose(got[1], ref[1], atol=1e-4)
    cfg = E.EverythingConfig(points_per_side=8, points_per_batch=16, fast=True, skip_covered=True)
    image = scenes.make_scene(20_000_001).image
    ours, _, _ = E.generate(tiny_trained, image, cfg)
    theirs, _, t = E.generate(model, image, cfg, decode)
    assert len(theirs) == len(ours) and (len(ours) == 0 or E.best_ious(theirs, ours).min() > 0.98)
    assert t["encoder_s"] > 0 and t["decoder_batches"] >= 1


def test_runtime_decoder_needs_the_fast_path(tiny_trained, tmp_path):
    from edgelab import scenes
    model, decode = E.runtime_model(tiny_trained, tmp_path, "onnxruntime")
    with pytest.raises(ValueError, match="fast path"):
        E.generate(model, scenes.make_scene(1).image, E.EverythingConfig(points_per_side=4), decode)


def test_runtime_reading_compares_each_runtimes_decoder_with_pytorchs():
    row = lambda name, dec, ap=0.46: {"name": name, "median_s": dec + 0.03, "decoder_s": dec, "recall_50": 0.84,
                                      "recall_75": 0.72, "mask_ap": ap}
    rows = [row("fast, coarse to fine", 0.18), row("onnxruntime, fast, coarse to fine", 0.21),
            row("openvino, fast, coarse to fine", 0.155, 0.47)]
    text = E.runtime_reading(rows)
    assert "On onnxruntime the decoder batches cost 0.210 s" in text and "(1.17x): dearer than PyTorch's" in text
    assert "the same recall and mask AP" in text
    assert "(0.86x): cheaper than PyTorch's" in text and "mask AP 0.470 vs 0.460" in text
    rows[1]["decoder_s"] = 0.182
    assert "about the same as PyTorch's" in E.runtime_reading(rows)
    assert E.runtime_reading(rows[1:]) == ""  # no PyTorch row to compare with
