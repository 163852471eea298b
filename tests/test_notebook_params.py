"""Notebook parameters: notebook 00 reruns under papermill with non-default parameters, into a folder outside
notebooks/; nbval cells get their output timeout and the lighter UNDER_TEST settings (tests/conftest.py)."""
import json
import re

import papermill as pm
import pytest

from edgelab import runner, workbook


def test_notebook_00_with_other_parameters(tmp_path):
    src = runner.notebooks(["00"])[0]
    before = src.read_bytes()
    out = tmp_path / "00.ipynb"
    pm.execute_notebook(str(src), str(out), cwd=str(src.parent), kernel_name="python3", progress_bar=False,
                        parameters={"n_eval": 4, "bench_repeats": 1, "seed": 3,
                                    "results_dir": str(tmp_path / "results")})
    assert src.read_bytes() == before, "the source notebook was written to"
    rec = json.loads((tmp_path / "results" / "00_segment_anything_tour.json").read_text())
    row = rec["rows"][0]
    assert row["weights"] == "trained" and 0 <= row["miou"] <= 1 and row["median_s"] > 0
    text = out.read_text()
    assert "n_eval = 4" in text


def test_nbval_cells_wait_60_s_for_their_outputs(request):
    cells = [i for i in request.session.items if hasattr(i, "output_timeout")]
    if not cells:
        pytest.skip("no notebook collected in this session (run `pytest tests notebooks --nbval-lax`)")
    assert all(c.output_timeout == 60 for c in cells)


def test_under_test_settings_name_parameters_that_no_checked_cell_reads():
    from conftest import UNDER_TEST  # tests/ is on sys.path
    for name, overrides in UNDER_TEST.items():
        path = workbook.NOTEBOOKS_DIR / name
        assert set(overrides) <= set(runner.parameter_names(path)), name
        nb = json.loads(path.read_text())
        checked = ["".join(c["source"]) for c in nb["cells"]
                   if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
        read = [(p, src.splitlines()[1]) for p in overrides for src in checked if re.search(rf"\b{p}\b", src)]
        assert not read, f"{name}: a checked cell reads {read}"


def test_under_test_source_assigns_after_the_cell():
    from conftest import under_test_source
    env: dict = {}
    exec(under_test_source("steps = 600\nratios = [0.2]", {"steps": 150, "ratios": [0.5]}), env)
    assert env["steps"] == 150 and env["ratios"] == [0.5]


def test_nbval_parameters_cells_get_the_lighter_settings(request):
    from conftest import UNDER_TEST
    cells = [i for i in request.session.items
             if hasattr(i, "cell") and "parameters" in i.cell.get("metadata", {}).get("tags", [])]
    if not cells:
        pytest.skip("no notebook collected in this session (run `pytest tests notebooks --nbval-lax`)")
    for item in cells:
        overrides = UNDER_TEST.get(item.fspath.basename, {})
        assert all(f"\n{k} = {v!r}" in item.cell.source for k, v in overrides.items()), item.fspath.basename
