"""Where the workbook's notebooks are, in chapter order (used by the runner, records and course)."""
from __future__ import annotations

from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in order, or those whose name starts with one of `only`.

    An entry of `only` that is the path of an existing .ipynb file is taken as it is (a notebook
    of your own with a `parameters` cell).
    """
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return found
    picked, missing = [], []
    for o in only:
        if o.endswith(".ipynb") and Path(o).is_file():
            picked.append(Path(o).resolve())
            continue
        hits = [p for p in found if p.stem.startswith(o.removesuffix(".ipynb"))]
        picked += [p for p in hits if p not in picked]
        if not hits:
            missing.append(o)
    if missing:
        raise ValueError(f"no notebook named {', '.join(missing)} in {NOTEBOOKS_DIR}")
    return picked


def output_folder(path: str | Path, what: str, why: str) -> Path:
    """`path` resolved and created for `what` (a run folder, a student build): never inside
    notebooks/ (`why` says what that would spoil), never where a file already stands."""
    out = Path(path).resolve()
    if out == NOTEBOOKS_DIR or NOTEBOOKS_DIR in out.parents:
        raise ValueError(f"{what} must be outside notebooks/: {why}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
