"""edgelab.cpu_kernel: our CPU kernel for SAM's biased attention equals SAM's own attention.

The first test on a machine compiles the kernel (about 30 s on 2 cores); later ones load it. No
time is asserted (GUIDE, "Measuring").
"""
import pytest
import torch

from edgelab import attention as A
from edgelab import cpu_kernel


def _block(grid: int, batch: int = 1, dim: int = 64, heads: int = 2, seed: int = 0):
    blk, x = A.global_block(dim=dim, heads=heads, grid=grid, seed=seed)
    with torch.no_grad():  # SAM zero-initialises the tables: random ones make the bias count
        g = torch.Generator().manual_seed(seed + 1)
        blk.rel_pos_h.copy_(torch.randn(blk.rel_pos_h.shape, generator=g) * 0.5)
        blk.rel_pos_w.copy_(torch.randn(blk.rel_pos_w.shape, generator=g) * 0.5)
    if batch > 1:
        x = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(seed + 2))
    return blk, x


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = cpu_kernel.available()
    assert ok, why  # a C++ compiler is part of the workbook's set-up (torch.compile needs one too)


@pytest.mark.parametrize("grid,block,kv_block,dim", [
    (16, None, 512, 64),   # one block of keys (tiny's global blocks); one task per head
    (24, 64, 100, 64),     # 24-wide rows: gathered bias (AVX-512) or keys by whole rows (BLAS)
    (8, 20, 24, 64),       # short rows (windows) and key blocks that cut grid rows
    (7, 49, 49, 64),       # one window of 7 x 7
    (32, None, 256, 64),   # 32-key tiles inside one grid row (vit_b's global blocks), 128-query blocks
    (16, None, 512, 96),   # head dim 48 (not a multiple of 16): the BLAS path on every CPU
    (14, None, 512, 160),  # head dim 80 (vit_h's): 5 vectors per output row
])
def test_kernel_equals_sam_attention(grid, block, kv_block, dim):
    blk, x = _block(grid, batch=2, dim=dim)
    with torch.inference_mode():
        ref = A.reference_forward(blk, x)
        q, k, v = A._split_heads(blk, x)  # strided views of the qkv output: read in place
        out = cpu_kernel.biased_attention(q, k, v, *A.rel_pos_tables(blk, (grid, grid)), blk.scale,
                                          block=block, kv_block=kv_block)
        mine = blk.proj(out.view(2, grid, grid, -1))
    assert out.shape == (2, grid * grid, blk.num_heads, q.shape[-1])
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-5), (mine - ref).abs().max()


def test_kernel_variant_in_an_encoder_and_contiguous_inputs():
    blk, x = _block(12)
    with torch.inference_mode():
        ref = A.reference_forward(blk, x)
        assert torch.allclose(A.kernel_forward(blk, x), ref, rtol=1e-4, atol=1e-5)
        q, k, v = (t.contiguous() for t in A._split_heads(blk, x))
        out = cpu_kernel.biased_attention(q, k, v, *A.rel_pos_tables(blk, (12, 12)), blk.scale)
        assert torch.allclose(blk.proj(out.view(1, 12, 12, -1)), ref, rtol=1e-4, atol=1e-5)


def test_kernel_variant_hands_bf16_to_fused():
    """BF16 (autocast or BF16 weights) is not the kernel's: the variant runs `fused` for it."""
    blk, x = _block(8)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(A.kernel_forward(blk, x), A.fused_forward(blk, x))
        half = blk.to(torch.bfloat16)
        out = A.kernel_forward(half, x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.equal(out, A.fused_forward(half, x.to(torch.bfloat16)))


def test_kernel_bad_input_is_one_clear_error():
    blk, x = _block(8)
    q, k, v = A._split_heads(blk, x)
    rh, rw = A.rel_pos_tables(blk, (8, 8))
    with pytest.raises(ValueError, match="do not cover 64 tokens"):
        cpu_kernel.biased_attention(q, k, v, rh[:4], rw, blk.scale)
    with pytest.raises(ValueError, match="must be 1 or more"):
        cpu_kernel.biased_attention(q, k, v, rh, rw, blk.scale, block=0)
    with pytest.raises(ValueError, match=r"\(batch, heads, N, d\)"):
        cpu_kernel.biased_attention(q[0], k[0], v[0], rh, rw, blk.scale)
    with pytest.raises(RuntimeError, match="fp32 only"):
        cpu_kernel.biased_attention(q.double(), k.double(), v.double(), rh.double(), rw.double(), blk.scale)


def test_variants_for_leaves_the_kernel_out_off_the_cpu():
    assert "kernel" in A.variants_for("cpu")
    assert A.variants_for("cuda") == [v for v in A.VARIANTS if v != "kernel"]


def test_unbuildable_kernel_is_one_line(monkeypatch):
    """No compiler: one line that says what to install, no build log."""
    monkeypatch.setenv("CXX", "no-such-compiler-edgelab")
    cpu_kernel.load.cache_clear()
    try:
        ok, why = cpu_kernel.available()
    finally:
        cpu_kernel.load.cache_clear()
    assert not ok and "no C++ compiler (no-such-compiler-edgelab)" in why and "\n" not in why
