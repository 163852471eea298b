"""edgelab.roofline: the machine's rates and the lower bounds built on them (no time asserted)."""
import json

import pytest
import torch

from edgelab import roofline
from conftest import run_cli

RATES = {"fp32": {"rate": 100.0}, "bf16": {"rate": 200.0}, "int8": {"rate": 1000.0}, "memory": {"rate": 50.0}}


def test_lower_bound_adds_the_work_of_each_dtype_at_its_rate():
    assert roofline.lower_bound_s({"fp32": 100e9}, RATES) == pytest.approx(1.0)
    assert roofline.lower_bound_s({"fp32": 100e9, "int8": 1000e9}, RATES) == pytest.approx(2.0)
    # moving 200 GB at 50 GB/s takes longer than the arithmetic: memory-bound
    assert roofline.lower_bound_s({"bf16": 200e9}, RATES, bytes_moved=200e9) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown dtypes"):
        roofline.lower_bound_s({"fp64": 1.0}, RATES)


def test_of_limit_is_bound_over_measured():
    assert roofline.of_limit(2.0, 1.5) == 0.75
    with pytest.raises(ValueError):
        roofline.of_limit(0.0, 1.0)


@pytest.mark.parametrize("dtype", roofline.DTYPES)
def test_gemm_rate_is_ops_over_the_fastest_call(dtype):
    r = roofline.gemm_rate(dtype, n=64, repeats=3)
    assert r["rate"] == pytest.approx(2 * 64**3 / r["best_s"] / 1e9)
    assert r["best_s"] <= r["median_s"]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        roofline.gemm_rate("fp32", n=30)
    with pytest.raises(ValueError, match="dtype"):
        roofline.gemm_rate("fp16")
    with pytest.raises(ValueError, match="16 MB"):
        roofline.bandwidth(mb=1)


def test_bench_machine_json():
    code, out, err = run_cli("bench", "machine", "--n", "128", "--mb", "32", "--repeats", "2", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["weights"] == "random" and rec["reference"] == "gemm fp32"
    assert [v["name"] for v in rec["variants"]] == ["gemm fp32", "gemm bf16", "gemm int8", "memory copy"]
    assert set(rec["rates"]) == {"fp32", "bf16", "int8", "memory"} and all(r > 0 for r in rec["rates"].values())


def test_work_by_dtype_splits_the_flops_by_dtype():
    from edgelab import models, profiling
    enc = models.load_sam("tiny", weights="random").image_encoder
    x = torch.zeros(1, 3, 256, 256)
    cats = profiling.flop_categories(enc, x)
    total = sum(cats.values())
    assert roofline.work_by_dtype(enc, x) == {"fp32": total}
    w8 = roofline.work_by_dtype(enc, x, int8=("Linear/MLP",))
    assert w8["int8"] == cats["Linear/MLP"] and w8["fp32"] + w8["int8"] == total
    assert roofline.work_by_dtype(enc, x, "bf16") == {"bf16": total}
    with pytest.raises(ValueError, match="categories"):
        roofline.work_by_dtype(enc, x, int8=("convs",))


def test_annotate_adds_the_record_fields():
    row = roofline.annotate({"name": "v", "median_s": 4.0}, {"fp32": 100e9}, RATES)
    assert row["roofline_s"] == pytest.approx(1.0) and row["of_limit"] == pytest.approx(0.25)
    assert "fp32" in roofline.rates_line({d: {"rate": 1.0} for d in (*roofline.DTYPES, "memory")})
