"""edgelab.attention: every variant computes SAM's attention; switching, profiling, checks, CLI.

Small on purpose (2-core CPU): the tiny architecture, single blocks on small grids. No time is
asserted (GUIDE, "Measuring").
"""
import json
import statistics

import pytest
import torch
from segment_anything.modeling import image_encoder as sam_encoder

from edgelab import attention as A
from edgelab import bench, checks, models, profiling
from conftest import run_cli

FAST = [v for v in A.VARIANTS if v != "compiled"]  # compiling takes minutes on 2 cores


@pytest.fixture(scope="module")
def tiny_bias():
    """The tiny SAM with random weights and random (non-zero) relative-position tables."""
    torch.manual_seed(0)
    model = models.load_sam("tiny", weights="random")
    assert models.randomize_rel_pos(model, seed=1) == 6
    return model


@pytest.fixture(scope="module")
def tiny_input():
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_reference(tiny_bias, tiny_input):
    with torch.inference_mode():
        return tiny_bias.image_encoder(tiny_input)


@pytest.mark.parametrize("variant", FAST)
def test_variant_reproduces_reference_encoder(variant, tiny_bias, tiny_input, tiny_reference):
    with torch.inference_mode(), A.use_attention(tiny_bias, variant):
        out = tiny_bias.image_encoder(tiny_input)
    err = bench.output_error(out, tiny_reference)
    assert err["rel_err"] < 1e-5 and err["max_abs_err"] < 1e-4, err


@pytest.mark.parametrize("variant", ["fused", "tiled"])
def test_chunked_variants_exact_with_many_chunks(variant, monkeypatch):
    # a 6x5 grid (non-square, odd) and a tile so small that every query chunk is a few rows
    blk, _ = A.global_block(dim=32, heads=2, grid=6, seed=3)
    x = torch.randn(2, 6, 5, 32)
    blk.rel_pos_w.data = torch.randn(9, 16)
    with torch.inference_mode():
        ref = A.set_attention(blk, "reference")(x)
        monkeypatch.setattr(A, "FUSED_TILE_MB", 2 * 2 * 30 * 4 * 7 / 2**20)  # 7 queries per tile
        assert A.query_chunk(4, 30, 30) == 7               # tiled: 7 queries of all 4 (batch, head) pairs
        assert A.fused_tiles(2, 2, 30) == (1, 14)         # fused: one head, 14 queries of both images
        out = A.set_attention(blk, variant)(x)
    assert bench.output_error(out, ref)["rel_err"] < 1e-5


def test_folded_without_relative_positions():
    attn = sam_encoder.Attention(32, num_heads=4, use_rel_pos=False).eval()
    x = torch.randn(1, 4, 4, 32)
    with torch.inference_mode():
        ref = A.set_attention(attn, "reference")(x)
        for v in FAST:
            assert torch.allclose(A.set_attention(attn, v)(x), ref, atol=1e-5), v


def test_set_attention_switches_and_restores(tiny_bias):
    mods = A.attention_modules(tiny_bias)
    assert len(mods) == 6 and A.attention_of(tiny_bias) == "reference"
    with A.use_attention(tiny_bias, "fused"):
        assert A.attention_of(tiny_bias) == "fused"
        with A.use_attention(tiny_bias, "sdpa"):
            assert A.attention_of(tiny_bias) == "sdpa"
        assert A.attention_of(tiny_bias) == "fused"
    assert A.attention_of(tiny_bias) == "reference"
    assert all("forward" not in m.__dict__ for m in mods), "reference must be SAM's own forward again"
    with pytest.raises(ValueError, match="unknown attention variant 'flash'"):
        A.set_attention(tiny_bias, "flash")
    with pytest.raises(ValueError, match="no segment_anything"):
        A.set_attention(torch.nn.Linear(2, 2), "fused")


def test_no_core_is_the_projections_alone():
    # the Amdahl floor: qkv -> v -> proj, every head's v passed through; timing only, never a variant
    blk, _ = A.global_block(dim=32, heads=2, grid=6, seed=3)
    x = torch.randn(2, 6, 6, 32)
    with torch.inference_mode():
        out = A.set_attention(blk, "no-core")(x)
        v = blk.qkv(x)[..., 64:]                       # q, k, v are consecutive 32-wide slices
        assert torch.allclose(out, blk.proj(v), atol=1e-6)
        assert A.attention_of(blk) == "no-core"
        A.set_attention(blk, "reference")
    assert "no-core" not in A.VARIANTS and "no-core" not in A.EXACT_VARIANTS
    with pytest.raises(ValueError, match="unknown attention variant 'no-core'"):
        A.parse_variants("reference,no-core")


def test_parse_variants():
    assert A.parse_variants("reference, sdpa,fused,sdpa") == ["reference", "sdpa", "fused"]
    with pytest.raises(ValueError, match="unknown attention variant 'nope'"):
        A.parse_variants("sdpa,nope")
    with pytest.raises(ValueError, match="no attention variant"):
        A.parse_variants(" , ")


def test_trained_tiny_miou_is_unchanged_by_fused_attention():
    from edgelab import evaluate
    model = models.load_sam("tiny")
    ref = evaluate.evaluate_scenes(model, 2, progress=False)
    with A.use_attention(model, "fused"):
        fused = evaluate.evaluate_scenes(model, 2, progress=False)
    assert abs(fused.miou - ref.miou) < 1e-4


def test_decomposed_bias_matches_sam():
    q = torch.randn(3, 12, 8)
    th, tw = torch.randn(5, 8), torch.randn(7, 8)
    expected = sam_encoder.add_decomposed_rel_pos(torch.zeros(3, 12, 12), q, th, tw, (3, 4), (3, 4))
    assert torch.allclose(A.decomposed_rel_pos_bias(q, th, tw, (3, 4)), expected, atol=1e-5)


def test_exercise_checks_accept_solutions_and_reject_mistakes():
    checks.check_naive_attention(A.naive_attention)
    checks.check_rel_pos_bias(A.decomposed_rel_pos_bias)
    with pytest.raises(checks.ExerciseError, match="naive attention"):
        checks.check_naive_attention(lambda q, k, v, s: torch.softmax(q @ k.transpose(-2, -1) * s, 1) @ v)
    with pytest.raises(checks.ExerciseError, match="no answer yet"):
        checks.check_naive_attention(lambda q, k, v, s: None)
    with pytest.raises(checks.ExerciseError, match="not implemented"):
        checks.check_rel_pos_bias(lambda *a: (_ for _ in ()).throw(NotImplementedError))

    def swapped(q, th, tw, hw):  # height and width tables exchanged
        return A.decomposed_rel_pos_bias(q, tw, th, hw[::-1])
    with pytest.raises(checks.ExerciseError, match="decomposed bias"):
        checks.check_rel_pos_bias(swapped)

    def scaled(q, th, tw, hw):  # q scaled before the bias: SAM uses the unscaled q
        return A.decomposed_rel_pos_bias(q * q.shape[-1] ** -0.5, th, tw, hw)
    with pytest.raises(checks.ExerciseError):
        checks.check_rel_pos_bias(scaled)


def test_categories_cover_time_and_flops(tiny_bias):
    x = torch.randn(1, 3, 256, 256)
    flops = profiling.flop_categories(tiny_bias.image_encoder, x)
    assert set(flops) == set(profiling.CATEGORIES)
    assert sum(flops.values()) == 2 * bench.count_macs(tiny_bias.image_encoder, x)
    assert flops["softmax"] == flops["norms"] == 0 and flops["Linear/MLP"] > flops["attention matmuls"] > 0
    assert flops["rel-pos bias"] > 0 and flops["conv/patch embed"] > 0
    with torch.inference_mode():
        secs, out = profiling.profile_categories(tiny_bias.image_encoder, x)
    assert out.shape == (1, 128, 16, 16)
    assert set(secs) == set(profiling.CATEGORIES) and all(s >= 0 for s in secs.values())
    for cat in ("attention matmuls", "softmax", "rel-pos bias", "Linear/MLP", "norms"):
        assert secs[cat] > 0, cat
    assert abs(sum(profiling.shares(secs).values()) - 1) < 1e-9
    assert sam_encoder.add_decomposed_rel_pos.__name__ == "add_decomposed_rel_pos", "patch not undone"
    calls = []
    hook = tiny_bias.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():  # runs=3: three profiled forwards after the warm-up, a median per category
            med, _ = profiling.profile_categories(tiny_bias.image_encoder, x, warmup=1, runs=3)
    finally:
        hook.remove()
    assert len(calls) == 4 and set(med) == set(profiling.CATEGORIES) and med["Linear/MLP"] > 0
    with pytest.raises(ValueError, match="runs"):
        profiling.profile_categories(tiny_bias.image_encoder, x, runs=0)


def test_classify_op():
    assert profiling.classify_op("aten::bmm") == "attention matmuls"
    assert profiling.classify_op("aten::scaled_dot_product_attention") == "attention matmuls"
    assert profiling.classify_op("aten::_softmax") == "softmax"
    assert profiling.classify_op("aten::add") == "other"


def test_block_peak_memory_fused_below_reference(monkeypatch):
    monkeypatch.setenv("EDGELAB_FUSED_TILE_MB", "2")  # the child builds 2 MB tiles
    mem = A.block_peak_memory_mb(["fused", "reference"], grid=32, dim=64, heads=4)
    assert set(mem) == {"fused", "reference"}
    # reference holds >= 3 (4, 1024, 1024) fp32 score tensors (16 MB each); fused never one whole
    assert mem["reference"] > 40 and mem["fused"] < mem["reference"] / 2, mem


def test_prompt_batching_matches_loop_and_ragged(tiny_bias):
    with torch.inference_mode():
        embs = tiny_bias.image_encoder(torch.randn(2, 3, 256, 256))
        pts = torch.rand(5, 2) * 256
        m_loop, iou_loop = A.decode_loop(tiny_bias, embs[:1], pts)
        m_batch, iou_batch = A.decode_batched(tiny_bias, embs[:1], pts)
        assert m_batch.shape == m_loop.shape == (5, 3, 64, 64)
        assert torch.allclose(m_loop, m_batch, atol=1e-4) and torch.allclose(iou_loop, iou_batch, atol=1e-5)
        nested = torch.nested.nested_tensor([pts[:2], pts[2:]], layout=torch.jagged)
        m_rag, iou_rag = A.decode_ragged(tiny_bias, embs, nested)
        m_b2, _ = A.decode_batched(tiny_bias, embs[1:], pts[2:])
    assert m_rag.shape == (5, 3, 64, 64)
    assert torch.allclose(m_rag[:2], m_loop[:2], atol=1e-4) and torch.allclose(m_rag[2:], m_b2, atol=1e-4)
    assert torch.allclose(iou_rag[:2], iou_loop[:2], atol=1e-5)


def test_bf16_encoder_modes(tiny_bias):
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        ref = tiny_bias.image_encoder(x)
        for mode in ("autocast", "weights"):
            out = models.BF16Encoder(tiny_bias.image_encoder, mode)(x)
            assert out.dtype == torch.float32 and 0 < bench.output_error(out, ref)["rel_err"] < 0.1
    assert next(tiny_bias.parameters()).dtype == torch.float32, "bf16 weights must be a copy"
    with pytest.raises(ValueError):
        models.BF16Encoder(tiny_bias.image_encoder, "fp8")
    info = A.bf16_support()
    assert {"avx512_bf16", "amx", "cpu_capability", "native_bf16_instructions"} <= set(info)


def test_bf16_verdict_follows_the_numbers():
    none = {"native_bf16_instructions": False, "avx512_bf16": False, "amx": False}
    flags = {"native_bf16_instructions": True, "avx512_bf16": True, "amx": False}
    text = A.bf16_verdict(none, 0.3, 0.5, 1e-2)
    assert "no BF16 instructions" in text and "slower (0.50x)" in text
    text = A.bf16_verdict(flags, 0.54, 0.59, 1e-2)
    assert "avx512_bf16" in text and "without a speed-up" in text and "slower" in text
    text = A.bf16_verdict(flags, 2.8, 1.3, 1e-2)
    assert "use them" in text and "gains 1.30x" in text and "far less than the GEMM" in text
    assert "AMX" in A.bf16_verdict({**flags, "amx": True}, 3.0, 2.5, 1e-2)
    assert "far less" not in A.bf16_verdict(flags, 2.0, 1.9, 1e-2)


def test_sdpa_backend_on_a_cpu_is_the_flash_kernel():
    # PyTorch's CPU dispatcher runs its flash-attention kernel for fp32, with or without a bias mask
    blk, x = A.global_block(dim=32, heads=2, grid=8)
    with torch.inference_mode():
        for variant in ("fused", "folded", "sdpa"):
            q, k, v, mask, scale = A.block_qkv(blk, x, variant)
            assert (mask is None) == (variant == "folded")
            assert A.sdpa_backend(q, k, v, mask, scale) == "FLASH_ATTENTION"




def test_cli_bench_attention_json():
    rc, out, err = run_cli("bench", "encoder", "--model", "tiny", "--weights", "random", "--image-size", "128",
                        "--attention", "sdpa,fused", "--repeats", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["reference"] == "reference" and d["weights"] == "random"
    assert [v["name"] for v in d["variants"]] == ["reference", "sdpa", "fused"]
    for v in d["variants"]:
        assert v["median_s"] > 0 and v["peak_mem_mb"] >= 0 and v["image_size"] == 128
        assert v["rel_err"] < 1e-5 and v["max_abs_err"] < 1e-4
    assert d["variants"][0]["max_abs_err"] == 0
    a = d["attention"]  # the ceiling: reference over the encoder with no attention core, same run
    assert a["no_core_s"] > 0
    assert a["ceiling_vs_reference"] == pytest.approx(d["variants"][0]["median_s"] / a["no_core_s"])
    # the core against the machine: matmul FLOPs of SAM's attention at the fp32 GEMM rate read in each round
    assert a["core_flops"] > 0 and len(a["gemm_reads"]) == 1 and a["fp32_gemm_gflops"] == a["gemm_reads"][0] > 0
    for v in d["variants"]:  # paired round by round: core[r] = time[r] - no-core time[r]
        cores = [t - n for t, n in zip(a["times_s"][v["name"]], a["times_s"]["no-core"])]
        assert a["core_s"][v["name"]] == pytest.approx(statistics.median(cores))
        shares = [a["core_flops"] / c / 1e9 / g if c > 0 else None for c, g in zip(cores, a["gemm_reads"])]
        assert a["core_share_rounds"][v["name"]] == pytest.approx(shares)
        assert a["core_of_gemm_rate"][v["name"]] == (None if None in shares else pytest.approx(statistics.median(shares)))
    # the reference reaches 0 of its own ceiling; at 128 px with one repeat its core can measure at or
    # under zero on a noisy machine, and then the share is None (timings are never asserted)
    assert a["of_ceiling"]["reference"] == (0 if a["core_s"]["reference"] > 0 else None)
    # PyTorch's kernel alone on the same shapes, at the same GEMM rate; its FLOPs are the core's
    kc = a["kernel_ceiling"]
    assert kc["fp32_gemm_gflops"] == a["fp32_gemm_gflops"]
    assert sum(r["calls"] * r["flops"] for r in kc["shapes"]) == a["core_flops"]
    assert kc["no_bias"] > 0 and kc["bias"] > 0


def test_attention_shapes_of_vit_b_at_1024():
    """vit_b at 1024 px: 8 windowed blocks (25 windows of 14 x 14 after padding 64 to 70) and 4 global
    blocks of 64 x 64 tokens, 12 heads of 64; read on fake tensors, so no arithmetic is done."""
    model = models.timing_model("vit_b", 1024)
    shapes = A.attention_shapes(model, torch.zeros(1, 3, 1024, 1024))
    assert shapes == {(25, 12, 196, 64): 8, (1, 12, 4096, 64): 4}
    assert not model.image_encoder.blocks[0].attn._forward_pre_hooks  # hooks removed


def test_kernel_ceiling_weights_shapes_by_calls_and_flops():
    model = models.timing_model("tiny", 128)
    x = torch.randn(1, 3, 128, 128)
    r = A.kernel_ceiling(model, x, gemm_gflops=100.0, repeats=1)
    shapes = A.attention_shapes(model, x)
    assert {(s["batch"], s["heads"], s["tokens"], s["head_dim"]): s["calls"] for s in r["shapes"]} == shapes
    assert "kernel" in r  # our kernel alone on the same shapes (the CPU builds it: test_cpu_kernel)
    for name in ("no_bias", "bias", "kernel"):
        flops = sum(s["calls"] * s["flops"] for s in r["shapes"])
        seconds = sum(s["calls"] * s[name + "_s"] for s in r["shapes"])
        assert r[name] == pytest.approx(flops / seconds / 1e9 / 100.0)
    with pytest.raises(ValueError, match="gemm_gflops must be positive"):
        A.kernel_ceiling(model, x, gemm_gflops=0)


def test_cli_bad_attention_is_one_line():
    rc, out, err = run_cli("bench", "encoder", "--attention", "sdpa,flash", "--json")
    words = "unknown attention variant 'flash'"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("edgelab: error:") and words in lines[0], err


def test_paired_core_pairs_rounds_and_rejects_mismatched_series():
    # round 2's machine was slower for everything: paired, its share stays; a core <= 0 is None
    p = A.paired_core([3.0, 6.0, 3.0], [2.0, 4.0, 2.0], [100.0, 50.0, 100.0], flops=100e9)
    assert p["core_s"] == 1.0 and p["rounds"] == [1.0, 1.0, 1.0] and p["core_of_gemm_rate"] == 1.0
    p = A.paired_core([2.0, 3.0], [2.5, 2.0], [100.0, 100.0], flops=100e9)
    assert p["rounds"] == [None, 1.0] and p["core_of_gemm_rate"] is None
    with pytest.raises(ValueError, match="per round"):
        A.paired_core([1.0, 2.0], [1.0], [100.0, 100.0], flops=1e9)
    reads, hook = A.gemm_reader()
    hook()
    assert len(reads) == 1 and reads[0] > 0
