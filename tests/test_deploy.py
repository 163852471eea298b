"""Chapter 05: the stack's pieces, ONNX export, the torch-free edge predictor, budget choice."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

from conftest import ROOT, run_cli
from edgelab import deploy, evaluate, models, quantization, scenes
from edgelab.edge import EdgePredictor, resize_bilinear


@pytest.fixture(scope="module")
def tiny():
    return models.load_sam("tiny")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    enc, dec = deploy.export_onnx(tiny, out, "tiny")
    return out, enc, dec


def _scene_points(s) -> np.ndarray:
    return np.array([evaluate.point_prompt(m) for m in s.masks], np.float32)


def test_frame_gives_the_protocols_masks(tiny):
    s = scenes.SceneDataset("eval", 1).scene(0)
    pts = _scene_points(s)
    frame = deploy.Frame(tiny, pts)
    with torch.inference_mode():
        masks, iou = frame(deploy.torch_input(tiny, s.image))
    want = evaluate.predict_masks(SamPredictor(tiny), s.image, points=pts)
    assert masks.shape == (len(pts), 1, 256, 256) and iou.shape == (len(pts), 3)
    assert np.array_equal(masks[:, 0].numpy(), want)


def test_onnx_runtime_masks_agree_with_pytorch(tiny, exported):
    _, enc, dec = exported
    pred, ref = EdgePredictor(str(enc), str(dec), threads=2), SamPredictor(tiny)
    ds = scenes.SceneDataset("eval", 3)
    ious = []
    for i in range(len(ds)):
        s = ds.scene(i)
        pts = _scene_points(s)
        pred.set_image(s.image)
        ious += [evaluate.iou(a, b) for a, b in zip(pred.segment(pts), evaluate.predict_masks(ref, s.image, points=pts))]
    assert np.mean(ious) >= 0.99
    masks, scores = pred.predict(pts[:2, None, :], np.ones((2, 1)))  # the general API: three masks each
    assert masks.shape == (2, 3, 256, 256) and scores.shape == (2, 3)


def test_edge_predictor_runs_without_torch(exported):
    _, enc, dec = exported
    program = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from edgelab.edge import EdgePredictor
pred = EdgePredictor({str(enc)!r}, {str(dec)!r}, threads=1)
image = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
pred.set_image(image)
masks = pred.segment(np.array([[50.0, 60.0], [150.0, 30.0]]))
assert masks.shape == (2, 120, 200) and masks.dtype == bool, masks.shape
assert "torch" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_resize_bilinear_matches_torch():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(13, 21, 3)).astype(np.float32)
    for h, w in ((13, 21), (40, 9), (7, 64)):
        want = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], (h, w), mode="bilinear",
                             align_corners=False)[0].permute(1, 2, 0).numpy()
        assert np.allclose(resize_bilinear(a, h, w), want, atol=1e-5)


def test_onnx_int8_keeps_metadata_and_close_masks(tiny, exported):
    out, enc, dec = exported
    qenc = deploy.quantize_onnx(enc, out / "q_encoder.onnx")
    qdec = deploy.quantize_onnx(dec, out / "q_decoder.onnx")
    assert qenc.stat().st_size < 0.5 * enc.stat().st_size
    pred = EdgePredictor(str(qenc), str(qdec))
    s = scenes.SceneDataset("eval", 1).scene(0)
    pred.set_image(s.image)
    got = pred.segment(_scene_points(s))
    want = evaluate.predict_masks(SamPredictor(tiny), s.image, points=_scene_points(s))
    assert np.mean([evaluate.iou(a, b) for a, b in zip(got, want)]) > 0.8


def test_openvino_fp32_and_nncf_int8(tiny, exported):
    out, enc, dec = exported
    ov_enc, ov_dec = deploy.to_openvino(enc, out / "ov_encoder.xml"), deploy.to_openvino(dec, out / "ov_decoder.xml")
    ov_q = deploy.to_openvino(enc, out / "ov_encoder_int8.xml", deploy.calibration_inputs(tiny, 4))
    s = scenes.SceneDataset("eval", 1).scene(0)
    pts, ref = _scene_points(s), SamPredictor(tiny)
    want = evaluate.predict_masks(ref, s.image, points=pts)
    for e, bar in ((ov_enc, 0.99), (ov_q, 0.8)):
        pred = EdgePredictor(str(e), str(ov_dec), threads=2)
        assert pred.runtime == "openvino"
        pred.set_image(s.image)
        assert np.mean([evaluate.iou(a, b) for a, b in zip(pred.segment(pts), want)]) >= bar, e.name
    assert ov_q.with_suffix(".bin").stat().st_size < 0.5 * ov_enc.with_suffix(".bin").stat().st_size
    with pytest.raises(ValueError, match="unknown runtime"):
        EdgePredictor(str(enc), str(dec), runtime="tensorrt")


def test_export_errors_are_clear(tiny, tmp_path):
    int8, _ = quantization.make_variant(tiny, "w8a8")
    with pytest.raises(deploy.ExportError, match="INT8 layers"):
        deploy.export_onnx(int8, tmp_path)
    with pytest.raises(deploy.ExportError, match="inside the repository's notebooks/"):
        deploy.export_onnx(tiny, ROOT / "notebooks" / "exports")
    assert not (ROOT / "notebooks" / "exports").exists()
    bare = tmp_path / "bare.onnx"  # an ONNX file edgelab did not write: no preprocessing metadata
    torch.onnx.export(torch.nn.Identity(), (torch.zeros(1, 3, 4, 4),), str(bare), input_names=["image"], dynamo=False)
    with pytest.raises(ValueError, match="pixel_mean"):
        EdgePredictor(str(bare), str(bare))


def test_choose_and_budget_table():
    rows = [{"name": "reference", "median_s": 0.020, "miou": 0.62}, {"name": "pruned", "median_s": 0.012, "miou": 0.57},
            {"name": "student", "median_s": 0.004, "miou": 0.60}]
    assert deploy.choose(rows, 0.05)["name"] == "reference"
    assert deploy.choose(rows, 0.015)["name"] == "student"  # faster and better than pruned
    assert deploy.choose(rows, 0.001) is None
    assert deploy.choose(rows, 0.015, latency={"student": 0.03})["name"] == "pruned"  # a busier machine
    table = deploy.budget_table(rows, [0.001, 0.005, 0.05])
    assert [t["choice"] for t in table] == [None, "student", "reference"]
    assert table[1]["paid"] == pytest.approx(0.02)
    assert deploy.best_deployable(rows)["name"] == "student"


def test_drift_times_every_variant_at_every_load():
    # no time is asserted (the guide): whether busy workers slow a frame is what the notebook measures
    work = torch.randn(256, 256)
    calls = []
    v = deploy.Variant("mm", "pytorch", lambda: calls.append(1) or [work @ work for _ in range(20)],
                       lambda: None, lambda i, p: p, 0.0)
    lat = deploy.drift({"mm": v}, loads=(0, 2), repeats=3)
    assert set(lat) == {0, 2} and all(set(row) == {"mm"} for row in lat.values())
    assert all(0 < t < float("inf") for row in lat.values() for t in row.values())
    assert len(calls) >= 2 * 3  # every load ran its repeats


def test_stack_config_is_checked():
    with pytest.raises(ValueError, match="prune_ratio"):
        deploy.StackConfig(prune_ratio=1.2).check()
    with pytest.raises(ValueError, match="INT8"):
        deploy.StackConfig(quant="bf16").check()


def test_bench_deploy_cli(tmp_path):
    code, out, err = run_cli("bench", "deploy", "--out", str(tmp_path), "--scenes", "2", "--repeats", "2",
                             "--finetune-steps", "0", "--no-memory", "--json")
    assert code == 0, err
    rec = json.loads(out)
    names = [v["name"] for v in rec["variants"]]
    assert names == list(deploy.PYTORCH_STEPS + deploy.EDGE_VARIANTS)
    for v in rec["variants"]:
        assert {"median_s", "size_mb", "miou", "agreement", "roofline_s", "of_limit"} <= set(v)
        assert v["roofline_s"] > 0 and v["of_limit"] == pytest.approx(v["roofline_s"] / v["median_s"])
    assert rec["variants"][0]["agreement"] == 1.0
    by = {v["name"]: v for v in rec["variants"]}
    assert by["ort fp32"]["agreement"] >= 0.99 and by["openvino fp32"]["agreement"] >= 0.99
    assert by["openvino int8"]["label"] == "openvino" and by["openvino int8"]["size_mb"] < by["openvino fp32"]["size_mb"]
    assert rec["deploy"]["best"]["name"] in names
    assert (tmp_path / "student_encoder_int8.onnx").is_file()
    code, _, err = run_cli("bench", "deploy", "--out", str(tmp_path), "--prune-ratio", "1.5", "--json")
    assert code == 2 and err.strip().startswith("edgelab: error: prune_ratio")


def test_roofline_base_names_the_fp32_model_and_its_int8_layers():
    assert deploy.roofline_base("fused") == ("reference", ())
    assert deploy.roofline_base("pruned+int8") == ("pruned", ("Linear/MLP",))
    assert deploy.roofline_base("student ort int8") == ("student", ("Linear/MLP", "conv/patch embed"))
    assert deploy.roofline_base("openvino int8")[0] == "reference"


def test_runtime_reading_follows_the_numbers():
    row = lambda n, enc, miou=0.7: {"name": n, "encoder_s": enc, "miou": miou, "of_limit": 0.1}
    rows = [row("reference", 0.010), row("ort fp32", 0.008), row("ort int8", 0.012, 0.69),
            row("openvino fp32", 0.006), row("openvino int8", 0.004)]
    text = deploy.runtime_reading(rows, {"cpu": "X", "avx512_vnni": False})
    assert text.startswith("FP32: OpenVINO runs") and "6.00 ms" in text
    assert "ONNX Runtime INT8 is slower" in text and "OpenVINO INT8 is faster" in text and "without" in text


def test_initial_final_with_openvino_times_the_same_encoder():
    """The poster's table with OpenVINO beside it: random weights, labelled, FP32 equal to PyTorch's."""
    rows = deploy.initial_final(["tiny"], 128, repeats=1, progress=False, openvino=["tiny"])
    (r,) = rows
    assert r["weights"] == "random" and r["img_size"] == 128
    assert r["openvino_fp32_s"] > 0 and r["openvino_int8_s"] > 0
    assert r["openvino_fp32_rel_err"] < 1e-4  # the same function, another runtime
    assert r["openvino_int8_rel_err"] < 1  # quantized random weights: nearer than an all-zero output


def test_initial_final_runs_openvino_only_for_the_models_named():
    """A list names the models that also go to OpenVINO (all three SAM sizes at 1024 px passed 23 GB)."""
    rows = deploy.initial_final(["tiny"], 64, repeats=1, progress=False, openvino=["vit_h"])
    assert "openvino_fp32_s" not in rows[0] and rows[0]["final_s"] > 0
