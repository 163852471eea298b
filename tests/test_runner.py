"""`edgelab run` and `report`: profiles from the parameters cell, run folders outside notebooks/."""
import json

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
    assert records.csv_table(rows).startswith("run,chapter,")
    with pytest.raises(ValueError, match="random"):
        records.write_records(tmp_path, "00_y", [dict(row, weights="random")], {})


def test_missing_chapters_names_the_notebooks_without_records():
    names = [nb.stem for nb in runner.notebooks()]
    assert records.missing_chapters(names) == []
    assert records.missing_chapters(names[1:] + ["99_demo"]) == names[:1]


def _demo_notebook(path):
    """A notebook with a parameter x: it fails for x == 2, else writes a results record."""
    import nbformat
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('x = 1  # full: 10\nresults_dir = "results"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from edgelab import records\n"
        "if x == 2:\n    raise RuntimeError('x must not be 2')\n"
        "records.write_records(results_dir, '99_demo', [{'model': 'tiny', 'weights': 'trained', "
        "'variant': f'x{x}', 'params': 1000, 'median_s': 0.01 * x, 'miou': 0.5 + 0.01 * x}], {'cpu': 'test cpu', 'threads': 1})")]
    nbformat.write(nb, path)
    return path


def test_sweep_runs_points_in_parallel_reports_a_failure_and_the_report_gathers_the_rest(tmp_path, capsys):
    from edgelab import cli
    nb = _demo_notebook(tmp_path / "demo.ipynb")
    source = nb.read_bytes()
    code = cli.main(["sweep", str(nb), "-p", "x", "1", "2", "3", "--jobs", "2", "--out", str(tmp_path / "sw"),
                     "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["failed"] == ["x=2"]
    assert [n["ok"] for n in out["notebooks"]] == [True, False, True]
    assert all(n["peak_mem_mb"] > 30 for n in out["notebooks"]), "the kernels' peak memory was not sampled"
    assert "x must not be 2" in out["notebooks"][1]["error"]
    assert json.loads((tmp_path / "sw" / "x=3" / "params.json").read_text()) == {"x": 3}
    assert nb.read_bytes() == source, "the sweep wrote into its source notebook"

    assert cli.main(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(r["variant"] for r in rep["rows"]) == ["x1", "x3"]
    assert {r["run"] for r in rep["rows"]} == {"sw/x=1", "sw/x=3"}
    assert all(r["params"] == 1000 and r["sweep"] == {"x": int(r["variant"][1:])} for r in rep["rows"])
    assert [f["name"] for f in rep["failures"]] == ["x=2"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| run |" in md and "sw/x=3" in md and "test cpu" in md and "x must not be 2" in md
    assert (tmp_path / "rep" / "report.csv").read_text().startswith("run,chapter,")
    assert "<table>" in (tmp_path / "rep" / "report.html").read_text()
    assert (tmp_path / "rep" / "latency_miou.png").read_bytes()[:4] == b"\x89PNG"

    readme = tmp_path / "README.md"
    readme.write_text("# demo\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nafter\n")
    assert cli.main(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep"), "--readme", str(readme),
                     "--json"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n") and "](rep/latency_miou.png)" in text
    assert "| sw/x=1 |" in text and "profile quick" in text and "failed notebooks: x=2" in text
    assert "chapters not in this run: 00_segment_anything_tour, 01_attention_profiling" in text
    readme.write_text("# no markers\n")
    assert cli.main(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep"), "--readme", str(readme)]) == 2


def test_ctrl_c_keeps_the_notebooks_that_finished(tmp_path):
    import signal, subprocess, sys, time
    import nbformat
    first = _demo_notebook(tmp_path / "a_first.ipynb")
    slow = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('results_dir = "results"')
    params.metadata["tags"] = ["parameters"]
    slow.cells = [params, nbformat.v4.new_code_cell("import time\ntime.sleep(60)")]
    nbformat.write(slow, tmp_path / "b_slow.ipynb")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgelab.cli", "run", "--only", str(first),
                             str(tmp_path / "b_slow.ipynb"), "--out", str(out)],
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 120
    while "[2/2] b_slow" not in seen and time.time() < deadline:
        seen += proc.stderr.readline()
    time.sleep(3)  # let the second kernel start
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, seen + rest
    assert "stopped during b_slow" in rest and "interrupted" in rest
    summary = json.loads((out / "summary.json").read_text())
    assert [n["name"] for n in summary["notebooks"]] == ["a_first"] and summary["stopped"] == "b_slow"
    assert (out / "results" / "99_demo.json").exists()


def test_run_and_sweep_refuse_unknown_parameters_and_empty_grids(tmp_path, capsys):
    from edgelab import cli
    nb = _demo_notebook(tmp_path / "demo.ipynb")
    assert cli.main(["sweep", str(nb), "-p", "y", "1", "2", "--out", str(tmp_path / "a")]) == 2
    assert "no parameter y" in capsys.readouterr().err
    assert cli.main(["sweep", str(nb), "-p", "x", "--out", str(tmp_path / "b")]) == 2
    assert cli.main(["run", "--only", "00", "-p", "n_evall", "3", "--out", str(tmp_path / "c")]) == 2
    assert "no parameter n_evall" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "b")]) == 2


def test_run_and_sweep_refuse_a_value_of_another_kind(tmp_path, capsys):
    """`-p n_eval abc` is one line before any notebook starts (it was a TypeError inside one)."""
    from edgelab import cli
    for argv, words in [(["run", "--only", "00", "-p", "n_eval", "abc"], "-p n_eval 'abc': 00_segment_anything_tour takes int"),
                        (["run", "--only", "04", "-p", "ddp_demo", "2"], "takes bool there (its default is True)"),
                        (["run", "--only", "02", "-p", "ratios", "0.5"], 'takes a list, such as -p ratios "[0.2, 0.4, 0.6]"'),
                        (["sweep", "02", "-p", "finetune_lr", "1", "x"], "-p finetune_lr 'x': 02_channel_pruning takes a number")]:
        assert cli.main([*argv, "--out", str(tmp_path / "r")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made
    assert runner._fits(2, 1e-3) and runner._fits([1], [0.2]) and runner._fits((0.2, 0.4), [0.2]) and runner._fits("vit_b", "tiny")
    assert runner._fits(True, None) and runner._fits(0, True) and not runner._fits(2, True) and not runner._fits(True, 3)


def test_report_plot_keeps_equal_miou_readable():
    from edgelab import viz
    rows = [{"chapter": "01_x", "run": "r", "variant": v, "median_s": t, "miou": 0.6217 + e}
            for v, t, e in (("a", 0.018, 0.0), ("b", 0.020, 4e-7), ("c", 0.024, -2e-7))]
    fig = viz.latency_miou_panels(rows)
    ax = fig.axes[0]
    y0, y1 = ax.get_ylim()
    assert y1 - y0 >= 0.02 - 1e-9 and y0 < 0.6217 < y1
    assert not ax.yaxis.get_major_formatter().get_useOffset()


def test_report_plot_names_a_point_by_model_where_variants_repeat():
    from edgelab import viz
    rows = [{"chapter": "04_x", "run": run, "model": m, "variant": v, "median_s": t, "miou": 0.6}
            for run in ("r1", "r2")
            for m, v, t in (("teacher", "teacher", 0.016), ("resnet18", "distilled", 0.006),
                            ("mobilenet_v3", "distilled", 0.005))]
    texts = [t.get_text() for t in viz.latency_miou_panels(rows).axes[0].texts]
    assert sorted(texts) == sorted(["teacher", "resnet18", "mobilenet_v3"] * 2)


def test_machines_table_puts_the_same_variant_side_by_side():
    from edgelab import records
    rows = [{"chapter": "01", "model": "tiny", "variant": "fused", "median_s": 0.02, "run": "xeon"},
            {"chapter": "01", "model": "tiny", "variant": "fused", "median_s": 0.01, "run": "zen4"},
            {"chapter": "01", "model": "tiny", "variant": "only-here", "median_s": 0.03, "run": "xeon"}]
    table = records.machines_table(rows, {"xeon": {"cpu": "Intel Xeon"}, "zen4": {"cpu": "AMD EPYC"}})
    assert "xeon (Intel Xeon) s" in table and "| 01 | tiny | fused | 0.02 | 0.01 | 2.00x |" in table
    assert "only-here" not in table
    assert records.machines_table(rows, {"xeon": {}}) == ""
    line = records.machines_summary(rows, {"xeon": {"cpu": "Intel Xeon"}, "zen4": {"cpu": "AMD EPYC"}})
    assert "Of 1 variants" in line and "`zen4` on 1" in line and "`xeon` on 0" in line and "01 tiny fused 2.00x" in line


def test_report_of_two_machines_puts_them_side_by_side_in_the_readme(tmp_path):
    from edgelab import records
    for run, cpu, t in (("xeon", "Intel Xeon", 0.02), ("zen4", "AMD EPYC", 0.01)):
        rows = [{"chapter": "01_attention_profiling", "model": "tiny", "variant": "fused", "median_s": t, "miou": 0.7, "weights": "trained"}]
        records.write_records(tmp_path / run / "results", "01_attention_profiling", rows, {"cpu": cpu})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    rep = records.write_report([tmp_path / "xeon", tmp_path / "zen4"], tmp_path / "rep")
    records.update_readme(readme, rep, tmp_path / "rep")
    text = readme.read_text()
    assert "**Across machines.** Of 1 variants" in text and "| 01_attention_profiling | tiny | fused | 0.02 | 0.01 | 2.00x |" in text


def test_progress_widgets_are_dropped_from_executed_notebooks(tmp_path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    rich_pre = '<pre style="white-space:pre;overflow-x:auto">'
    cell.outputs = [nbformat.v4.new_output("display_data", data={runner.WIDGET: {"model_id": "a"}, "text/plain": "0%|"}),
                    nbformat.v4.new_output("display_data", data={"text/html": rich_pre + "</pre>\n", "text/plain": ""}),
                    nbformat.v4.new_output("display_data", data={"text/html": rich_pre + "a table</pre>\n", "text/plain": "a table"}),
                    nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    nb.cells = [cell]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert runner.drop_progress_widgets(path) == 2
    assert [o.output_type for o in nbformat.read(path, as_version=4).cells[0].outputs] == ["display_data", "stream"]


def test_a_file_where_the_run_folder_should_be_is_one_line(tmp_path, capsys):
    from edgelab import cli
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["run", "--only", "00", "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.strip() == f"edgelab: error: {tmp_path / 'taken'} is a file, not a folder"
    assert cli.main(["student", str(tmp_path / "taken")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"
