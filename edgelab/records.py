"""Results records: the JSON each chapter writes, and the table `edgelab report` makes of them.

Taught in every notebook's last cell. One record per (chapter, variant): model, weights kind,
variant, params, MACs, size on disk, latency median/spread, peak memory, mIoU, machine.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

COLUMNS = ("chapter", "model", "weights", "variant", "params", "macs", "size_mb", "median_s",
           "iqr_s", "peak_mem_mb", "miou", "miou_box")


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


def gather(run_dirs: Iterable[str | Path]) -> list[dict]:
    """Every row of every `*.json` record under the given run folders, in name order."""
    rows: list[dict] = []
    for d in run_dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"run folder not found: {d}")
        for p in sorted(d.rglob("*.json")):
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and isinstance(data.get("rows"), list) and "chapter" in data:
                rows += data["rows"]
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def markdown_table(rows: list[dict], columns: Iterable[str] = COLUMNS) -> str:
    """Rows as a Markdown table, keeping only the columns some row has."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def csv_table(rows: list[dict], columns: Iterable[str] = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
