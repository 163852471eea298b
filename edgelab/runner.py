"""`edgelab run` and `edgelab sweep`: execute notebooks with papermill into run folders, never into notebooks/.

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
from .workbook import NOTEBOOKS_DIR, notebooks, output_folder  # noqa: F401  (runner.notebooks is public)

_FULL = re.compile(r"^\s*(\w+)\s*=.*#\s*full:\s*(.+?)\s*$")


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


def parameter_names(path: Path) -> list[str]:
    """The names the parameters cell assigns (what `-p NAME VALUE` may set)."""
    tree = ast.parse(parameters_cell(path))
    return [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]


def _check_names(nbs: list[Path], names) -> None:
    known = {n for nb in nbs for n in parameter_names(nb)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no parameter {', '.join(unknown)} in {', '.join(nb.stem for nb in nbs)} "
                         f"(parameters: {', '.join(sorted(known))})")


def parameter_defaults(path: Path) -> dict:
    """The literal value the parameters cell gives each name (names given by an expression are left out)."""
    out = {}
    for node in ast.parse(parameters_cell(path)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _fits(value, default) -> bool:
    """Whether `value` can stand where the parameters cell has `default`: None takes anything,
    a flag takes True/False or 1/0, a number an int or float, a list a list or tuple."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if isinstance(value, bool):
        return False
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _check_kinds(nbs: list[Path], params: dict[str, list]) -> None:
    """One clear line for `-p n_eval abc` before a notebook starts, rather than a TypeError inside it."""
    for nb in nbs:
        defaults = parameter_defaults(nb)
        for name, values in params.items():
            for value in values:
                if name in defaults and not _fits(value, defaults[name]):
                    default = defaults[name]
                    kind = ("a number" if isinstance(default, float) else
                            f'a list, such as -p {name} "{default!r}"' if isinstance(default, list) else
                            type(default).__name__)
                    raise ValueError(f"-p {name} {value!r}: {nb.stem} takes {kind} there (its default is {default!r})")


def _coerce(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _out_dir(out: str | Path | None, default: str) -> Path:
    return output_folder(out or default, "the run folder", "sources are never written to")


class PeakMemory:
    """Peak of the summed resident memory of this process's children (the kernel and whatever it
    starts), sampled every `interval` seconds in a thread: what a memory limit such as Binder's
    2 GB sees of a notebook."""

    def __init__(self, interval: float = 0.5):
        import threading
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


WIDGET = "application/vnd.jupyter.widget-view+json"


def _is_progress(output: dict) -> bool:
    """A widget (tqdm's bar) or an empty rich live display (NNCF's progress, cleared when done)."""
    data = output.get("data", {})
    if WIDGET in data:
        return True
    html, text = "".join(data.get("text/html", "")), "".join(data.get("text/plain", ""))
    return output.get("output_type") == "display_data" and not text.strip() and html.startswith("<pre") \
        and html.rstrip().endswith("></pre>")


def drop_progress_widgets(path: Path) -> int:
    """Remove progress outputs (tqdm's widgets, rich's emptied live displays) from an executed
    notebook: saved, they show a frozen bar or blank lines. Returns how many were removed."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = [o for o in cell.outputs if not _is_progress(o)]
        n += len(cell.outputs) - len(kept)
        cell.outputs = kept
    nb.metadata.pop("widgets", None)
    if n:
        nbformat.write(nb, path)
    return n


def execute(nb: Path, out_nb: Path, params: dict) -> tuple[str | None, float]:
    """Run one notebook with papermill into `out_nb`: (None or the error's last line, peak memory MB)."""
    import papermill as pm
    with PeakMemory() as mem:
        try:
            pm.execute_notebook(str(nb), str(out_nb), parameters=params, cwd=str(nb.parent),
                                progress_bar=False, kernel_name="python3", language="python")
        except Exception as e:  # a failed notebook is reported; the others still run
            text = str(e).strip()
            return (text.splitlines()[-1][:300] if text else type(e).__name__), round(mem.peak_mb)
    drop_progress_widgets(out_nb)
    return None, round(mem.peak_mb)


def _say(line: str, progress: bool) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def _finish(out: Path, summary: list[dict], progress: bool, extra: dict | None = None) -> dict:
    """Write summary.json, print the failures and the results table; the run's summary dict.

    Rerunning some notebooks into an existing run folder keeps the earlier entries of the others
    (a long full-profile run can be completed piece by piece).
    """
    failed = [s for s in summary if not s["ok"]]
    path = out / "summary.json"
    earlier = json.loads(path.read_text()).get("notebooks", []) if path.exists() else []
    names = {s["name"] for s in summary}
    kept = [s for s in earlier if s.get("name") not in names]
    path.write_text(json.dumps({"notebooks": kept + summary, **(extra or {})}, indent=1))
    rows = records.gather([out]) if any(out.rglob("results/*.json")) else []
    table = records.markdown_table(rows) if rows else "(no results records)"
    _say(table, progress)
    _say(f"{len(summary) - len(failed)} of {len(summary)} succeeded"
         + "".join(f"\nFAILED {s['name']}: {s['error']}  (see {s['notebook']})" for s in failed), progress)
    return {"out": str(out), "notebooks": summary, "failed": [s["name"] for s in failed], "table": table}


def run_notebooks(out: str | Path | None = None, profile: str = "quick", only: list[str] | None = None,
                  params: dict | None = None, progress: bool = True) -> dict:
    """Execute notebooks into `out` (default runs/<profile>-<time>); print a line per notebook.

    Every notebook gets `results_dir` = out/results, plus the profile's and the user's parameters.
    Returns a summary: {out, notebooks: [{name, ok, seconds, peak_mem_mb, error, notebook}], failed,
    table}; peak_mem_mb is the kernel's peak resident memory (with what it starts), sampled.
    """
    nbs = notebooks(only)
    user = {k: _coerce(v) if isinstance(v, str) else v for k, v in (params or {}).items()}
    _check_names(nbs, user)
    _check_kinds(nbs, {k: [v] for k, v in user.items()})
    out = _out_dir(out, f"runs/{profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = []
    for i, nb in enumerate(nbs, 1):
        known = parameter_names(nb)
        p = {**profile_params(nb, profile), **{k: v for k, v in user.items() if k in known},
             "results_dir": str(out / "results")}
        _say(f"[{i}/{len(nbs)}] {nb.stem} ...", progress)
        t0 = time.time()
        try:
            err, peak = execute(nb, out / nb.name, p)
        except KeyboardInterrupt:  # Ctrl-C: keep what finished; `--only` the rest into the same folder later
            _say(f"stopped during {nb.stem}: the {len(summary)} notebook(s) finished before it are kept in {out}",
                 progress)
            _finish(out, summary, progress, {"profile": profile, "params": user, "stopped": nb.stem})
            raise
        dt = time.time() - t0
        summary.append({"name": nb.stem, "ok": err is None, "seconds": round(dt, 1), "peak_mem_mb": peak,
                        "error": err, "notebook": str(out / nb.name)})
        _say(f"{'ok  ' if err is None else 'FAIL'} {nb.stem}  {dt:6.1f} s  peak {peak} MB"
             + (f"  {err}" if err else ""), progress)
    return _finish(out, summary, progress, {"profile": profile, "params": user})


def _label(point: dict) -> str:
    """A sweep point's folder name: name=value pairs, safe for a file system."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", text.replace(" ", ""))[:120] or "point"


def _sweep_point(nb: str, point_dir: str, params: dict, threads: int) -> tuple[str | None, float, float]:
    """One sweep point in its own process (its kernel gets `threads` threads): error, seconds, peak MB."""
    import os
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    err, peak = execute(Path(nb), Path(point_dir) / Path(nb).name, params)
    return err, time.time() - t0, peak


def sweep(notebook: str, grid: dict[str, list], jobs: int = 1, out: str | Path | None = None,
          profile: str = "quick", progress: bool = True) -> dict:
    """`edgelab sweep`: one notebook over the product of the `grid` values, `jobs` points at a time.

    Each point runs in its own process into out/<name=value,...>/ (its notebook, results/ and
    params.json); a failing point is reported and the others still finish. Each kernel gets
    cores // jobs threads, so the points don't fight over cores (timings in a parallel sweep
    still share the machine: compare latencies within a point, not across points).
    """
    import itertools
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    found = notebooks([notebook])
    if len(found) != 1:
        raise ValueError(f"{notebook!r} names several notebooks: give one")
    nb = found[0]
    if not grid or any(not v for v in grid.values()):
        raise ValueError("a sweep needs at least one -p NAME V1 [V2 ...] with values")
    if jobs < 1:
        raise ValueError("--jobs must be at least 1")
    _check_names([nb], grid)
    values = {k: [_coerce(v) if isinstance(v, str) else v for v in vs] for k, vs in grid.items()}
    _check_kinds([nb], values)
    points = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    out = _out_dir(out, f"runs/sweep-{nb.stem[:2]}-{time.strftime('%Y%m%d-%H%M%S')}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    _say(f"sweep {nb.stem}: {len(points)} points, {jobs} at a time, {threads} thread(s) each -> {out}", progress)
    summary = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {}
        for point in points:
            point_dir = out / _label(point)
            point_dir.mkdir(parents=True, exist_ok=True)
            (point_dir / "params.json").write_text(json.dumps(point))
            params = {**profile_params(nb, profile), **point, "results_dir": str(point_dir / "results")}
            futures[pool.submit(_sweep_point, str(nb), str(point_dir), params, threads)] = (point, point_dir)
        for done, fut in enumerate(as_completed(futures), 1):
            point, point_dir = futures[fut]
            try:
                err, dt, peak = fut.result()
            except Exception as e:  # the worker process itself died
                err, dt, peak = f"{type(e).__name__}: {e}", float("nan"), None
            summary.append({"name": point_dir.name, "params": point, "ok": err is None, "seconds": round(dt, 1),
                            "peak_mem_mb": peak, "error": err, "notebook": str(point_dir / nb.name)})
            _say(f"[{done}/{len(points)}] {'ok  ' if err is None else 'FAIL'} {point_dir.name}  {dt:6.1f} s"
                 + (f"  {err}" if err else ""), progress)
    summary.sort(key=lambda s: s["name"])
    return _finish(out, summary, progress, {"notebook": nb.stem, "profile": profile, "grid": values,
                                            "jobs": jobs, "threads": threads})
