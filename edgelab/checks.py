"""Exercise checks: each raises `ExerciseError` with a hint when an answer is wrong.

Used by the exercise cells of every notebook (the student build keeps these calls and replaces
the solutions with stubs). A check never prints "failed": it raises, so a wrong answer stops
the notebook, nbval and papermill alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class ExerciseError(AssertionError):
    """A wrong exercise answer; the message says what is wrong and hints at the fix."""


def _fail(exercise: str, problem: str, hint: str) -> None:
    raise ExerciseError(f"[{exercise}] {problem}\nHint: {hint}")


def _not_done(exercise: str, answer) -> None:
    if answer is None or answer is NotImplemented:
        _fail(exercise, "no answer yet (the function returned None).",
              "replace the `raise NotImplementedError` / `...` stub with your code.")


def check_close(exercise: str, answer, expected, hint: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """The generic check: `answer` equals `expected` (shapes and values, within tolerance)."""
    _not_done(exercise, answer)
    a = torch.as_tensor(np.asarray(answer, dtype=np.float64) if not torch.is_tensor(answer) else answer).double()
    e = torch.as_tensor(np.asarray(expected, dtype=np.float64) if not torch.is_tensor(expected) else expected).double()
    if a.shape != e.shape:
        _fail(exercise, f"shape {tuple(a.shape)}, expected {tuple(e.shape)}.", hint)
    if not torch.allclose(a, e, atol=atol, rtol=rtol):
        worst = (a - e).abs().max().item()
        _fail(exercise, f"values differ from the expected ones (largest difference {worst:.4g}).", hint)


def _run(exercise: str, fn: Callable, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        _fail(exercise, "not implemented yet.", "replace the stub with your code and run the cell again.")
    except ExerciseError:
        raise
    except Exception as e:  # a crash in the student's code is a wrong answer with its own hint
        _fail(exercise, f"your function raised {type(e).__name__}: {e}", "run it on a small example and read the traceback.")


def check_iou(fn: Callable[[np.ndarray, np.ndarray], float]) -> None:
    """Notebook 00, exercise "IoU by hand": fn(a, b) is |a & b| / |a | b| for boolean masks."""
    name = "IoU"
    a = np.zeros((8, 8), bool); a[:4] = True          # 32 pixels
    b = np.zeros((8, 8), bool); b[2:6] = True         # 32 pixels, 16 shared
    cases = [(a, b, 16 / 48, "half-overlapping bands"), (a, a, 1.0, "a mask with itself"),
             (a, ~a, 0.0, "disjoint masks"), (np.zeros_like(a), np.zeros_like(a), 1.0, "two empty masks")]
    for x, y, want, what in cases:
        got = _run(name, fn, x, y)
        _not_done(name, got)
        if not np.isclose(float(got), want):
            hint = ("two empty masks agree perfectly: return 1.0 when the union is empty."
                    if what == "two empty masks" else
                    "count pixels in both masks (logical and) and in either (logical or), then divide.")
            _fail(name, f"for {what} you returned {float(got):.4f}, expected {want:.4f}.", hint)


def check_point_prompt(fn: Callable[[np.ndarray], tuple[float, float]]) -> None:
    """Notebook 00, exercise "A prompt inside the object": fn(mask) -> (x, y) inside the mask."""
    name = "point prompt"
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    disk, ring = r <= 12, (r >= 10) & (r <= 18)
    for mask, what in [(disk, "a disk"), (ring, "a ring (its centre of mass is in the hole)")]:
        got = _run(name, fn, mask)
        _not_done(name, got)
        x, y = (int(round(v)) for v in got)
        if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or not mask[y, x]:
            _fail(name, f"for {what} your point (x={x}, y={y}) is outside the mask.",
                  "use the centre of mass when it lies in the mask; otherwise take the pixel with the "
                  "largest distance to the background (scipy.ndimage.distance_transform_edt). "
                  "Mind the order: return (x, y), arrays index [y, x].")
    got = _run(name, fn, disk)
    if np.hypot(got[0] - 20, got[1] - 20) > 1.0:
        _fail(name, f"for a disk centred at (20, 20) you returned {tuple(got)}.",
              "inside a convex shape the centre of mass is the point to use.")
