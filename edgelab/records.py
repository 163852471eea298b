"""Results records: the JSON each chapter writes, and the table `edgelab report` makes of them.

Taught in every notebook's last cell. One record per (chapter, variant): model, weights kind,
variant, params, MACs, size on disk, latency median/spread, peak memory, mIoU, machine.
"""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Iterable

COLUMNS = ("chapter", "model", "weights", "variant", "params", "macs", "size_mb", "median_s",
           "iqr_s", "peak_mem_mb", "miou", "miou_box", "of_limit")


def write_records(results_dir: str | Path, chapter: str, rows: Iterable[dict], machine: dict) -> Path:
    """Write `rows` (one dict per variant) as `results_dir/<chapter>.json`; return the path."""
    rows = [dict(r, chapter=chapter) for r in rows]
    for r in rows:
        if r.get("weights") not in ("trained", "random", "checkpoint"):
            raise ValueError(f"record {r.get('variant')!r} needs weights = trained|random|checkpoint")
        if r["weights"] == "random" and r.get("miou") is not None:
            raise ValueError("random weights give no accuracy: drop miou from a random-weights record")
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{chapter}.json"
    path.write_text(json.dumps({"chapter": chapter, "machine": machine, "rows": rows}, indent=1))
    return path


def _run_root(record: Path, top: Path) -> Path:
    """The run a record belongs to: the nearest folder above it with a params.json (a sweep point), else `top`."""
    for d in record.parents:
        if (d / "params.json").exists():
            return d
        if d == top:
            break
    return top


def gather(run_dirs: Iterable[str | Path], machines: dict | None = None) -> list[dict]:
    """Every row of every `*.json` record under the given run folders, in name order.

    Each row gains `run`: the sweep point's folder name (with its parameters under `sweep`), or
    the run folder's name. `machines`, if given, collects {run: machine} from the records.
    """
    rows: list[dict] = []
    for d in map(Path, run_dirs):
        if not d.exists():
            raise FileNotFoundError(f"run folder not found: {d}")
        for p in sorted(d.rglob("*.json")):
            try:
                data = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and "chapter" in data):
                continue
            root = _run_root(p, d)
            params = json.loads((root / "params.json").read_text()) if (root / "params.json").exists() else None
            run = root.name if root == d else f"{d.name}/{root.relative_to(d)}"
            if machines is not None:
                machines.setdefault(run, data.get("machine"))
            rows += [dict(r, run=run, **({"sweep": params} if params else {})) for r in data["rows"]]
    return rows


def failures(run_dirs: Iterable[str | Path]) -> list[dict]:
    """Notebooks that failed, from the `summary.json` that `edgelab run` and `sweep` leave in a run."""
    out = []
    for d in map(Path, run_dirs):
        for p in sorted(d.rglob("summary.json")):
            data = json.loads(p.read_text())
            out += [dict(n, run=str(p.parent)) for n in data.get("notebooks", []) if not n.get("ok")]
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def _columns(rows: list[dict], columns: Iterable[str]) -> list[str]:
    """The columns some row has; `run` only when the rows come from more than one run."""
    several = len({r.get("run") for r in rows}) > 1
    return [c for c in (("run",) if several else ()) + tuple(columns) if any(r.get(c) is not None for r in rows)]


def markdown_table(rows: list[dict], columns: Iterable[str] = COLUMNS) -> str:
    """Rows as a Markdown table, keeping only the columns some row has."""
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(rows: list[dict], columns: Iterable[str] = COLUMNS) -> str:
    """Rows as CSV with every column (and `run`), full precision."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["run", *columns], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def html_table(rows: list[dict], columns: Iterable[str] = COLUMNS) -> str:
    """Rows as an HTML table (same columns and formatting as the Markdown one)."""
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def machines_table(rows: list[dict], machines: dict) -> str:
    """The same variants on each machine side by side (`edgelab report` with runs from several
    CPUs): one row per (chapter, model, variant) that more than one run timed, its median time
    per run, and the slowest over the fastest. Empty when the runs share one machine's name."""
    runs = list(machines)
    if len(runs) < 2:
        return ""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("median_s") is not None:
            times.setdefault((r["chapter"], r.get("model"), r.get("variant")), {})[r["run"]] = r["median_s"]
    heads = [f"{run} ({(machines[run] or {}).get('cpu', '?')})" for run in runs]
    lines = ["| chapter | model | variant | " + " | ".join(f"{h} s" for h in heads) + " | slowest / fastest |",
             "|" + "---|" * (4 + len(runs))]
    for (chapter, model, variant), t in times.items():
        if len(t) < 2:
            continue
        cells = " | ".join(_fmt(t.get(run)) for run in runs)
        lines.append(f"| {chapter} | {model} | {variant} | {cells} | {max(t.values()) / min(t.values()):.2f}x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def machines_summary(rows: list[dict], machines: dict, top: int = 3) -> str:
    """One sentence over the side-by-side table: on how many shared variants each run was the
    faster, the spread of slowest/fastest, and the variants whose order depends most on the CPU.
    Empty when fewer than two runs time a variant in common."""
    runs = list(machines)
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("median_s") is not None:
            times.setdefault((r["chapter"], r.get("model"), r.get("variant")), {})[r["run"]] = r["median_s"]
    shared = {k: t for k, t in times.items() if len(t) >= 2}
    if len(runs) < 2 or not shared:
        return ""
    wins = {run: sum(min(t, key=t.get) == run for t in shared.values()) for run in runs}
    ratios = sorted(((max(t.values()) / min(t.values()), k) for k, t in shared.items()), reverse=True)
    spread = [q for q, _ in ratios]
    wins_txt = ", ".join(f"`{run}` on {n}" for run, n in wins.items())
    big = "; ".join(f"{k[0]} {k[1]} {k[2]} {q:.2f}x" for q, k in ratios[:top])
    return (f"Of {len(shared)} variants timed on more than one machine, the fastest was {wins_txt}; slowest over "
            f"fastest runs from {min(spread):.2f}x to {max(spread):.2f}x (median {spread[len(spread) // 2]:.2f}x). "
            f"Largest gaps: {big}.")


def _machine_line(machine: dict | None) -> str:
    if not machine:
        return "unknown machine"
    keys = ("cpu", "cpu_capability", "threads", "gpu", "torch", "python", "platform")
    return ", ".join(f"{k} {machine[k]}" for k in keys if machine.get(k) is not None) or json.dumps(machine)


def profiles(run_dirs: Iterable[str | Path]) -> list[str]:
    """The profiles (quick, full) that `edgelab run` / `sweep` recorded in the runs' summary.json."""
    found = set()
    for d in map(Path, run_dirs):
        for p in d.rglob("summary.json"):
            found.add(json.loads(p.read_text()).get("profile") or "unknown")
    return sorted(found)


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def missing_chapters(chapters: Iterable[str]) -> list[str]:
    """The workbook's notebooks (by name) that have no results record among `chapters`: what a
    run completed piece by piece (`edgelab run --only ... --out SAME_DIR`) still lacks."""
    from .workbook import notebooks
    have = set(chapters)
    return [nb.stem for nb in notebooks() if nb.stem not in have]


def update_readme(readme: str | Path, report: dict, out_dir: str | Path) -> None:
    """Replace the README's results section (between its two markers) with `report`'s table and plot."""
    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} section to fill")
    try:
        rel = Path(out_dir).resolve().relative_to(readme.resolve().parent)
    except ValueError:
        raise ValueError(f"the report folder {out_dir} must lie inside {readme.resolve().parent} "
                         "for the README to link its plot") from None
    machines = "; ".join(sorted({_machine_line(m) for m in report["machines"].values()}))
    failed = ", ".join(f["name"] for f in report["failures"]) or "none"
    chapters = sorted({r["chapter"] for r in report["rows"]})
    absent = missing_chapters(chapters)
    body = (f"{README_BEGIN}\n_Regenerated by `edgelab report {' '.join(report['run_dirs'])} --out {rel} "
            f"--readme {readme.name}`: profile {', '.join(report['profiles']) or 'unknown'}; "
            f"{len(chapters)} chapters, {len(report['rows'])} rows; failed notebooks: {failed}; "
            f"chapters not in this run: {', '.join(absent) or 'none'}. "
            f"Machine: {machines}. Random-weights rows are timing only._\n\n"
            f"![latency vs mIoU per chapter]({rel}/latency_miou.png)\n\n"
            f"<details><summary>The results table ({len(report['rows'])} rows; also "
            f"[CSV]({rel}/report.csv), [HTML]({rel}/report.html))</summary>\n\n"
            f"{markdown_table(report['rows'])}\n\n</details>\n{_side_by_side(report)}{README_END}")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + body + text[end:])


def _side_by_side(report: dict) -> str:
    """The README's machines comparison: the summary sentence and the side-by-side table, folded."""
    side = report.get("side") or ""
    if not side:
        return ""
    rows = side.count("\n") - 1
    return (f"\n**Across machines.** {report.get('side_summary', '')}\n\n<details><summary>The same variants on each "
            f"machine side by side ({rows} rows, median seconds)</summary>\n\n{side}\n\n</details>\n")


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """`edgelab report`: report.md, report.csv, report.html and latency_miou.png in `out_dir`.

    Returns {rows, failures, machines, profiles, run_dirs, files, markdown, side, side_summary}. The Markdown names
    the machine of every run and the notebooks that failed; the plot has one panel per chapter
    (each chapter times its own thing).
    """
    from . import viz
    machines: dict = {}
    rows = gather(run_dirs, machines)
    if not rows:
        raise ValueError(f"no results records under {', '.join(map(str, run_dirs))}")
    failed = failures(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = viz.latency_miou_panels(rows)
    fig.savefig(out / "latency_miou.png", bbox_inches="tight")
    machine_md = "\n".join(f"- `{run}`: {_machine_line(m)}" for run, m in machines.items())
    fail_md = "\n".join(f"- `{f['run']}` {f['name']}: {f.get('error')}" for f in failed) or "- none"
    side = machines_table(rows, machines)
    summary = machines_summary(rows, machines) if side else ""
    side_md = f"\n\nThe same variants across machines (median seconds). {summary}\n\n{side}" if side else ""
    md = (f"{markdown_table(rows)}\n\nMachines:\n{machine_md}{side_md}\n\nFailed notebooks:\n{fail_md}\n\n"
          "![latency vs mIoU](latency_miou.png)\n")
    (out / "report.md").write_text(md)
    (out / "report.csv").write_text(csv_table(rows))
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>edgelab report</title>\n"
        f"<style>td,th{{padding:2px 8px;font:13px sans-serif}}tr:nth-child(even){{background:#f3f3f3}}</style>\n"
        f"{html_table(rows)}\n<h3>Machines</h3><ul>"
        + "".join(f"<li>{html.escape(run)}: {html.escape(_machine_line(m))}</li>" for run, m in machines.items())
        + "</ul><h3>Failed notebooks</h3><ul>"
        + ("".join(f"<li>{html.escape(f['run'])} {html.escape(f['name'])}: {html.escape(str(f.get('error')))}</li>"
                   for f in failed) or "<li>none</li>")
        + "</ul>\n<img src='latency_miou.png' alt='latency vs mIoU'>\n")
    import matplotlib.pyplot as plt
    plt.close(fig)
    files = [str(out / n) for n in ("report.md", "report.csv", "report.html", "latency_miou.png")]
    return {"rows": rows, "failures": failed, "machines": machines, "profiles": profiles(run_dirs),
            "run_dirs": [str(d) for d in run_dirs], "files": files, "markdown": md, "side": side,
            "side_summary": summary}
