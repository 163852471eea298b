"""edgelab.bench: behaviour only. No test asserts a time (GUIDE, "Measuring")."""
import json
import statistics

import pytest
import torch

from edgelab import bench


def _recorder(calls: list[str], name: str):
    return lambda: calls.append(name)


def test_time_callable_counts_calls_and_summarises():
    calls: list[str] = []
    t = bench.time_callable(_recorder(calls, "f"), warmup=2, repeats=4, label="f")
    assert len(calls) == 2 + 4
    assert len(t.times_s) == 4
    assert t.median_s == statistics.median(t.times_s)
    q1, _, q3 = statistics.quantiles(t.times_s, n=4, method="inclusive")
    assert t.iqr_s == pytest.approx(q3 - q1)
    assert t.label == "f" and t.threads == torch.get_num_threads()
    assert set(t.as_dict()) == {"label", "median_s", "iqr_s", "times_s", "threads"}


def test_time_callable_blocked_autorange():
    calls: list[str] = []
    t = bench.time_callable(_recorder(calls, "f"), warmup=0, min_run_time=0.01)
    # blocked_autorange times blocks of many calls: more calls than recorded times, per-call times
    assert len(calls) > len(t.times_s) >= 1 and t.median_s == statistics.median(t.times_s)


def test_compare_interleaves_variants():
    calls: list[str] = []
    fns = {name: _recorder(calls, name) for name in "abc"}
    result = bench.compare(fns, warmup=1, repeats=3)
    assert calls == ["a", "b", "c"] * (1 + 3)
    assert list(result) == ["a", "b", "c"]
    for name, t in result.items():
        assert t.label == name and len(t.times_s) == 3
        assert t.median_s == statistics.median(t.times_s)


def test_count_macs_linear():
    assert bench.count_macs(torch.nn.Linear(64, 32), torch.randn(10, 64)) == 10 * 64 * 32


def test_bench_record_shape_and_validation(tmp_path):
    variants = [{"name": "sam", "median_s": 1.5, "iqr_s": 0.1},
                {"name": "sdpa", "median_s": 0.75, "macs": 123, "miou": None}]
    rec = bench.bench_record("sam", "random", variants)
    assert set(rec) == {"reference", "weights", "machine", "variants"}
    assert rec["variants"] == variants
    path = bench.save_json(rec, tmp_path / "deep" / "bench.json")
    assert json.loads(path.read_text()) == rec
    with pytest.raises(ValueError, match="unknown keys"):
        bench.bench_record("sam", "random", [{"name": "sam", "latency": 1.0}])
    with pytest.raises(ValueError, match="weights"):
        bench.bench_record("sam", "pretrained", variants)
    with pytest.raises(ValueError, match="name"):
        bench.bench_record("sam", "trained", [{"median_s": 1.0}])
    with pytest.raises(ValueError, match="reference"):
        bench.bench_record("vit_h", "trained", variants)


def test_as_table():
    table = bench.as_table([{"name": "sam", "median_s": 1.23456}, {"name": "sdpa", "macs": 7}])
    lines = table.splitlines()
    assert lines[0] == "| name | median_s | macs |"
    assert lines[2] == "| sam | 1.235 |  |"
    assert lines[3] == "| sdpa |  | 7 |"


def test_machine_info_keys():
    info = bench.machine_info()
    assert {"python", "torch", "platform", "cpu", "threads", "cpu_capability", "gpu"} <= set(info)
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx"):
        assert isinstance(info[flag], bool)
    assert info["threads"] == torch.get_num_threads()
    json.dumps(info)


def test_race_times_interleaved_and_measures_errors_against_the_reference():
    calls: list[str] = []
    x = torch.arange(4.0)

    def variant(name, out):
        return lambda: calls.append(name) or out

    rows = bench.race({"ref": variant("ref", x), "off": variant("off", x + torch.tensor([0, 0, 0, 2.0])),
                       "pair": variant("pair", (x[:2], x[2:]))}, "ref", warmup=1, repeats=2)
    assert calls == ["ref", "off", "pair"] * 3
    assert [r["name"] for r in rows] == ["ref", "off", "pair"]
    assert rows[2]["max_abs_err"] == 0  # a tuple of tensors is compared as their concatenation
    ref, off = rows[0], rows[1]
    assert ref["max_abs_err"] == 0 and ref["rel_err"] == 0
    assert off["max_abs_err"] == 2.0 and off["rel_err"] == pytest.approx(2 / x.norm().item())
    assert set(ref) == {"name", "median_s", "iqr_s", "max_abs_err", "rel_err"}  # what a bench record takes
    rounds: list[int] = []  # before_round runs once before each timed round, not during warm-up
    calls.clear()
    row, = bench.race({"ref": variant("ref", x)}, warmup=1, repeats=2, per_round=True,
                      before_round=lambda: rounds.append(len(calls)))
    assert rounds == [1, 2] and calls == ["ref"] * 3  # after the warm-up call, then after round 1
    assert len(row["times_s"]) == 2 and row["median_s"] == pytest.approx(sum(row["times_s"]) / 2)
    with pytest.raises(ValueError, match="reference 'nope'"):
        bench.race({"a": variant("a", x)}, "nope")


def test_race_refuses_outputs_it_cannot_compare():
    with pytest.raises(TypeError, match="tensor"):
        bench.race({"a": lambda: "text"}, warmup=0, repeats=1)
