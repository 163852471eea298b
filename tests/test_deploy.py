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


def _val_row(name, median_s, miou, ious=None):
    return {"name": name, "median_s": median_s, "val_miou": miou, "miou": miou - 0.01,
            **({"val_ious": ious} if ious is not None else {})}


def test_choose_and_budget_table():
    rows = [_val_row("reference", 0.020, 0.62), _val_row("pruned", 0.012, 0.57), _val_row("student", 0.004, 0.60)]
    assert deploy.choose(rows, 0.05)["name"] == "reference"
    assert deploy.choose(rows, 0.015)["name"] == "student"  # faster and better than pruned
    assert deploy.choose(rows, 0.001) is None
    assert deploy.choose(rows, 0.015, latency={"student": 0.03})["name"] == "pruned"  # a busier machine
    table = deploy.budget_table(rows, [0.001, 0.005, 0.05])
    assert [t["choice"] for t in table] == [None, "student", "reference"]
    assert table[1]["paid"] == pytest.approx(0.02)  # eval mIoU paid against the best on val
    assert table[1]["val_miou"] == 0.60 and table[1]["miou"] == pytest.approx(0.59)
    assert deploy.best_deployable(rows)["name"] == "student"


def test_choices_are_made_on_the_validation_split():
    """Eval is for reporting: a row without a validation mIoU cannot be chosen, and the eval mIoU does not decide."""
    rows = [{"name": "reference", "median_s": 0.02, "miou": 0.62}, {"name": "student", "median_s": 0.004, "miou": 0.60}]
    with pytest.raises(ValueError, match="validation split"):
        deploy.choose(rows, 0.05)
    with pytest.raises(ValueError, match="validation split"):
        deploy.best_deployable(rows)
    rows = [{**rows[0], "val_miou": 0.60}, {**rows[1], "val_miou": 0.61}]  # on val the student is the better
    assert deploy.choose(rows, 0.05)["name"] == "student"


def test_a_difference_within_the_noise_is_a_tie_broken_by_latency():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 300)
    rows = [_val_row("slow", 0.020, float(base.mean()), base.tolist()),
            _val_row("fast", 0.005, float(base.mean()) - 0.002, (base - rng.normal(0.002, 0.05, 300)).tolist()),
            _val_row("bad", 0.001, float(base.mean()) - 0.2, (base - 0.2).tolist())]
    assert deploy.within_noise(rows[0], rows[1]) and not deploy.within_noise(rows[0], rows[2])
    pick = deploy.choose(rows, 0.05)
    assert pick["name"] == "fast" and pick["tied"] == ["fast", "slow"]  # "slow" is more accurate, but not beyond the noise
    assert deploy.choose(rows, 0.003)["tied"] == ["bad"]
    table = deploy.budget_table(rows, [0.05])
    assert table[0]["choice"] == "fast" and table[0]["tied"] == ["fast", "slow"]
    rows[2]["val_miou"] = rows[0]["val_miou"]  # "bad" passes the bar on val: the fastest that passes
    text = deploy.choice_reading(rows, deploy.best_deployable(rows, reference="slow"), reference="slow")
    assert text.startswith("Chosen on the validation split (300 objects): bad")
    assert "beyond the noise" in text and "Reported on eval" in text
    rows[2]["val_ious"] = rows[1]["val_ious"]
    text = deploy.choice_reading(rows, deploy.best_deployable(rows, reference="slow"), reference="slow")
    assert "tie broken by latency" in text


def test_same_model_names_the_pytorch_fp32_step():
    assert deploy.same_model("student ort fp32") == "student" and deploy.same_model("ort int8") == "reference"
    assert deploy.same_model("pruned+int8") == "pruned" and deploy.same_model("openvino fp32") == "reference"


def test_accuracy_compares_a_runtime_with_the_same_model(tiny):
    """A student on a runtime is compared with the student in PyTorch, not with tiny."""
    s = scenes.SceneDataset("val", 1).scene(0)
    pts = deploy.frame_points(1)
    other = models.load_sam("tiny")
    with torch.no_grad():
        for p in other.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vs = {"reference": deploy.torch_variant("reference", tiny, s.image, pts),
          "student": deploy.torch_variant("student", other, s.image, pts),
          "student ort fp32": deploy.torch_variant("student ort fp32", other, s.image, pts)}
    acc = deploy.accuracy(vs, 1, progress=False, split="val")
    assert acc["student ort fp32"]["same_model_agreement"] == 1.0  # the same model's masks
    assert acc["student ort fp32"]["agreement"] == acc["student"]["agreement"] < 1.0  # against tiny
    assert acc["reference"]["match_share"] == 1.0 and len(acc["reference"]["ious"]) == len(s.masks)


def _row(name, runtime, ms, miou, agree, own=None, match=None, iqr=0.0005):
    return {"name": name, "runtime": runtime, "median_s": ms / 1e3, "iqr_s": iqr, "speedup": 16.0 / ms, "miou": miou,
            "agreement": agree, "same_model_agreement": agree if own is None else own,
            "match_share": agree if match is None else match}


def test_readings_follow_the_numbers():
    rows = [_row("reference", "pytorch", 16.0, 0.77, 1.0), _row("fused", "pytorch", 16.3, 0.77, 1.0),
            _row("pruned", "pytorch", 12.6, 0.57, 0.61, match=0.2), _row("student", "pytorch", 7.6, 0.76, 0.82, 1.0, 0.4),
            _row("student ort fp32", "onnxruntime", 4.8, 0.76, 0.82, 0.999), _row("ort int8", "onnxruntime", 10.7, 0.77, 0.98)]
    text = deploy.stack_reading(rows, "sdpa")
    assert "pruned departs most: agreement 0.610, 20% of its prompts matched" in text
    assert "Same masks as the reference (agreement 0.999 or more): fused." in text
    assert "within the timing spread" in text
    rows[1]["median_s"] = 0.020
    assert "slower than the reference's" in deploy.stack_reading(rows, "sdpa")
    text = deploy.runtime_agreement_reading(rows)
    assert "student ort fp32 0.999, ort int8 0.980." in text
    assert "ort int8 departs most from its own PyTorch model (0.980)" in text
    assert "agrees with tiny's masks at 0.820" in text


def test_frame_pareto_labels_do_not_overlap():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    from edgelab import viz
    pts = [("reference", 16.15, 0.774), ("fused", 16.41, 0.774), ("pruned", 12.61, 0.570), ("pruned+int8", 14.58, 0.569),
           ("student", 7.63, 0.758), ("student+int8", 8.98, 0.759), ("ort fp32", 13.97, 0.774), ("ort int8", 10.70, 0.776),
           ("student ort fp32", 4.83, 0.758), ("student ort int8", 4.41, 0.757), ("openvino fp32", 10.80, 0.774),
           ("openvino int8", 7.38, 0.773)]
    rows = [{"name": n, "runtime": "pytorch" if n in deploy.PYTORCH_STEPS else "onnxruntime", "median_s": t / 1e3, "miou": m}
            for n, t, m in pts]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    viz.frame_pareto(rows, rows[9], 0.744, ax=ax)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text() in {n for n, _, _ in pts}]
    assert sorted(t.get_text() for t in labels) == sorted(n for n, _, _ in pts)
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text alone, without its leader line
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


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
    assert rec["deploy"]["best"]["name"] in names and rec["deploy"]["best"]["chosen_on"] == "val"
    assert set(rec["deploy"]["val_miou"]) == set(names) and rec["deploy"]["same_model_agreement"]["student ort fp32"] >= 0.99
    assert (tmp_path / "student_encoder_int8.onnx").is_file()
    code, _, err = run_cli("bench", "deploy", "--out", str(tmp_path), "--prune-ratio", "1.5", "--json")
    assert code == 2 and err.strip().startswith("edgelab: error: prune_ratio")


def test_roofline_base_names_the_fp32_model_and_its_int8_layers():
    assert deploy.roofline_base("fused") == ("reference", ())
    assert deploy.roofline_base("pruned+int8") == ("pruned", ("Linear/MLP",))
    # ONNX Runtime's dynamic INT8 quantizes MatMul and Gemm only: its convolutions stay fp32
    assert deploy.roofline_base("student ort int8") == ("student", ("Linear/MLP",))
    assert deploy.roofline_base("ort int8") == ("reference", ("Linear/MLP",))
    assert deploy.roofline_base("openvino int8") == ("reference", ("Linear/MLP", "conv/patch embed"))


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
