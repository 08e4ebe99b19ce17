"""sam/prompt.py: the three formats, criteria as data, empty fields omitted, chat templates."""

import pytest

from data.schema import Record
from data.tokenizer import build_tokenizer
from sam.parse import parse_scores
from sam.prompt import (
    BUSINESS_RULES,
    CRITERIA_STEPS,
    GENERIC_STEPS,
    RUBRIC,
    load_rules,
    render_gold_reasoning,
    render_prompt,
)

GOLD = {
    "need": "broad",
    "subject": "ramen",
    "coverage": "partial",
    "query_category": "food",
    "note_category": "food",
    "hits": ["ramen"],
    "misses": ["vegan"],
    "initial": 2,
    "rule": "qualifier",
    "rule_text": "the note drops the qualifier vegan",
    "calibrated": 1,
}


def record(**over):
    note = {"title": "Ramen night", "content": "We ate ramen.", "tags": ["food"]}
    base = dict(
        id="r",
        query="vegan ramen",
        note=note,
        label=1,
        query_extra={"category": "food"},
        note_extra={"author": "Mia Chen"},
        gold=GOLD,
    )
    base.update(over)
    return Record(**base)


def test_criteria_prompt_has_every_criterion_and_the_input():
    text = render_prompt(record())
    for rule in BUSINESS_RULES.values():
        assert rule in text
    for name, instruction in CRITERIA_STEPS:
        assert name in text and instruction in text
    for line in RUBRIC.values():
        assert line in text
    for piece in (
        "Query: vegan ramen",
        "Query category: food",
        "Note title: Ramen night",
        "Note content: We ate ramen.",
        "Note tags: food",
        "Note author: Mia Chen",
    ):
        assert piece in text
    assert "Step 7:" in text and "Write nothing after the final box." in text


def test_empty_fields_are_omitted():
    text = render_prompt(record(note={"title": "", "content": "c", "tags": []}, query_extra={}, note_extra={}))
    assert "Note title" not in text and "Note tags" not in text and "Query category" not in text
    assert "Note author" not in text and "Note content: c" in text


def test_variants():
    generic = render_prompt(record(), "generic")
    assert all(instruction in generic for _, instruction in GENERIC_STEPS)
    assert not any(rule in generic for rule in BUSINESS_RULES.values())
    label = render_prompt(record(), "label")
    assert "Answer with the score only" in label and "Step 1" not in label
    with pytest.raises(ValueError, match="unknown prompt format"):
        render_prompt(record(), "cot")


def test_user_rules(tmp_path):
    text = render_prompt(record(), rules={"seasonal": "A note about the wrong season is 0."})
    assert "seasonal: A note about the wrong season is 0." in text
    assert BUSINESS_RULES["qualifier"] not in text
    path = tmp_path / "rules.json"
    path.write_text('{"seasonal": "Wrong season is 0."}')
    assert load_rules(path) == {"seasonal": "Wrong season is 0."}
    path.write_text('{"seasonal": 3}')
    with pytest.raises(ValueError, match="rules.json: rule 'seasonal'"):
        load_rules(path)
    path.write_text("[")
    with pytest.raises(ValueError, match="cannot read business rules"):
        load_rules(path)


def test_gold_traces_parse_in_every_format():
    r = record()
    assert parse_scores(render_gold_reasoning(r, "criteria"), "criteria").scores == (2, 1, 1)
    assert parse_scores(render_gold_reasoning(r, "generic"), "generic").scores == (1,)
    assert parse_scores(render_gold_reasoning(r, "label"), "label").scores == (1,)
    with pytest.raises(ValueError, match="gold is missing"):
        render_gold_reasoning(record(gold=None))


def test_chat_template_is_used_when_present():
    tok = build_tokenizer(["hello"])
    assert render_prompt(record(), tokenizer=tok).startswith("Judge how relevant")  # no template: plain text
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    text = render_prompt(record(), tokenizer=tok)
    assert text.startswith("<user>Judge how relevant") and text.endswith("</user><bot>")
