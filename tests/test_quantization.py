"""Chapter 03: the hand quantizer against torch's, the int8 layers, the variants and the CLI."""
import json

import pytest
import torch

from edgelab import bench, cli, models, quantization as Q


@pytest.fixture(scope="module")
def tiny():
    """The shipped, trained tiny SAM (not modified by these tests: every variant is a copy)."""
    return models.load_sam("tiny")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_hand_quantizer_matches_torch_integers(symmetric, axis):
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 2.5 + 0.7
    qt = Q.linear_quantize(x, 8, symmetric, axis)
    assert qt.q.dtype == torch.int8
    assert torch.equal(qt.q.int(), Q.torch_quantize(x, qt).int())
    assert Q.quantization_error(x, 8, symmetric, axis) < 0.02


@pytest.mark.parametrize("bits", Q.BITS)
def test_every_bit_width_stays_in_range_and_error_falls(bits):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    for symmetric in (False, True):
        qt = Q.linear_quantize(x, bits, symmetric)
        lo, hi = Q.qrange(bits, symmetric)
        assert lo >= -(2 ** (bits - 1)) and hi == 2 ** (bits - 1) - 1
        assert int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
        assert qt.q.dtype == (torch.int8 if bits <= 8 else torch.int16)
    i = Q.BITS.index(bits)
    if i > 0:
        assert Q.quantization_error(x, bits) < Q.quantization_error(x, Q.BITS[i - 1])


def test_hand_quantizer_matches_torch_on_every_tiny_weight(tiny):
    for name, p in tiny.named_parameters():
        if p.dim() == 2:
            for symmetric in (False, True):
                for axis in (None, 0):
                    qt = Q.linear_quantize(p, 8, symmetric, axis)
                    assert torch.equal(qt.q.int(), Q.torch_quantize(p.detach(), qt).int()), (name, symmetric, axis)


def test_asymmetric_range_maps_min_and_max_to_the_ends():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    qt = Q.linear_quantize(x, 8)
    assert int(qt.q.min()) == -128 and int(qt.q.max()) == 127
    assert torch.allclose(Q.linear_dequantize(qt), x, atol=float(qt.scale) / 2 + 1e-6)
    assert float(Q.linear_dequantize(qt)[1]) == 0.0  # zero is exact


def test_bad_bit_widths_are_refused():
    for bits in (1, 9, 12, 32):
        with pytest.raises(ValueError, match="bits"):
            Q.linear_quantize(torch.ones(3), bits)


def test_int8_linear_close_to_fp32_and_uses_the_integer_kernel(monkeypatch):
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 20, 64)
    il = Q.Int8Linear.from_float(lin)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.dtype) or real(a, b))
    with torch.no_grad():
        y, ref = il(x), lin(x)
        small = il(x[:1, :4])  # 4 rows: too few for _int_mm, the dequantized fallback
    assert calls == [torch.int8]
    assert y.shape == ref.shape and float((y - ref).norm() / ref.norm()) < 0.02
    assert torch.allclose(small, lin(x[:1, :4]), atol=0.05)


def test_w8a8_tiny_is_small_and_keeps_its_masks(tiny):
    from edgelab import evaluate
    q = Q.quantize_w8a8(tiny)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.image_encoder.modules())
    assert bench.size_mb(q) < 0.3 * bench.size_mb(tiny)
    a = evaluate.evaluate_scenes(tiny, 3, progress=False).miou
    b = evaluate.evaluate_scenes(q, 3, progress=False).miou
    assert abs(a - b) < 0.03


def test_packed_int4_is_half_of_int8(tiny):
    names = list(Q.quantizable_layers(tiny, Q.PARTS, (torch.nn.Linear,)))
    s8 = bench.size_mb(Q.packed_state(tiny, names, 8))
    s4 = bench.size_mb(Q.packed_state(tiny, names, 4))
    assert s4 < s8 < bench.size_mb(tiny)


def test_static_calibration_percentile_is_inside_minmax(tiny):
    from edgelab import scenes
    imgs = [scenes.make_scene(5_000_000 + i).image for i in range(2)]
    name = "image_encoder.blocks.0.mlp.lin2"
    vals = Q.capture_activations(tiny, imgs, names=[name])
    mm, pc = Q.calibrate(vals)[name], Q.calibrate(vals, "percentile", 99.0)[name]
    assert mm[0] <= pc[0] < pc[1] <= mm[1]
    q = Q.quantize_static(tiny, {name: pc})
    with torch.no_grad():
        x = torch.randn(1, 3, 256, 256)
        err = Q.encoder_error(q, tiny, x)
    assert 0 < err["rel_err"] < 0.2
    with pytest.raises(ValueError):
        Q.calibrate(vals, "mean")


def test_sensitivity_groups_and_mixed_precision(tiny):
    groups = Q.layer_groups(tiny)
    assert {"block 0", "block 5", "patch_embed", "neck", "decoder"} <= set(groups)
    calls = []
    scores = Q.block_sensitivity(tiny, lambda m: calls.append(1) or 1.0, bits=4)
    assert set(scores) == set(groups) and len(calls) == len(groups)
    _, size_mixed = Q.mixed_precision(tiny, ["block 2"])
    _, size_all4 = Q.mixed_precision(tiny, [])
    assert size_all4 < size_mixed
    with pytest.raises(ValueError, match="unknown layer groups"):
        Q.mixed_precision(tiny, ["block 99"])


def test_cli_bench_quant_json(capsys):
    rc = cli.main(["bench", "quant", "--model", "tiny", "--variants", "w8a8,int8_weight_only",
                   "--attention", "sdpa", "--repeats", "1", "--scenes", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["reference"] == "fp32_reference"
    names = [v["name"] for v in out["variants"]]
    assert names == ["fp32", "w8a8", "int8_weight_only", "fp32_reference"]
    for v in out["variants"]:
        assert {"size_mb", "median_s", "rel_err", "miou"} <= set(v)


def test_cli_bench_quant_bad_variant(capsys):
    assert cli.main(["bench", "quant", "--variants", "int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int3" in err[0]


def test_roofline_kind_of_each_variant():
    assert Q.roofline_kind("w8a8_fbgemm") == ("fp32", ("Linear/MLP",))
    assert Q.roofline_kind("prune 0.4 + w8a8") == ("fp32", ("Linear/MLP",))
    assert Q.roofline_kind("bf16") == ("bf16", ())
    assert Q.roofline_kind("int4_weight_only") == ("fp32", ())
