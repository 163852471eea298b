"""`edgelab run`: execute the notebooks with papermill into a run folder, never into notebooks/.

Each notebook's `parameters` cell holds the quick profile; a trailing `# full: VALUE` comment on a
line names that parameter's full-profile value, which `--profile full` injects.
"""
from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path

from . import records

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
_FULL = re.compile(r"^\s*(\w+)\s*=.*#\s*full:\s*(.+?)\s*$")


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in order, or those whose name starts with one of `only`."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return found
    picked = [p for p in found if any(p.stem.startswith(o.removesuffix(".ipynb")) for o in only)]
    missing = [o for o in only if not any(p.stem.startswith(o.removesuffix(".ipynb")) for p in found)]
    if missing:
        raise ValueError(f"no notebook named {', '.join(missing)} in {NOTEBOOKS_DIR}")
    return picked


def parameters_cell(path: Path) -> str:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return "".join(cell["source"])
    raise ValueError(f"{path.name} has no cell tagged 'parameters'")


def profile_params(path: Path, profile: str) -> dict:
    """Parameters for `profile`: {} for quick (the cell's own values), the `# full:` values for full."""
    if profile == "quick":
        return {}
    if profile != "full":
        raise ValueError(f"profile must be quick or full, not {profile!r}")
    out = {}
    for line in parameters_cell(path).splitlines():
        m = _FULL.match(line)
        if m:
            out[m.group(1)] = ast.literal_eval(m.group(2))
    return out


def _coerce(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def run_notebooks(out: str | Path | None = None, profile: str = "quick", only: list[str] | None = None,
                  params: dict | None = None, progress: bool = True) -> dict:
    """Execute notebooks into `out` (default runs/<profile>-<time>); print a line per notebook.

    Every notebook gets `results_dir` = out/results, plus the profile's and the user's parameters.
    Returns a summary: {out, notebooks: [{name, ok, seconds, error}], failed, table}.
    """
    import papermill as pm

    out = Path(out or f"runs/{profile}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if out == NOTEBOOKS_DIR or NOTEBOOKS_DIR in out.parents:
        raise ValueError("the run folder must be outside notebooks/: sources are never written to")
    out.mkdir(parents=True, exist_ok=True)
    user = {k: _coerce(v) if isinstance(v, str) else v for k, v in (params or {}).items()}
    summary = []
    for nb in notebooks(only):
        p = {**profile_params(nb, profile), **user, "results_dir": str(out / "results")}
        t0 = time.time()
        err = None
        try:
            pm.execute_notebook(str(nb), str(out / nb.name), parameters=p, cwd=str(nb.parent),
                                progress_bar=False, kernel_name="python3")
        except Exception as e:  # a failed notebook is reported; the others still run
            err = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        dt = time.time() - t0
        summary.append({"name": nb.stem, "ok": err is None, "seconds": round(dt, 1), "error": err})
        if progress:
            print(f"{'ok  ' if err is None else 'FAIL'} {nb.stem}  {dt:6.1f} s" + (f"  {err}" if err else ""),
                  file=sys.stderr, flush=True)
    rows = records.gather([out / "results"]) if (out / "results").exists() else []
    table = records.markdown_table(rows) if rows else "(no results records)"
    if progress:
        print(table, file=sys.stderr)
    return {"out": str(out), "notebooks": summary, "failed": [s["name"] for s in summary if not s["ok"]],
            "table": table}
