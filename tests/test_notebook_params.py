"""Notebook 00 reruns under papermill with non-default parameters, into a folder outside notebooks/."""
import json

import papermill as pm
import pytest

from edgelab import runner


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
