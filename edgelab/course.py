"""Course labs: the student build (`edgelab student`), its proof, and grading (README, "Instructors").

An exercise is a code cell whose first line is `# EXERCISE: name`. The functions it defines are
the student's to write; the `check_*` call after them (in the same cell or the next code cell) is
its check from `edgelab.checks`. The student build keeps every cell, clears every output and
replaces each exercise function's body with a stub that raises `NotImplementedError`, so the
check stops the notebook with its hint until the student's code is right. Cells tagged
`instructor` (the key to each chapter's written questions) are left out of the student build.

An exercise runs on its own (for the proof and for grading): the imports of the cells before it,
the functions of the earlier exercises, then the exercise cell and its check. So an exercise may
use what the notebook imported and what earlier exercises defined, nothing else.
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .checks import ExerciseError
from .workbook import notebooks, output_folder

INSTRUCTOR = "instructor"  # cell tag: the answers to the written questions, left out of the student build
MARKER = re.compile(r"^#\s*EXERCISE:\s*(\w+)\s*$")
STUB = ("# YOUR CODE HERE: write this function, then run the cell; the check says what is still wrong.",
        "raise NotImplementedError")
BANNER = ("**Student version.** This notebook has {n} exercises ({names}). Each is a code cell that "
          "starts with `# EXERCISE:`; its functions raise `NotImplementedError` until you write them. "
          "Run the cell: the check after your code raises `ExerciseError` with a hint until your "
          "answer is right. Run the notebook from the top, exercise by exercise.")


@dataclass
class Exercise:
    """One exercise of one notebook: where its cell and its check are, which functions it asks for."""
    notebook: str
    name: str
    cell: int
    check_cell: int
    functions: list[str]


def _python(source: str) -> str:
    """A cell's source as plain Python (IPython magics turned into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager
    return TransformerManager().transform_cell(source)


def _has_check(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name.startswith("check_"):
                return True
    return False


def _next_code_cell(nb, i: int) -> int | None:
    return next((j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"), None)


def exercises(nb: nbformat.NotebookNode, stem: str) -> list[Exercise]:
    """The exercises of a notebook, in order; a marked cell without a function or a check is an error."""
    found = []
    for i, cell in enumerate(nb.cells):
        lines = cell.source.strip().splitlines()
        m = MARKER.match(lines[0]) if cell.cell_type == "code" and lines else None
        if not m:
            continue
        tree = ast.parse(_python(cell.source))
        funcs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        if not funcs:
            raise ValueError(f"{stem}: exercise {m[1]!r} defines no function for the student to write")
        check = i if _has_check(tree) else _next_code_cell(nb, i)
        if check is None or not _has_check(ast.parse(_python(nb.cells[check].source))):
            raise ValueError(f"{stem}: exercise {m[1]!r} has no check_* call in its cell or the next one")
        found.append(Exercise(stem, m[1], i, check, funcs))
    return found


def stub_source(source: str) -> str:
    """The exercise cell with each top-level function's body (after its docstring) replaced by a stub."""
    tree = ast.parse(_python(source))
    lines = source.splitlines()
    for fn in reversed([n for n in tree.body if isinstance(n, ast.FunctionDef)]):
        body = fn.body
        doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str)
        if body[0].lineno == fn.lineno:
            raise ValueError(f"function {fn.name!r}: put its body on the lines after the `def`")
        start = body[0].end_lineno if doc else body[0].lineno - 1
        indent = " " * body[0].col_offset
        lines[start:fn.end_lineno] = [indent + s for s in STUB]
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def student_notebook(path: str | Path) -> tuple[nbformat.NotebookNode, list[Exercise]]:
    """Notebook `path` as handed to students: outputs cleared, solutions stubbed, checks kept."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if INSTRUCTOR not in c.metadata.get("tags", [])]  # the key stays home
    found = exercises(nb, path.stem)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    for ex in found:
        cell = nb.cells[ex.cell]
        cell.source = stub_source(cell.source)
        cell.metadata["tags"] = sorted(set(cell.metadata.get("tags", [])) | {"exercise"})
    if found:
        names = ", ".join(f"`{e.name}`" for e in found)
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(BANNER.format(n=len(found), names=names)))
        for ex in found:
            ex.cell, ex.check_cell = ex.cell + 1, ex.check_cell + 1
    nb.metadata.pop("papermill", None)
    return nb, found


def build_student(out_dir: str | Path, only: list[str] | None = None) -> list[tuple[Path, list[Exercise]]]:
    """Write the student notebooks into `out_dir` (never into notebooks/); return (path, exercises) each."""
    out = output_folder(out_dir, "the student build", "the sources keep their solutions")
    written = []
    for src in notebooks(only):
        nb, found = student_notebook(src)
        dest = out / src.name
        nbformat.write(nb, dest)
        written.append((dest, found))
    return written


def _context(nb, ex: Exercise, found: list[Exercise]) -> str:
    """What an exercise may use: the earlier cells' imports and the earlier exercises' functions."""
    earlier = {e.cell for e in found if e.cell < ex.cell}
    parts = []
    for i, cell in enumerate(nb.cells[:ex.cell]):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(_python(cell.source))
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                or (i in earlier and isinstance(n, ast.FunctionDef))]
        parts.append(ast.unparse(ast.Module(body=keep, type_ignores=[])))
    return "\n".join(parts)


def run_exercise(nb, ex: Exercise, found: list[Exercise]) -> str | None:
    """Run one exercise on its own; None when its check passes, else the first lines of what it raised."""
    cells = [ex.cell] if ex.check_cell == ex.cell else [ex.cell, ex.check_cell]
    code = _context(nb, ex, found) + "\n" + "\n".join(_python(nb.cells[i].source) for i in cells)
    namespace = {"__name__": "__exercise__"}
    try:
        import matplotlib
        matplotlib.use("Agg")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, f"<{ex.notebook}: {ex.name}>", "exec"), namespace)
    except ExerciseError as e:
        return str(e)
    except Exception as e:  # the cell itself crashed (a typo, a name it may not use): a failed exercise
        return f"[{ex.name}] the cell raised {type(e).__name__}: {e}"
    finally:
        import matplotlib.pyplot as plt
        plt.close("all")
    return None


def prove_exercise(src: Path, index: int) -> dict:
    """Exercise number `index` of notebook `src`: what its check says on the stub and on the solution.

    Returns notebook, exercise, stub (the check's message on the stub), stub_ok (an ExerciseError
    that says "not implemented" and gives a hint), solution_ok, solution_error, seconds.
    """
    t0 = time.perf_counter()
    solution = nbformat.read(src, as_version=4)
    sol_found = exercises(solution, src.stem)
    student, stu_found = student_notebook(src)
    said = run_exercise(student, stu_found[index], stu_found)
    failed = run_exercise(solution, sol_found[index], sol_found)
    return {"notebook": src.stem, "exercise": sol_found[index].name, "stub": said,
            "stub_ok": bool(said) and "not implemented" in said and "\nHint: " in said,
            "solution_ok": failed is None, "solution_error": failed,
            "seconds": round(time.perf_counter() - t0, 2)}


def prove(only: list[str] | None = None, progress: bool = True) -> list[dict]:
    """`edgelab student --prove`: `prove_exercise` for every exercise of every notebook."""
    rows = []
    for src in notebooks(only):
        for i in range(len(exercises(nbformat.read(src, as_version=4), src.stem))):
            row = prove_exercise(src, i)
            rows.append(row)
            ok = row["stub_ok"] and row["solution_ok"]
            if progress:
                print(f"{'ok  ' if ok else 'FAIL'} {src.stem} / {row['exercise']}  {row['seconds']:.2f} s"
                      + ("" if ok else f"  stub: {row['stub']!r}  solution: {row['solution_error']!r}"),
                      file=sys.stderr, flush=True)
    return rows


def grade(submissions: list[str | Path]) -> list[dict]:
    """Run every exercise of every submitted notebook on its own; one row per (file, exercise).

    A submission is a notebook or a folder of them (searched recursively, one folder per student).
    Each row: submission (the file), notebook, exercise, passed, message (the check's first line).
    Runs the students' code in this process: grade in a throwaway environment.
    """
    files: list[Path] = []
    for s in map(Path, submissions):
        if not s.exists():
            raise FileNotFoundError(f"submission not found: {s}")
        files += sorted(s.rglob("*.ipynb")) if s.is_dir() else [s]
    files = [f for f in files if ".ipynb_checkpoints" not in f.parts]
    if not files:
        raise ValueError(f"no notebooks under {', '.join(map(str, submissions))}")
    rows = []
    for f in files:
        try:
            nb = nbformat.read(f, as_version=4)
            found = exercises(nb, f.stem)
        except Exception as e:  # a broken or foreign file is a row of its own, not a crash
            rows.append({"submission": str(f), "notebook": f.stem, "exercise": None, "passed": False,
                         "message": f"cannot read the notebook: {type(e).__name__}: {e}"})
            continue
        for ex in found:
            said = run_exercise(nb, ex, found)
            rows.append({"submission": str(f), "notebook": f.stem, "exercise": ex.name,
                         "passed": said is None, "message": (said or "").splitlines()[0] if said else ""})
    return rows
