"""edgelab.memory: peak memory of named functions in a fresh process (behaviour, not speed)."""
import pytest

from edgelab import memory

HOLD = "edgelab.memory:hold_bytes"


def test_peak_memory_sees_an_allocation():
    assert memory.peak_memory_mb(HOLD, {"mb": 200}) > 150
    assert memory.peak_rss_mb() > 0


def test_series_measures_each_call_from_a_fresh_mark():
    mem = memory.peak_memory_series(HOLD, {"small": {"mb": 20}, "big": {"mb": 120}, "small_again": {"mb": 20}})
    assert list(mem) == ["small", "big", "small_again"]
    assert 100 < mem["big"] < 200 and mem["small"] < 60 and mem["small_again"] < 60, mem


def test_setup_is_not_counted_even_when_it_peaked():
    if not memory.reset_peak():
        pytest.skip("this kernel does not let a process restart its peak-RSS mark")
    # the setup holds 300 MB and frees it; the measured 50 MB must read as about 50, not 0 or 350
    mb = memory.peak_memory_mb(HOLD, {"mb": 50}, setup=HOLD, setup_args={"mb": 300})
    assert 35 < mb < 120, mb


def test_child_errors_are_reported():
    with pytest.raises(RuntimeError, match="TypeError"):
        memory.peak_memory_mb(HOLD, {"no_such_argument": 1})
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        memory.peak_memory_mb("edgelab.no_such_module:f")
    with pytest.raises(RuntimeError, match="module:function"):
        memory.peak_memory_mb("edgelab.memory.hold_bytes")


def test_resolve_names_a_function():
    assert memory.resolve(HOLD) is memory.hold_bytes
    assert memory.hold_bytes(None, mb=1) == 2**20
