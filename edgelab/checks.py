"""Exercise checks: each raises `ExerciseError` with a hint when an answer is wrong.

Used by the exercise cells of every notebook (the student build keeps these calls and replaces
the solutions with stubs). A check never prints "failed": it raises, so a wrong answer stops
the notebook, nbval and papermill alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from segment_anything.modeling import image_encoder as sam_encoder


class ExerciseError(AssertionError):
    """A wrong exercise answer; the message says what is wrong and hints at the fix."""


Hint = str | tuple[str, ...]
_TRIES: dict[str, int] = {}  # failed checks per exercise in this kernel: picks the hint's tier


def tiered(hint: Hint, tries: int) -> str:
    """The hint tier for the `tries`-th failure: the concept first, then the API, the code last.

    A hint given as one string is its only tier."""
    tiers = (hint,) if isinstance(hint, str) else tuple(hint)
    i = min(tries, len(tiers)) - 1
    more = f" (hint {i + 1} of {len(tiers)}: run the check again for a more specific one)" if i + 1 < len(tiers) else ""
    return tiers[i] + more


def reset_hints(exercise: str | None = None) -> None:
    """Start the hint tiers again from the concept: for one exercise, or for all of them."""
    if exercise is None:
        _TRIES.clear()
    else:
        _TRIES.pop(exercise, None)


def fail(exercise: str, problem: str, hint: Hint) -> None:
    """Raise ExerciseError: which exercise, what is wrong, and a hint whose tier rises with each failure."""
    _TRIES[exercise] = _TRIES.get(exercise, 0) + 1
    raise ExerciseError(f"[{exercise}] {problem}\nHint: {tiered(hint, _TRIES[exercise])}")


def require_answer(exercise: str, answer) -> None:
    """Fail unless the student's function returned something (a stub returns None)."""
    if answer is None or answer is NotImplemented:
        fail(exercise, "no answer yet (the function returned None).",
              "replace the `raise NotImplementedError` / `...` stub with your code.")


def check_close(exercise: str, answer, expected, hint: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """The generic check: `answer` equals `expected` (shapes and values, within tolerance)."""
    require_answer(exercise, answer)
    a = torch.as_tensor(np.asarray(answer, dtype=np.float64) if not torch.is_tensor(answer) else answer).double()
    e = torch.as_tensor(np.asarray(expected, dtype=np.float64) if not torch.is_tensor(expected) else expected).double()
    if a.shape != e.shape:
        fail(exercise, f"shape {tuple(a.shape)}, expected {tuple(e.shape)}.", hint)
    if not torch.allclose(a, e, atol=atol, rtol=rtol):
        worst = (a - e).abs().max().item()
        fail(exercise, f"values differ from the expected ones (largest difference {worst:.4g}).", hint)


def call_answer(exercise: str, fn: Callable, *args):
    """Call the student's function; a stub or a crash becomes an ExerciseError with a hint."""
    try:
        return fn(*args)
    except NotImplementedError:
        fail(exercise, "not implemented yet.", "replace the stub with your code and run the cell again.")
    except ExerciseError:
        raise
    except Exception as e:  # a crash in the student's code is a wrong answer with its own hint
        fail(exercise, f"your function raised {type(e).__name__}: {e}", "run it on a small example and read the traceback.")


# --- notebook 01: attention by hand ---------------------------------------------------------

def _exercise_inputs(seed: int = 0, grid: tuple[int, int] = (3, 4), d: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, n, d, generator=g) for _ in range(3))
    tables = (torch.randn(2 * grid[0] - 1, d, generator=g), torch.randn(2 * grid[1] - 1, d, generator=g))
    return q, k, v, tables


def check_naive_attention(fn: Callable[..., torch.Tensor]) -> None:
    """Notebook 01, exercise "Naive attention": fn(q, k, v, scale) = softmax(q k^T scale) v."""
    name = "naive attention"
    q, k, v, _ = _exercise_inputs()
    got = call_answer(name, fn, q, k, v, 0.5)
    require_answer(name, got)
    hint = ("each query's output is a weighted average of the values; the weights are a softmax of its "
            "scaled dot products with every key.",
            "torch.softmax(..., dim=-1) normalises over the keys; k.transpose(-2, -1) makes q @ k^T.",
            "scores = (q * scale) @ k.transpose(-2, -1); softmax over the LAST dim (the keys); "
            "then multiply by v.")
    check_close(name, got, torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v, hint, atol=1e-5)
    got_t = call_answer(name, fn, q, k, v[..., :3], 0.5)
    if tuple(got_t.shape) != (2, q.shape[1], 3):
        fail(name, f"with 3-dim values the output has shape {tuple(got_t.shape)}.",
              "the output takes its last dimension from v, not from q.")


def check_rel_pos_bias(fn: Callable[..., torch.Tensor]) -> None:
    """Notebook 01, exercise "the decomposed relative-position bias": fn(q, rel_pos_h, rel_pos_w, (H, W)) -> (B, N, N).

    Compared with what SAM's own `add_decomposed_rel_pos` adds to a zero score matrix, on a
    non-square grid, so swapped height and width axes are caught.
    """
    name = "decomposed bias"
    q, _, _, (th, tw) = _exercise_inputs()
    hw = (3, 4)
    n = hw[0] * hw[1]
    expected = sam_encoder.add_decomposed_rel_pos(torch.zeros(q.shape[0], n, n), q, th, tw, hw, hw)
    got = call_answer(name, fn, q, th, tw, hw)
    require_answer(name, got)
    hint = ("the bias between query (i, j) and key (k, l) is a height term for (i, k) plus a width term "
            "for (j, l), each a dot product of the query with a learned offset embedding.",
            "segment_anything's get_rel_pos(H, H, rel_pos_h) gives the (H, H, d) embeddings; torch.einsum "
            "contracts the channel dim; broadcasting adds the two terms.",
            "Rh = get_rel_pos(H, H, rel_pos_h) is (H, H, d); rel_h[b, i, j, k] = sum_c q[b, i, j, c] * "
            "Rh[i, k, c] (einsum 'bhwc,hkc->bhwk'), likewise rel_w with Rw and the column j; then "
            "bias[b, (i, j), (k, l)] = rel_h[b, i, j, k] + rel_w[b, i, j, l]. Do not scale q here.")
    check_close(name, got, expected, hint, atol=1e-4, rtol=1e-4)


def check_fold(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Notebook 01, exercise "Fold the bias into q and k": fn(q, k, rel_h, rel_w, scale) -> (q', k')
    with q' @ k'^T == q @ k^T * scale + bias, where bias[(i, j), (a, b)] = rel_h[(i, j), a] + rel_w[(i, j), b].
    """
    name = "fold the bias"
    q, k, _, (th, tw) = _exercise_inputs()
    hw = (3, 4)
    rh, rw = (sam_encoder.get_rel_pos(n, n, t) for n, t in zip(hw, (th, tw)))
    grid_q = q.reshape(-1, hw[0], hw[1], q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rh).reshape(q.shape[0], -1, hw[0])
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rw).reshape(q.shape[0], -1, hw[1])
    got = call_answer(name, fn, q, k, rel_h, rel_w, 0.5)
    require_answer(name, got)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        fail(name, "return a pair (q_folded, k_folded).", "return torch.cat([...], -1) for each of q and k.")
    qf, kf = got
    hint = ("a sum of dot products is one dot product of concatenated vectors: append to each query its "
            "bias terms, and to each key a vector that picks the right term.",
            "torch.cat along the last dim; torch.nn.functional.one_hot builds the picking vectors.",
            "q' = [q * scale, rel_h, rel_w] along the last dim; k' = [k, onehot(row of the key), "
            "onehot(column of the key)]. Key number n sits in row n // W and column n % W.")
    # SAM's own code adds the same bias to the scaled scores
    expected = sam_encoder.add_decomposed_rel_pos((q * 0.5) @ k.transpose(-2, -1), q, th, tw, hw, hw)
    check_close(name, qf @ kf.transpose(-2, -1), expected, hint, atol=1e-4, rtol=1e-4)


# --- notebook 00 ------------------------------------------------------------------------------

def check_iou(fn: Callable[[np.ndarray, np.ndarray], float]) -> None:
    """Notebook 00, exercise "IoU by hand": fn(a, b) is |a & b| / |a | b| for boolean masks."""
    name = "IoU"
    a = np.zeros((8, 8), bool); a[:4] = True          # 32 pixels
    b = np.zeros((8, 8), bool); b[2:6] = True         # 32 pixels, 16 shared
    cases = [(a, b, 16 / 48, "half-overlapping bands"), (a, a, 1.0, "a mask with itself"),
             (a, ~a, 0.0, "disjoint masks"), (np.zeros_like(a), np.zeros_like(a), 1.0, "two empty masks")]
    for x, y, want, what in cases:
        got = call_answer(name, fn, x, y)
        require_answer(name, got)
        if not np.isclose(float(got), want):
            hint = ("two empty masks agree perfectly: return 1.0 when the union is empty."
                    if what == "two empty masks" else
                    "count pixels in both masks (logical and) and in either (logical or), then divide.")
            fail(name, f"for {what} you returned {float(got):.4f}, expected {want:.4f}.", hint)


def check_point_prompt(fn: Callable[[np.ndarray], tuple[float, float]]) -> None:
    """Notebook 00, exercise "a prompt point inside the object": fn(mask) -> (x, y) inside the mask."""
    name = "point prompt"
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    disk, ring = r <= 12, (r >= 10) & (r <= 18)
    for mask, what in [(disk, "a disk"), (ring, "a ring (its centre of mass is in the hole)")]:
        got = call_answer(name, fn, mask)
        require_answer(name, got)
        x, y = (int(round(v)) for v in got)
        if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or not mask[y, x]:
            fail(name, f"for {what} your point (x={x}, y={y}) is outside the mask.",
                  "use the centre of mass when it lies in the mask; otherwise take the pixel with the "
                  "largest distance to the background (scipy.ndimage.distance_transform_edt). "
                  "Mind the order: return (x, y), arrays index [y, x].")
    got = call_answer(name, fn, disk)
    if np.hypot(got[0] - 20, got[1] - 20) > 1.0:
        fail(name, f"for a disk centred at (20, 20) you returned {tuple(got)}.",
              "inside a convex shape the centre of mass is the point to use.")


def _frobenius_case() -> list[tuple[torch.Tensor, list[int], str]]:
    """Weights whose channel order by Frobenius norm differs from the order by sum, L1 norm or columns."""
    g = torch.Generator().manual_seed(2)
    conv = torch.randn(6, 3, 3, 3, generator=g)
    conv *= torch.tensor([3.0, 0.5, 2.0, 1.0, 4.0, 0.2]).view(6, 1, 1, 1)
    lin = torch.tensor([[3.0, 0.0, 0.0], [2.0, 2.0, 0.0], [-4.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    # Frobenius norms of lin's rows: 3.0, 2.83, 4.03, 1.73 -> ascending 3, 1, 0, 2
    # (by L1 norm: 3.0, 4.0, 4.5, 3.0; by signed sum: 3, 4, -3.5, 3)
    expected_conv = torch.argsort(conv.flatten(1).norm(dim=1)).tolist()
    return [(conv, expected_conv, "a conv weight (6, 3, 3, 3)"), (lin, [3, 1, 0, 2], "a Linear weight (4, 3)")]


def check_frobenius_ranking(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Notebook 02, exercise "Rank channels by Frobenius norm": fn(weight) -> channel indices, ascending."""
    name = "Frobenius ranking"
    for weight, expected, what in _frobenius_case():
        got = call_answer(name, fn, weight.clone())
        require_answer(name, got)
        got = [int(i) for i in torch.as_tensor(got).flatten().tolist()]
        if len(got) != weight.shape[0]:
            fail(name, f"for {what} you returned {len(got)} indices, expected one per output channel "
                  f"({weight.shape[0]}).", "output channels are dim 0: flatten each weight[c] and take its norm.")
        if got == expected[::-1]:
            fail(name, f"for {what} your order is descending.", "least important first: sort ascending.")
        if got != expected:
            fail(name, f"for {what} you returned {got}, expected {expected}.",
                  ("a channel's importance is the size of all its weights together: the Frobenius norm of "
                   "its slice weight[c], every other dim included; not the sum, not the L1 norm, not the columns.",
                   "Tensor.flatten(1) makes one row per output channel; Tensor.norm(dim=1) and torch.argsort.",
                   "torch.argsort(weight.flatten(1).norm(dim=1))"))


def check_prune_conv(fn: Callable[[torch.nn.Conv2d, torch.nn.Conv2d, float], tuple]) -> None:
    """Notebook 02, exercise "Prune a conv by hand": fn(conv1, conv2, ratio) -> (smaller conv1, conv2).

    conv1 keeps its int(n * (1 - ratio)) filters of largest Frobenius norm; conv2 keeps the matching
    input channels; the kept channels' outputs are exactly the original ones.
    """
    name = "prune a conv"
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(3, 10, 3, padding=1)
    conv2 = torch.nn.Conv2d(10, 4, 3, padding=1)
    with torch.no_grad():
        conv1.weight.mul_(torch.linspace(0.2, 2.0, 10)[torch.randperm(10)].view(10, 1, 1, 1))
    before = [p.detach().clone() for p in (conv1.weight, conv1.bias, conv2.weight)]
    ratio = 0.4
    n_keep = int(10 * (1 - ratio))
    keep = torch.sort(torch.argsort(conv1.weight.detach().flatten(1).norm(dim=1))[10 - n_keep:]).values
    got = call_answer(name, fn, conv1, conv2, ratio)
    require_answer(name, got)
    if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(c, torch.nn.Conv2d) for c in got)):
        fail(name, f"returned {type(got).__name__}, expected a tuple of two nn.Conv2d.",
              "build two new convs and return them as (new_conv1, new_conv2).")
    new1, new2 = got
    if any(not torch.equal(a, b) for a, b in zip(before, (conv1.weight, conv1.bias, conv2.weight))):
        fail(name, "the original convs were modified.", "copy the kept slices into new layers; leave the inputs alone.")
    if new1.out_channels != n_keep or new2.in_channels != n_keep:
        fail(name, f"conv1 has {new1.out_channels} output and conv2 {new2.in_channels} input channels, "
              f"expected {n_keep} each at ratio {ratio} of 10.",
              "keep int(n * (1 - ratio)) channels; conv2 must take exactly conv1's kept channels as input.")
    if new2.out_channels != conv2.out_channels:
        fail(name, "conv2's output channels changed.", "only conv2's input channels follow conv1's pruning.")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want1 = conv1(x)[:, keep]
        got1 = new1(x)
        if got1.shape != want1.shape or not torch.allclose(got1, want1, atol=1e-5):
            fail(name, "conv1's kept channels do not reproduce the original channels with the largest norms.",
                  "rank filters by weight.flatten(1).norm(dim=1), keep the top ones in their original order, "
                  "and copy the bias of those channels too.")
        h = torch.relu(conv1(x))
        mask = torch.zeros(10)
        mask[keep] = 1
        want2 = conv2(h * mask.view(1, 10, 1, 1))
        got2 = new2(torch.relu(got1))
        if not torch.allclose(got2, want2, atol=1e-5):
            fail(name, "conv2 does not match: its output should equal the original conv2 fed only the kept channels.",
                  "slice conv2.weight[:, keep] (dim 1 is the input channel) and keep its whole bias.")


def _affine_params(x: torch.Tensor, bits: int) -> tuple[float, int]:
    """Asymmetric per-tensor scale and zero point, computed here from the definition (in float32,
    as torch's observers do) so the check does not lean on chapter 03's own quantizer."""
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    lo, hi = torch.clamp(x.float().min(), max=0.0), torch.clamp(x.float().max(), min=0.0)
    scale = (hi - lo) / (qmax - qmin)
    scale = scale if scale > 0 else torch.ones(())
    zero = int(torch.clamp(torch.round(qmin - lo / scale), qmin, qmax))
    return float(scale), zero


class _StandInEncoder(torch.nn.Module):
    """A one-conv image encoder with tiny's interface (256 px in, 128 x 16 x 16 out)."""

    img_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 128, 16, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def check_scale_zero_point(fn: Callable[[torch.Tensor, int], tuple]) -> None:
    """Notebook 03, exercise "Scale and zero point": fn(x, bits) -> (scale, zero_point), asymmetric,
    per tensor, from x's own range: min maps to -2^(bits-1), max to 2^(bits-1) - 1."""
    name = "scale and zero point"
    for x, bits in [(torch.tensor([-1.0, 0.2, 3.0]), 8), (torch.tensor([0.5, 2.0, -0.25, 1.0]), 4),
                    (torch.linspace(-4.0, 1.0, 11), 8)]:
        got = call_answer(name, fn, x.clone(), bits)
        require_answer(name, got)
        if not (isinstance(got, tuple) and len(got) == 2):
            fail(name, f"returned {type(got).__name__}, expected a tuple (scale, zero_point).",
                  "return scale, zero_point")
        want_scale, want_zero = _affine_params(x, bits)
        scale, zero = float(got[0]), float(got[1])
        if abs(scale - want_scale) > 1e-6 * max(1.0, want_scale):
            fail(name, f"for {x.tolist()} at {bits} bits your scale is {scale:.6g}, expected {want_scale:.6g}.",
                  ("the scale maps the real range onto the integer range; the range must contain 0 so that "
                   "0 is exactly representable.",
                   "qmin = -2**(bits-1), qmax = 2**(bits-1) - 1; widen with min(x.min(), 0), max(x.max(), 0).",
                   "scale = (max - min) / (qmax - qmin) with qmin = -2**(bits-1), qmax = 2**(bits-1) - 1 "
                   "(and the range widened to contain 0)."))
        if zero != want_zero:
            fail(name, f"for {x.tolist()} at {bits} bits your zero point is {zero:g}, expected {want_zero}.",
                  ("the zero point is the integer that real 0 maps to; the real minimum must map to qmin.",
                   "solve qmin = min / scale + Z for Z, and round it to an integer.",
                   "zero_point = round(qmin - min / scale)."))


def check_quantize_per_channel(fn: Callable[[torch.Tensor, int], tuple]) -> None:
    """Notebook 03, exercise "Quantize per channel": fn(w, bits) -> (q, scale), symmetric, one
    scale per output channel (dim 0); q holds integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1]."""
    name = "quantize per channel"
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 0.5, 10.0, 0.01])[:, None]
    for bits in (8, 4):
        got = call_answer(name, fn, w.clone(), bits)
        require_answer(name, got)
        if not (isinstance(got, tuple) and len(got) == 2):
            fail(name, f"returned {type(got).__name__}, expected a tuple (q, scale).", "return q, scale")
        q, scale = torch.as_tensor(got[0]), torch.as_tensor(got[1]).float().flatten()
        qmax = 2 ** (bits - 1) - 1
        want_scale = w.abs().amax(dim=1) / qmax
        if scale.numel() != w.shape[0]:
            fail(name, f"{scale.numel()} scales for {w.shape[0]} output channels.",
                  "one scale per row: w.abs().amax(dim=1) / qmax.")
        if not torch.allclose(scale, want_scale, rtol=1e-5):
            fail(name, f"at {bits} bits your scales differ from max|w[c]| / {qmax}.",
                  "symmetric: scale = max|w[c]| / (2**(bits-1) - 1), zero point 0.")
        if bits == 8:
            ref = torch.quantize_per_channel(w, want_scale, torch.zeros(6, dtype=torch.long), 0, torch.qint8).int_repr()
        else:
            ref = torch.clamp(torch.round(w / want_scale[:, None]), -qmax, qmax)
        if q.shape != w.shape or not torch.equal(q.round().int(), ref.int()):
            fail(name, f"at {bits} bits your integers differ from torch.quantize_per_channel's.",
                  ("symmetric per-channel: each row is divided by its own scale, rounded, and clipped to the "
                   "symmetric integer range.",
                   "broadcast with scale[:, None]; torch.round and torch.clamp.",
                   "q = clamp(round(w / scale[:, None]), -qmax, qmax)."))


def check_huber_loss(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Notebook 04, exercise "The Huber loss": fn(student, teacher, delta) -> mean Huber loss,
    0.5 e^2 where |e| <= delta and delta (|e| - 0.5 delta) elsewhere, e = student - teacher."""
    name = "Huber loss"
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 8, 4, 4, generator=gen) * 2, torch.randn(2, 8, 4, 4, generator=gen)
    for delta in (1.0, 0.25, 5.0):
        got = call_answer(name, fn, s.clone(), t.clone(), delta)
        require_answer(name, got)
        got = torch.as_tensor(got)
        if got.numel() != 1:
            fail(name, f"returned {tuple(got.shape)} values, expected one number (the mean over every element).",
                  "finish with .mean().")
        want = torch.nn.functional.huber_loss(s, t, delta=delta)
        if not torch.allclose(got.float().reshape(()), want, rtol=1e-5, atol=1e-7):
            small = torch.nn.functional.mse_loss(s, t) / 2
            hint = ("Huber is quadratic for small errors and linear for large ones; the two pieces meet "
                    "with the same value and slope at |e| = delta.",
                    "torch.where(e.abs() <= delta, small_piece, large_piece), then .mean().",
                    "for |e| <= delta use 0.5 * e**2; beyond it delta * (|e| - 0.5 * delta).")
            if torch.allclose(got.float().reshape(()), small, rtol=1e-5):
                hint = ("that is half the MSE everywhere: large errors must grow linearly, not quadratically. "
                        + hint[0],) + hint[1:]
            fail(name, f"with delta={delta} your loss is {float(got):.6g}, expected {float(want):.6g}.", hint)


def check_wire_student(fn: Callable) -> None:
    """Notebook 04, exercise "Wire the student in": fn(teacher, encoder) -> a Sam whose image
    encoder is `encoder` and whose prompt encoder and mask decoder are the teacher's, frozen."""
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam
    from .models import CONFIGS, build_sam
    name = "wire the student in"
    torch.manual_seed(0)
    teacher = build_sam(CONFIGS["tiny"])
    enc = _StandInEncoder().eval()
    sam = call_answer(name, fn, teacher, enc)
    require_answer(name, sam)
    if not isinstance(sam, Sam):
        fail(name, f"returned {type(sam).__name__}, expected segment_anything's Sam.",
              "build Sam(image_encoder=..., prompt_encoder=..., mask_decoder=..., pixel_mean=..., pixel_std=...).")
    if sam.image_encoder is not enc:
        fail(name, "the image encoder is not the student you were given.", "pass image_encoder=encoder.")
    if sam.prompt_encoder is not teacher.prompt_encoder or sam.mask_decoder is not teacher.mask_decoder:
        fail(name, "the prompt encoder or mask decoder is not the teacher's own.",
              "reuse teacher.prompt_encoder and teacher.mask_decoder (the same objects, not new ones).")
    trainable = [n for n, p in list(sam.prompt_encoder.named_parameters()) + list(sam.mask_decoder.named_parameters())
                 if p.requires_grad]
    if trainable:
        fail(name, f"{len(trainable)} decoder parameters would still be trained (e.g. {trainable[0]}).",
              "freeze them: p.requires_grad_(False) for every parameter of the prompt encoder and mask decoder.")
    if not (torch.equal(sam.pixel_mean, teacher.pixel_mean) and torch.equal(sam.pixel_std, teacher.pixel_std)):
        fail(name, "the pixel normalisation differs from the teacher's.",
              "pass the teacher's pixel_mean and pixel_std (as lists: teacher.pixel_mean.flatten().tolist()).")
    predictor = SamPredictor(sam.eval())
    predictor.set_image(np.zeros((64, 80, 3), np.uint8))
    masks, _, _ = predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))
    if masks.shape != (3, 64, 80):
        fail(name, f"SamPredictor gave masks of shape {masks.shape}, expected (3, 64, 80).",
              "the student must keep the teacher's img_size so SamPredictor resizes the image the same way.")


def check_review_queue(fn: Callable, budget: float = 0.2, n_scenes: int = 16, target: float = 0.05) -> None:
    """Notebook 00, exercise "a review queue": fn(pred_iou, area, budget) -> one boolean per object,
    True for the masks a person re-checks, at most a fraction `budget` of them. The masks left
    unflagged must score an mIoU at least `target` above all the masks, on `n_scenes` validation
    scenes of tiny with one point per object (the protocol's kept mask)."""
    from . import evaluate, models  # core modules, imported where used (as for the other model checks)

    name = "review queue"
    hint = ("the person should see the masks most likely to be wrong; the IoU head's estimate is imperfect but it "
            "tracks the true IoU, and a fixed threshold flags however many masks happen to fall under it.",
            "rank the objects by the number you trust and flag the lowest int(budget * n) of them: np.argsort.",
            "flags = np.zeros(n, bool); flags[np.argsort(pred_iou)[:int(budget * n)]] = True")
    require_answer(name, call_answer(name, fn, np.array([0.9, 0.4, 0.7]), np.array([50, 900, 3000]), 0.34))
    pred_iou, area, true_iou = evaluate.kept_masks(models.load_sam("tiny"), n_scenes, "val")
    flags = call_answer(name, fn, pred_iou.copy(), area.copy(), budget)
    require_answer(name, flags)
    flags = np.asarray(flags, dtype=bool)
    if flags.shape != true_iou.shape:
        fail(name, f"returned {flags.shape[0] if flags.ndim else 'no'} flags for {len(true_iou)} objects.",
             "one boolean per object, in the order given.")
    if flags.sum() > budget * len(true_iou):
        fail(name, f"you flag {flags.sum()} of {len(true_iou)} masks ({flags.mean():.0%}): over the budget of {budget:.0%}.", hint)
    rest, everyone = true_iou[~flags].mean(), true_iou.mean()
    if rest < everyone + target:
        fail(name, f"the masks you leave unflagged score mIoU {rest:.3f}, all masks {everyone:.3f}: "
                   f"{(rest - everyone) * 100:+.1f} points, the target is +{target * 100:.0f}.", hint)
    print(f"[{name}] you flag {flags.sum()} of {len(true_iou)} masks ({flags.mean():.0%}), whose true mIoU is "
          f"{true_iou[flags].mean():.3f}; the rest score {rest:.3f} against {everyone:.3f} for all of them "
          f"({(rest - everyone) * 100:+.1f} points; target +{target * 100:.0f})")


def check_choose(fn: Callable) -> None:
    """Notebook 05, exercise "Choose under a budget": fn(rows, budget_s) -> the row with the
    highest mIoU among those whose frame latency `median_s` fits the budget, or None."""
    name = "choose under a budget"
    rows = [{"name": "big", "median_s": 0.020, "miou": 0.62}, {"name": "mid", "median_s": 0.008, "miou": 0.60},
            {"name": "fast", "median_s": 0.003, "miou": 0.55}, {"name": "fast twin", "median_s": 0.004, "miou": 0.55}]
    cases = [(1.0, "big"), (0.020, "big"), (0.0199, "mid"), (0.005, "fast"), (0.001, None)]
    for budget, want in cases:
        got = call_answer(name, fn, [dict(r) for r in rows], budget)
        if want is None and got is None:
            continue
        require_answer(name, got)
        got_name = got.get("name") if isinstance(got, dict) else got
        if got_name != want:
            fail(name, f"with a budget of {budget * 1e3:g} ms you chose {got_name!r}, expected {want!r}.",
                  ("first rule out what does not fit the budget, then rank what is left by accuracy; "
                   "a tie goes to the faster; nothing fits: None.",
                   "a list comprehension filters; max(rows, key=lambda r: (r['miou'], -r['median_s'])).",
                   "keep the rows with median_s <= budget, then take the highest miou (ties: the faster); "
                   "return None when nothing fits."))


def check_edge_preprocess(fn: Callable) -> None:
    """Notebook 05, exercise "Preprocess without torch": fn(image, mean, std, size) -> the
    (1, 3, size, size) float32 array SamPredictor feeds the encoder, for an image whose longest
    side is already `size`: normalised per channel, then zero-padded at the bottom and right."""
    name = "preprocess without torch"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    want = np.zeros((1, 3, 64, 64), np.float32)
    want[0, :, :48, :] = ((image - mean) / std).transpose(2, 0, 1)
    got = call_answer(name, fn, image, mean, std, 64)
    require_answer(name, got)
    got = np.asarray(got)
    if got.shape != want.shape:
        fail(name, f"shape {got.shape}, expected {want.shape}.",
              "channels first with a batch axis: (1, 3, size, size); transpose(2, 0, 1) then add an axis.")
    if np.abs(got[0, :, 48:, :]).max() > 0:
        fail(name, "the padding is not zero.", "normalise first, then pad with zeros (SamPredictor pads after normalising).")
    check_close(name, got, want, "subtract the mean and divide by the std per channel, as float32.", atol=1e-5)


# --- design tasks and the techniques the package hides -------------------------------------------

_PRUNE_CASE: dict = {}


def _mlp_prune_case(n_scenes: int = 8, scan_ratio: float = 0.75) -> dict:
    """Tiny (trained), its MLP sensitivity per block on validation scenes, scored once per kernel."""
    if not _PRUNE_CASE:
        from . import evaluate, models, pruning
        sam = models.load_sam("tiny")
        depth = len(sam.image_encoder.blocks)
        score = lambda m: evaluate.evaluate_scenes(m, n_scenes, split="val", progress=False).miou  # noqa: E731
        scan = pruning.sensitivity_scan(sam, score, [scan_ratio], kinds=("mlp",), progress=False)
        drops = {r["block"]: scan[0]["score"] - r["score"] for r in scan[1:]}
        _PRUNE_CASE.update(sam=sam, depth=depth, score=score, drops=drops, scan_ratio=scan_ratio)
    return _PRUNE_CASE


def check_mlp_ratios(fn: Callable[[dict, float], list], mean_ratio: float = 0.4) -> None:
    """Notebook 02, exercise "beat uniform pruning" (a design task): fn(drops, mean_ratio) -> one MLP ratio
    per block. Target: at most the MACs of uniform MLP pruning at `mean_ratio`, and a validation
    mIoU (no fine-tuning) at least as high as uniform's."""
    from . import pruning
    name = "beat uniform pruning"
    case = _mlp_prune_case()
    depth, sam = case["depth"], case["sam"]
    got = call_answer(name, fn, dict(case["drops"]), mean_ratio)
    require_answer(name, got)
    ratios = [float(r) for r in got]
    if len(ratios) != depth or not all(0.0 <= r <= 0.9 for r in ratios):
        fail(name, f"returned {len(ratios)} ratios {ratios}; expected {depth}, each in [0, 0.9].",
             "one ratio per block, in block order; 0 keeps the block's MLP whole.")
    zeros = (0.0,) * depth
    uniform = pruning.pruned_copy(sam, pruning.PrunePlan((mean_ratio,) * depth, zeros, zeros))
    mine = pruning.pruned_copy(sam, pruning.PrunePlan(tuple(ratios), zeros, zeros))
    macs_u, macs_m = pruning.encoder_macs(uniform), pruning.encoder_macs(mine)
    hint = ("a block whose pruning costs little accuracy (a small drop) can give more channels; a sensitive "
            "one should give fewer. Keep the average ratio at the budget.",
            "sort the blocks by drop (sorted(drops, key=drops.get)) and hand out ratios from high to low, "
            "or scale each block's ratio by how far its drop is below the mean; then rescale to the budget.",
            "ladder = sorted ratios with mean mean_ratio, e.g. mean_ratio + spread * (linspace(1, -1, depth)); "
            "give ladder[i] to the i-th least sensitive block; clip to [0, 0.9].")
    if macs_m > macs_u * 1.001:
        fail(name, f"your plan costs {macs_m / 1e6:.1f} M MACs, uniform {mean_ratio:g} costs {macs_u / 1e6:.1f} M: "
             "over the budget.", hint)
    s_u, s_m = case["score"](uniform), case["score"](mine)
    if s_m < s_u:
        fail(name, f"validation mIoU {s_m:.3f} with your ratios, {s_u:.3f} with uniform {mean_ratio:g}: "
             "not better yet.", hint)
    print(f"[{name}] validation mIoU {s_m:.3f} vs uniform {s_u:.3f} at {macs_m / macs_u:.3f}x its MACs")


def check_int8_linear(fn: Callable) -> None:
    """Notebook 03, exercise "Int8Linear's forward, integer-only": fn(x, weight_q_t, weight_scale, bias) -> y, the
    W8A8 product on torch._int_mm (per-token symmetric activations, int32 accumulation, rescale),
    equal to edgelab's Int8Linear."""
    from .quantization import Int8Linear
    name = "int8 linear"
    torch.manual_seed(5)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 20, 64) * torch.linspace(0.1, 4.0, 20)[None, :, None]
    ref = Int8Linear.from_float(lin)
    with torch.no_grad():
        want = ref(x)
    calls = []
    real = torch._int_mm

    def counting(a, b):
        calls.append((a.dtype, b.dtype))
        return real(a, b)
    torch._int_mm = counting
    try:
        got = call_answer(name, fn, x.clone(), ref.weight_q_t.clone(), ref.weight_scale.clone(), lin.bias.detach().clone())
    finally:
        torch._int_mm = real
    require_answer(name, got)
    if not calls or any(c != (torch.int8, torch.int8) for c in calls):
        fail(name, "the product did not run in torch._int_mm on two int8 tensors.",
             ("the point of W8A8 is that the matmul itself is integer: quantize x to int8 first.",
              "torch._int_mm(a_int8 (M, K), b_int8 (K, N)) -> int32 (M, N); it needs 2-D inputs: reshape x.",
              "xq = round(x2 / s).clamp(-127, 127).to(torch.int8); torch._int_mm(xq, weight_q_t)"))
    hint = ("int32 accumulators count in units of (activation scale x weight scale): multiply them back, "
            "one activation scale per token (row), one weight scale per output channel (column); add the bias last.",
            "s = x2.abs().amax(dim=1, keepdim=True) / 127 per row; y = acc.float() * weight_scale * s + bias.",
            "y = torch._int_mm(xq, weight_q_t).float() * weight_scale * s + bias, then reshape to x's leading dims.")
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        fail(name, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}.", hint)
    check_close(name, got.float(), want, hint, atol=1e-4, rtol=1e-4)


def check_distill_step(fn: Callable) -> None:
    """Notebook 04, exercise "One training step": fn(student, optimizer, images, targets, delta) -> the
    step's loss as a float, after one optimizer step on the Huber loss to the teacher's embeddings."""
    import copy
    name = "one training step"
    torch.manual_seed(6)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU(), torch.nn.Conv2d(8, 8, 1))
    twin = copy.deepcopy(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    hint = ("a step is: forget the last gradients, measure the loss, push the gradients back, move the weights.",
            "optimizer.zero_grad(); loss = F.huber_loss(student(images), targets, delta=delta); "
            "loss.backward(); optimizer.step(); return loss.item().",
            "the order matters: zero_grad before backward, step after it; return float(loss) of this step.")
    for step in range(3):
        images, targets = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8, 4, 4, generator=g)
        got = call_answer(name, fn, student, opt, images, targets, 0.5)
        require_answer(name, got)
        opt_ref.zero_grad()
        loss = torch.nn.functional.huber_loss(twin(images), targets, delta=0.5)
        loss.backward()
        opt_ref.step()
        got = float(got.detach()) if torch.is_tensor(got) else float(got)
        if not np.isclose(got, loss.item(), rtol=1e-5):
            fail(name, f"step {step + 1}: you returned loss {got:.6g}, expected {loss.item():.6g}.", hint)
        worst = max((a - b).abs().max().item() for a, b in zip(student.parameters(), twin.parameters()))
        if worst > 1e-5:
            fail(name, f"after step {step + 1} the weights differ from one AdamW step by up to {worst:.3g}.", hint)


def check_choose_for_load(fn: Callable) -> None:
    """Notebook 05, exercise "choose for a busy machine" (a design task): fn(rows, idle, busy, budget_s) -> the
    most accurate row whose frame fits the budget both idle and under load (ties: faster when busy), or None."""
    name = "choose for a busy machine"
    rows = [{"name": n, "miou": m} for n, m in [("torch big", 0.75), ("ort big", 0.74), ("ort small", 0.70), ("torch small", 0.70)]]
    idle = {"torch big": 0.012, "ort big": 0.015, "ort small": 0.006, "torch small": 0.005}
    busy = {"torch big": 0.045, "ort big": 0.018, "ort small": 0.007, "torch small": 0.016}
    cases = [(0.05, "torch big"), (0.02, "ort big"), (0.016, "ort small"), (0.0069, None), (0.007, "ort small")]
    hint = ("a choice must survive the worst load you expect: judge each variant by its slower measurement.",
            "fits = [r for r in rows if max(idle[n], busy[n]) <= budget_s]; then the highest miou, ties by busy latency.",
            "max(fits, key=lambda r: (r['miou'], -busy[r['name']])) if fits else None")
    for budget, want in cases:
        got = call_answer(name, fn, [dict(r) for r in rows], dict(idle), dict(busy), budget)
        got_name = got.get("name") if isinstance(got, dict) else got
        if got_name != want:
            fail(name, f"with a budget of {budget * 1e3:g} ms you chose {got_name!r}, expected {want!r}.", hint)
