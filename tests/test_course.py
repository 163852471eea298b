"""Course labs: the student build stubs every solution and keeps its check; each check fails on its
stub with a hint and passes on the solution; grading runs submitted exercises."""
import hashlib
import json

import nbformat
import pytest

from edgelab import cli, course, runner

EXERCISES = [(nb, i, e.name) for nb in runner.notebooks()
             for i, e in enumerate(course.exercises(nbformat.read(nb, as_version=4), nb.stem))]


def _digest() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in runner.notebooks()}


def test_every_chapter_has_three_or_more_exercises_and_the_tour_two():
    per_chapter = {nb.stem: 0 for nb in runner.notebooks()}
    for nb, _, _ in EXERCISES:
        per_chapter[nb.stem] += 1
    assert all(n >= (2 if stem.startswith("00") else 3) for stem, n in per_chapter.items()), per_chapter


def test_every_chapter_has_written_questions_whose_key_stays_out_of_the_student_build(tmp_path):
    course.build_student(tmp_path)
    for src in runner.notebooks():
        nb = nbformat.read(src, as_version=4)
        keys = [c for c in nb.cells if course.INSTRUCTOR in c.metadata.get("tags", [])]
        assert keys and any("Questions" in c.source for c in nb.cells if c.cell_type == "markdown"), src.stem
        student = nbformat.read(tmp_path / src.name, as_version=4)
        assert not any(course.INSTRUCTOR in c.metadata.get("tags", []) for c in student.cells)
        assert not any(k.source in c.source for k in keys for c in student.cells), src.stem


def test_hints_rise_in_tiers_with_each_failure():
    from edgelab import checks
    hint = ("the concept", "the API", "the code")
    seen = []
    for _ in range(4):
        with pytest.raises(checks.ExerciseError) as err:
            checks.fail("tiers test", "wrong", hint)
        seen.append(str(err.value).split("Hint: ")[1])
    assert seen[0].startswith("the concept") and "hint 1 of 3" in seen[0]
    assert seen[1].startswith("the API") and seen[2] == seen[3] == "the code"
    assert checks.tiered("one hint", 5) == "one hint"


@pytest.mark.parametrize("nb, index, name", EXERCISES, ids=[f"{nb.stem[:2]}-{n}" for nb, _, n in EXERCISES])
def test_check_fails_on_the_stub_with_a_hint_and_passes_on_the_solution(nb, index, name):
    row = course.prove_exercise(nb, index)
    assert row["exercise"] == name
    assert row["stub_ok"], f"on the stub the check said: {row['stub']!r}"
    assert row["solution_ok"], f"on the solution the check said: {row['solution_error']!r}"


def test_student_build_stubs_solutions_clears_outputs_keeps_checks(tmp_path, capsys):
    before = _digest()
    assert cli.main(["student", str(tmp_path / "handout"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["notebooks"]
    assert [len(n["exercises"]) for n in listed] == [sum(1 for e in EXERCISES if e[0].stem == p.stem)
                                                     for p in runner.notebooks()]
    assert _digest() == before, "the student build wrote into notebooks/"
    for src in runner.notebooks():
        solution = nbformat.read(src, as_version=4)
        student = nbformat.read(tmp_path / "handout" / src.name, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in student.cells if c.cell_type == "code")
        assert any("parameters" in c.metadata.get("tags", []) for c in student.cells)
        for sol, stu in zip(course.exercises(solution, src.stem), course.exercises(student, src.stem)):
            stub = student.cells[stu.cell].source
            assert stub.count("raise NotImplementedError") == len(sol.functions)
            assert "exercise" in student.cells[stu.cell].metadata["tags"]
            body = solution.cells[sol.cell].source.split(f"def {sol.functions[-1]}", 1)[1].splitlines()[1]
            assert body.strip() not in stub, f"{src.stem}/{sol.name}: a solution line survived"
            assert student.cells[stu.check_cell].source.count("check_") == \
                solution.cells[sol.check_cell].source.count("check_")


def test_student_notebook_stops_at_its_first_exercise_with_the_hint(tmp_path):
    import papermill as pm
    course.build_student(tmp_path, only=["02"])
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(tmp_path / "02_channel_pruning.ipynb"), str(tmp_path / "out.ipynb"),
                            cwd=str(runner.NOTEBOOKS_DIR), progress_bar=False, kernel_name="python3",
                            parameters={"results_dir": str(tmp_path / "results")})
    assert err.value.ename == "ExerciseError"
    assert "not implemented" in err.value.evalue and "Hint:" in err.value.evalue


def test_student_build_inside_notebooks_is_refused():
    with pytest.raises(ValueError, match="outside notebooks"):
        course.build_student(runner.NOTEBOOKS_DIR / "student")


def test_stub_keeps_the_signature_and_docstring():
    src = '# EXERCISE: demo\ndef f(x: int) -> int:\n    """Twice x."""\n    y = 2 * x\n    return y\n\ncheck_f(f)\n'
    out = course.stub_source(src)
    assert 'def f(x: int) -> int:\n    """Twice x."""\n    # YOUR CODE HERE' in out
    assert "y = 2 * x" not in out and out.endswith("check_f(f)\n")
    with pytest.raises(ValueError, match="lines after"):
        course.stub_source("def f(x): return x\n")


def test_grade_passes_solutions_fails_stubs_and_reports_broken_files(tmp_path, capsys):
    course.build_student(tmp_path / "alice", only=["00"])
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "00_segment_anything_tour.ipynb").write_bytes(runner.notebooks(["00"])[0].read_bytes())
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / "00_segment_anything_tour.ipynb").write_text("{not json")
    rows = course.grade([tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"])
    by = {(r["submission"].split("/")[-2], r["exercise"]): r for r in rows}
    assert by[("alice", "iou")]["passed"] is False and "not implemented" in by[("alice", "iou")]["message"]
    assert by[("bob", "iou")]["passed"] and by[("bob", "point_prompt")]["passed"]
    assert by[("carol", None)]["passed"] is False and "cannot read" in by[("carol", None)]["message"]
    assert cli.main(["grade", str(tmp_path / "bob"), "--csv", str(tmp_path / "g.csv")]) == 0
    assert "| submission |" in capsys.readouterr().out
    assert (tmp_path / "g.csv").read_text().startswith("submission,notebook,exercise,passed")
    assert cli.main(["grade", str(tmp_path / "nobody")]) == 2
