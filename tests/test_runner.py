"""`edgelab run` and `report`: profiles from the parameters cell, run folders outside notebooks/."""
import json
from pathlib import Path

import pytest

from edgelab import records, runner


def test_every_notebook_has_parameters_and_full_values():
    nbs = runner.notebooks()
    assert nbs, "no notebooks found"
    for nb in nbs:
        cell = runner.parameters_cell(nb)
        assert "results_dir" in cell
        assert runner.profile_params(nb, "quick") == {}
        assert runner.profile_params(nb, "full"), f"{nb.name}: no '# full:' values in its parameters cell"


def test_unknown_notebook_and_profile_are_errors():
    with pytest.raises(ValueError, match="no notebook"):
        runner.notebooks(["99_nothing"])
    with pytest.raises(ValueError, match="profile"):
        runner.profile_params(runner.notebooks()[0], "medium")


def test_run_folder_inside_notebooks_is_refused():
    with pytest.raises(ValueError, match="outside notebooks"):
        runner.run_notebooks(out=runner.NOTEBOOKS_DIR / "out", only=["00"])


def test_records_round_trip_and_refuse_random_accuracy(tmp_path):
    row = {"model": "tiny", "weights": "trained", "variant": "reference", "median_s": 0.01, "miou": 0.5}
    records.write_records(tmp_path, "00_x", [row], {"cpu": "test"})
    rows = records.gather([tmp_path])
    assert rows[0]["chapter"] == "00_x" and rows[0]["miou"] == 0.5
    assert "| chapter |" in records.markdown_table(rows)
    assert records.csv_table(rows).startswith("chapter,")
    with pytest.raises(ValueError, match="random"):
        records.write_records(tmp_path, "00_y", [dict(row, weights="random")], {})
