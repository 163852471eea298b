"""The package's layering (the guide's design) and its pointers into the notebooks.

- the core imports no chapter module; a chapter module imports only the core, except `deploy`
  (chapter 05), which stacks chapters 01-04 and `edge`, and `everything` (chapter 05), which
  decodes with chapter 01's prompt batching and runs on its own chapter's export and edge runtimes
  (`deploy`, `edge`); the CLI (and `__main__`, which runs it) is the one layer above them all;
- `checks` (the exercises' checks) may import chapter modules, to compare an answer with the
  chapter's own implementation; no chapter imports it;
- no import cycle, counting imports inside functions;
- every notebook section or exercise a docstring cites exists in that notebook.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path


from edgelab import workbook

PKG = Path(__file__).resolve().parent.parent / "edgelab"
CHAPTERS = {"attention": "01", "pruning": "02", "quantization": "03", "distillation": "04",
            "deploy": "05", "edge": "05", "everything": "05"}
COURSE = {"checks"}  # exercise checks: compare answers with the chapters' own code
TOP = {"cli", "__main__"}  # the CLI parses arguments and calls every chapter (`python -m edgelab` runs it): nothing else imports it
MAY_IMPORT_CHAPTERS = {"deploy": {"attention", "pruning", "quantization", "distillation", "edge"},
                       # segment everything decodes with chapter 01's prompt batching, and runs on chapter 05's
                       # own export (deploy) and edge runtimes (edge)
                       "everything": {"attention", "deploy", "edge"}}


def modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def imports_of(name: str) -> set[str]:
    """edgelab modules that module `name` imports anywhere in its file (top level or in functions)."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "edgelab":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("edgelab."))
    return found & set(modules())


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the rules, as 'a -> b (why)'."""
    problems = []
    for mod, deps in graph.items():
        for dep in sorted(deps):
            if mod in TOP:
                continue
            elif dep in TOP:
                problems.append(f"{mod} -> {dep} (nothing imports the CLI)")
            elif mod in CHAPTERS and dep in COURSE:
                problems.append(f"{mod} -> {dep} (no chapter imports the exercise checks)")
            elif mod not in CHAPTERS and dep in CHAPTERS and mod not in COURSE:
                problems.append(f"{mod} -> {dep} (the core imports no chapter)")
            elif mod in CHAPTERS and dep in CHAPTERS and dep not in MAY_IMPORT_CHAPTERS.get(mod, set()):
                problems.append(f"{mod} -> {dep} (a chapter imports only the core)")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (each once, as a path that returns to its start)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_package_layering_and_no_cycles():
    graph = {m: imports_of(m) - {m} for m in modules()}
    assert layering_problems(graph) == []
    assert cycles(graph) == []


def test_the_rules_catch_what_they_forbid():
    assert layering_problems({"bench": {"attention"}}) == ["bench -> attention (the core imports no chapter)"]
    assert layering_problems({"quantization": {"attention"}}) == [
        "quantization -> attention (a chapter imports only the core)"]
    assert layering_problems({"deploy": {"attention", "models"}, "cli": {"deploy"}}) == []
    assert [set(c) for c in cycles({"runner": {"records"}, "records": {"runner"}})] == [{"runner", "records"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_inside_functions_too():
    assert "workbook" in imports_of("records")  # a function-local import


# --- pointers from docstrings into the notebooks ------------------------------------------------

CITE = re.compile(r'(?:(?P<nb>[Nn]otebook (?P<num>\d\d)),? )?(?P<kind>[Ss]ections?|exercise)? ?"(?P<title>[^"\n]+)"')


def citations(name: str) -> list[tuple[str, str, str]]:
    """(notebook number, 'section' or 'exercise', title) of every pointer in module `name`'s docstrings."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            for m in CITE.finditer(doc):
                if not (m["nb"] or m["kind"]):
                    continue  # a quoted word, not a pointer
                if m["kind"] is None and m["nb"] is None:
                    continue
                num = m["num"] or CHAPTERS.get(name)
                if num is None:
                    continue
                out.append((num, "exercise" if m["kind"] == "exercise" else "section", m["title"]))
            if name in CHAPTERS:
                out += [(CHAPTERS[name], "section", title) for title in listed_sections(doc)]
    return out


def listed_sections(doc: str) -> list[str]:
    """Titles of a docstring's section list: the `- "Title": ...` items under a line that names
    sections and ends with a colon (a chapter module's map of its notebook)."""
    titles, in_list = [], False
    for line in doc.splitlines():
        text = line.strip()
        if re.search(r"sections?\b", text, re.I) and text.endswith(":"):
            in_list = True
        elif not text:
            in_list = False
        elif in_list and (m := re.match(r'- "([^"]+)"', text)):
            titles.append(m[1])
    return titles


def headings(num: str) -> list[str]:
    nb = json.loads(workbook.notebooks([num])[0].read_text())
    lines = [line for c in nb["cells"] if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()]
    return [line.lstrip("#").strip() for line in lines if line.startswith("#")]


def test_every_cited_section_is_a_heading_of_its_notebook():
    missing = []
    for mod in modules():
        for num, kind, title in citations(mod):
            if kind == "exercise":  # a heading "Exercise N: <title>" or "Exercise N (design): <title>", in any case
                if not any(re.fullmatch(rf"Exercise \d+(?: \([^)]*\))?: {re.escape(title)}", h, re.I) for h in headings(num)):
                    missing.append(f"{mod}: notebook {num} has no exercise {title!r}")
            elif not any(title in h for h in headings(num)):
                missing.append(f"{mod}: notebook {num} has no heading {title!r}")
    assert missing == []


def test_citations_are_found():
    cited = [c for m in modules() for c in citations(m)]
    assert len(cited) >= 40
    assert ("01", "section", "Attention by hand") in cited
    assert ("03", "section", "What rounding costs") in cited  # from quantization's section list


def test_a_section_list_is_read_item_by_item():
    doc = 'Sections of the notebook and the functions that go with them:\n  - "One": f;\n    g;\n  - "Two": h.\n\n  - "Not listed": x'
    assert listed_sections(doc) == ["One", "Two"]
