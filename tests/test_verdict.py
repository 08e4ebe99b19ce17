"""sam/verdict.py: the "gold-box" source on a hand-made table (box and gold verdicts: tests/test_segment.py)."""

import pytest
import torch

from sam.mask import keep_weights
from sam.parse import ParseResult
from sam.verdict import SOURCES, box_verdicts, expand_to_segments, gold_box_verdicts


def ok(*scores):
    return ParseResult("ok", scores=scores)


GOLD = {"initial": -1, "calibrated": 0, "final": 0}
# (parse, gold, label, gold-box correct, gold-box known, box correct)
TABLE = [
    # calibration changed the score (-1 -> 0) and the rollout followed it: box 1 is right against the gold initial
    # score but reads as wrong against the label
    (ok(-1, 0, 0), GOLD, 0, [1, 1, 1], [1, 1, 1], [0, 1, 1]),
    # the initial score copied the label: right for "box", wrong for "gold-box"
    (ok(0, 0, 0), GOLD, 0, [0, 1, 1], [1, 1, 1], [1, 1, 1]),
    # gold values of 0 (falsy) are still gold values
    (ok(0, 0, 1), {"initial": 0, "calibrated": 0}, 0, [1, 1, 0], [1, 1, 1], [1, 1, 0]),
    # malformed: nothing known
    (ParseResult("non_integer"), GOLD, 0, [0, 0, 0], [0, 0, 0], [0, 0, 0]),
    # well-formed but the wrong number of boxes for the format: nothing known
    (ok(0), GOLD, 0, [0, 0, 0], [0, 0, 0], [0, 0, 0]),
    # a record without gold: boxes 1 and 2 unknown, box 3 against the label
    (ok(1, 1, 2), None, 2, [0, 0, 1], [0, 0, 1], [0, 0, 1]),
    (ok(1, 1, 2), {}, 3, [0, 0, 0], [0, 0, 1], [0, 0, 0]),
    # a gold value missing for one box only
    (ok(1, 2, 3), {"initial": 1}, 2, [1, 0, 0], [1, 0, 1], [0, 1, 0]),
]


def table():
    parses, golds, labels, *expected = zip(*TABLE)
    return list(parses), list(golds), torch.tensor(labels), [torch.tensor(e, dtype=torch.bool) for e in expected]


def test_gold_box_table():
    parses, golds, labels, (correct, known, box_correct) = table()
    v = gold_box_verdicts(parses, golds, labels)
    assert v.correct.dtype == torch.bool and v.known.dtype == torch.bool
    assert v.correct.tolist() == correct.tolist()
    assert v.known.tolist() == known.tolist()
    assert not (v.correct & ~v.known).any()  # unknown verdicts read False
    box = box_verdicts(parses, labels)
    assert box.correct.tolist() == box_correct.tolist()


def test_gold_box_changes_what_sam_masks():
    # row 0 of the table, a correct rollout: "box" masks S1 (no exception), "gold-box" keeps it
    parses, golds, labels, _ = table()
    outcome, wf = torch.tensor([True]), torch.tensor([True])
    box = box_verdicts(parses[:1], labels[:1])
    gold_box = gold_box_verdicts(parses[:1], golds[:1], labels[:1])
    assert keep_weights(box.correct, outcome, wf, known=box.known, exception=False)[0].tolist() == [[0, 1, 1]]
    assert keep_weights(gold_box.correct, outcome, wf, known=gold_box.known, exception=False)[0].tolist() == [[1] * 3]


def test_gold_box_one_box_is_the_label():
    v = gold_box_verdicts([ok(2), ok(1), ParseResult("empty")], [GOLD, None, GOLD], torch.tensor([2, 2, 2]), 1)
    assert v.correct.tolist() == [[True], [False], [False]] and v.known.tolist() == [[True], [True], [False]]


def test_gold_box_expands_like_box():
    assert "gold-box" in SOURCES
    parses, golds, labels, _ = table()
    v = gold_box_verdicts(parses, golds, labels)
    for segmenter in ("boxes", "box_tokens", "steps", "none"):
        got = expand_to_segments(v, segmenter, source="gold-box")
        want = expand_to_segments(v, segmenter, source="box")
        assert torch.equal(got.correct, want.correct) and torch.equal(got.known, want.known)
    steps = expand_to_segments(v, "steps", source="gold-box")
    assert steps.correct[1].tolist() == [False] * 5 + [True, True]
    assert steps.known[7].tolist() == [True] * 5 + [False, True]


def test_bad_arguments():
    parses, golds, labels, _ = table()
    with pytest.raises(ValueError, match="num_boxes"):
        gold_box_verdicts(parses, golds, labels, num_boxes=4)
    with pytest.raises(ValueError, match="parses"):
        gold_box_verdicts(parses, golds[:-1], labels)
    with pytest.raises(ValueError, match="source must be"):
        expand_to_segments(gold_box_verdicts(parses, golds, labels), "boxes", source="gold_box")


def test_verdict_string_of_the_logged_validation_verdicts():
    from runtime.evaluate import verdict_string

    steps = [True, False, None, True, True, False, True]
    # the 7 steps as given, then boxes 1 and 2 against the label (0): box 1 (-1) wrong, box 2 (0) right
    assert verdict_string(steps, ok(-1, 0, 0), 0) == "10.1101" + "01"
    # malformed, or the wrong number of boxes: the box verdicts are unknown
    assert verdict_string([None] * 7, ParseResult("non_integer"), 0) == "." * 9
    assert verdict_string(steps, ok(0), 0) == "10.1101" + ".."
