"""sam/metrics.py: hand-computed accuracy, F1, binary view, malformed handling, per-type and per-step tallies."""

import pytest

from sam.metrics import relevance_metrics


def test_hand_computed_case():
    labels = [3, 3, 2, -1, 0, 1]
    predicted = [3, 2, 2, -1, None, 0]
    m = relevance_metrics(predicted, labels, groups=["plain", "plain", "rank", None, "rank", "plain"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    # class 3: tp 1, fn 1 -> 2/3; class 2: tp 1, fp 1 -> 2/3; class -1: 1; class 0: fp 1, fn 1 -> 0; class 1: 0
    assert m["per_class_f1"] == pytest.approx({"3": 2 / 3, "2": 2 / 3, "-1": 1.0, "0": 0.0, "1": 0.0})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0 + 0) / 5)
    # binary: gold relevant = [1,1,1,0,0,1]; predicted relevant = [1,1,1,0,malformed,0]
    assert m["binary_accuracy"] == pytest.approx(4 / 6)  # the malformed one is wrong, the 1 -> 0 is wrong
    assert m["binary_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert m["malformed_rate"] == pytest.approx(1 / 6)
    assert m["confusion"]["0"]["malformed"] == 1 and m["confusion"]["3"]["2"] == 1
    assert m["accuracy_by_type"] == {"plain": {"accuracy": 1 / 3, "n": 3}, "rank": {"accuracy": 0.5, "n": 2}}


def test_macro_f1_only_over_classes_present():
    m = relevance_metrics([3, 3], [3, 3])
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0


def test_step_agreement_ignores_unknowns():
    m = relevance_metrics([1, 1], [1, 1], step_correct=[[True, None], [False, None]])
    assert m["step_agreement"] == [0.5, None]


def test_bad_lengths():
    with pytest.raises(ValueError, match="as many predictions"):
        relevance_metrics([1], [1, 2])
    with pytest.raises(ValueError):
        relevance_metrics([], [])
