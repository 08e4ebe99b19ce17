"""sam/parse.py: the strict parser, case by case."""

import pytest

from sam.parse import STATUSES, parse_scores


def criteria(b5="\\boxed{3}", b6="\\boxed{2}", b7="\\boxed{2}", tail=""):
    return (
        "Step 1: The query has a broad need.\nStep 2: The share is large.\nStep 3: They match.\n"
        "Step 4: Keyword hits: ramen.\n"
        f"Step 5: The initial score is {b5}\nStep 6: Special case qualifier applies. {b6}\n"
        f"Step 7: The final score is {b7}{tail}"
    )


def test_well_formed_criteria():
    text = criteria()
    r = parse_scores(text)
    assert r.ok and r.scores == (3, 2, 2) and r.label == 2
    assert [text[a:b] for a, b in r.box_spans] == ["\\boxed{3}", "\\boxed{2}", "\\boxed{2}"]
    assert len(r.step_starts) == 7 and text[r.step_starts[4] :].startswith("Step 5:")


def test_negative_scores_and_trailing_whitespace():
    r = parse_scores(criteria("\\boxed{-1}", "\\boxed{-1}", "\\boxed{0}", tail="\n  \n"))
    assert r.ok and r.scores == (-1, -1, 0)


MALFORMED = [
    ("", "empty"),
    ("   \n", "empty"),
    (criteria().replace("\\boxed{2}", "2"), "wrong_box_count"),
    ("Step 1: no scores at all.", "no_box"),
    (criteria(b7="\\boxed{2 or 3}"), "non_integer"),
    (criteria(b7="\\boxed{}"), "non_integer"),
    (criteria(b7="\\boxed{ 2}"), "non_integer"),
    (criteria(b7="\\boxed{+2}"), "non_integer"),
    (criteria(b7="\\boxed{02}"), "non_integer"),
    (criteria(b7="\\boxed{2.0}"), "non_integer"),
    (criteria(b7="\\boxed{two}"), "non_integer"),
    (criteria(b7="\\boxed{\\boxed{2}}"), "malformed_box"),
    (criteria(b7="\\boxed{4}"), "out_of_range"),
    (criteria(b5="\\boxed{-2}"), "out_of_range"),
    (criteria(b7="\\boxed{2"), "malformed_box"),
    (criteria(b7="\\boxed 2"), "malformed_box"),
    (criteria(tail=" \\boxed{3}"), "wrong_box_count"),  # four boxes
    (criteria(tail="\nI hope this helps."), "trailing_text"),
    ("\\boxed{3}\\boxed{3}\\boxed{3}", "missing_steps"),  # bare boxes without the step headers
    ("Query: \\boxed{2} ramen\n" + criteria(b5="3"), "box_outside_step"),  # a box echoed from the query
    (criteria().replace("Step 4:", "Step 5:"), "missing_steps"),  # a repeated header
    (criteria().replace("Step 6:", "Step 6 -"), "missing_steps"),  # a missing header
    (criteria().replace("\nStep 3:", " Step 3:"), "missing_steps"),  # a header not at a line start
    (criteria(b6="no box here", b7="\\boxed{2} \\boxed{2}"), "box_outside_step"),  # two boxes in step 7
]


@pytest.mark.parametrize("text,status", MALFORMED)
def test_malformed_criteria(text, status):
    r = parse_scores(text)
    assert r.status == status, (r.status, r.detail)
    assert not r.ok and r.label is None and r.scores == () and r.detail


def test_generic_format():
    ok = "Step 1: It asks for ramen.\nStep 2: The note is about ramen.\nStep 3: Final score: \\boxed{3}"
    assert parse_scores(ok, "generic").scores == (3,)
    assert parse_scores(ok.replace("Step 3: Final", "Step 2b: Final"), "generic").status == "missing_steps"
    early = "Step 1: \\boxed{3}\nStep 2: The note.\nStep 3: Final score."
    assert parse_scores(early, "generic").status == "trailing_text"  # the later steps follow the box
    assert parse_scores(criteria(), "generic").status == "wrong_box_count"


def test_label_format():
    assert parse_scores("\\boxed{-1}", "label").scores == (-1,)
    assert parse_scores("  \\boxed{2}\n", "label").ok
    assert parse_scores("The score is \\boxed{2}", "label").status == "trailing_text"
    assert parse_scores("\\boxed{2}\\boxed{2}", "label").status == "wrong_box_count"


def test_every_failure_status_is_exercised():
    assert {status for _, status in MALFORMED} == set(STATUSES) - {"ok"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown format"):
        parse_scores("\\boxed{1}", "json")
    with pytest.raises(TypeError):
        parse_scores(None)
