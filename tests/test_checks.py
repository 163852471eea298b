"""edgelab.checks: a check passes on a right answer and raises ExerciseError with a hint otherwise."""
import numpy as np
import pytest
from scipy import ndimage

from edgelab import checks, evaluate


def good_iou(a, b):
    return evaluate.iou(a, b)


def stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("fn", [good_iou])
def test_iou_check_passes_on_a_right_answer(fn):
    checks.check_iou(fn)


@pytest.mark.parametrize("wrong, hint", [
    (stub, "not implemented"),
    (lambda a, b: None, "no answer"),
    (lambda a, b: float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())), "empty"),
    (lambda a, b: float(np.logical_and(a, b).sum() / a.sum()), "Hint"),
    (lambda a, b: 1 / 0, "ZeroDivisionError"),
])
def test_iou_check_raises_with_a_hint(wrong, hint):
    with pytest.raises(checks.ExerciseError, match=hint):
        checks.check_iou(wrong)


def test_point_check_passes_on_the_library_rule():
    checks.check_point_prompt(evaluate.point_prompt)


def test_point_check_catches_a_plain_centre_of_mass():
    def centre_only(mask):
        cy, cx = ndimage.center_of_mass(mask)
        return cx, cy
    with pytest.raises(checks.ExerciseError, match="outside the mask"):
        checks.check_point_prompt(centre_only)


def test_point_check_catches_swapped_coordinates():
    def swapped(mask):
        x, y = evaluate.point_prompt(mask)
        return y + 3, x
    with pytest.raises(checks.ExerciseError):
        checks.check_point_prompt(swapped)


def test_check_close_reports_shape_and_values():
    checks.check_close("demo", [1.0, 2.0], [1.0, 2.0], "hint")
    with pytest.raises(checks.ExerciseError, match="shape"):
        checks.check_close("demo", [1.0], [1.0, 2.0], "hint")
    with pytest.raises(checks.ExerciseError, match="largest difference"):
        checks.check_close("demo", [1.0, 2.5], [1.0, 2.0], "hint")


def test_chapter_05_checks_fail_on_wrong_answers_and_pass_on_right_ones():
    from edgelab import checks
    checks.check_choose(lambda rows, b: max([r for r in rows if r["median_s"] <= b],
                                            key=lambda r: (r["miou"], -r["median_s"]), default=None))
    with pytest.raises(checks.ExerciseError, match="choose under a budget"):
        checks.check_choose(lambda rows, b: min(rows, key=lambda r: r["median_s"]))  # fastest, not best

    def right(image, mean, std, size):
        out = np.zeros((1, 3, size, size), np.float32)
        out[0, :, :image.shape[0], :image.shape[1]] = ((image - mean) / std).transpose(2, 0, 1)
        return out

    checks.check_edge_preprocess(right)
    with pytest.raises(checks.ExerciseError, match="padding is not zero"):
        checks.check_edge_preprocess(lambda im, m, s, n: (np.pad(im.astype(np.float32), ((0, n - im.shape[0]), (0, 0), (0, 0)))
                                                          - m).transpose(2, 0, 1)[None] / s[:, None, None])


def test_hint_tiers_rise_per_exercise_and_reset():
    hint = ("the concept", "the API", "the code")
    seen = []
    for _ in range(4):
        with pytest.raises(checks.ExerciseError) as err:
            checks.fail("tiers", "wrong", hint)
        seen.append(str(err.value))
    assert "the concept" in seen[0] and "the API" in seen[1] and "the code" in seen[2] and "the code" in seen[3]
    checks.reset_hints("tiers")
    with pytest.raises(checks.ExerciseError, match="the concept"):
        checks.fail("tiers", "wrong", hint)


def test_review_queue_check_passes_the_head_rule_and_catches_weak_ones():
    from edgelab import checks

    def by_head(pred_iou, area, budget):
        flags = np.zeros(len(pred_iou), bool)
        flags[np.argsort(pred_iou)[:int(budget * len(pred_iou))]] = True
        return flags

    checks.check_review_queue(by_head)
    with pytest.raises(checks.ExerciseError, match="over the budget"):
        checks.check_review_queue(lambda p, a, b: p < 0.99)  # a fixed threshold ignores the budget
    with pytest.raises(checks.ExerciseError, match="the target is"):
        checks.check_review_queue(lambda p, a, b: np.zeros(len(p), bool))  # flags nothing


def test_kept_masks_are_the_protocols_masks():
    from edgelab import evaluate, models
    pred, area, true = evaluate.kept_masks(models.load_sam("tiny"), 3, "val")
    assert pred.shape == area.shape == true.shape and len(true) > 3
    assert ((0 <= true) & (true <= 1)).all() and (area >= 0).all()
    res = evaluate.evaluate_scenes(models.load_sam("tiny"), 3, "point", split="val", progress=False)
    assert np.allclose(sorted(true), sorted(res.per_object))  # the same kept masks as the protocol's score
