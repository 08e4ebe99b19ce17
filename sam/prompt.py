"""The criteria-augmented multi-step prompt and reasoning format (PAPER.md), plus the ablation variants.

Formats (`fmt`):
- "criteria": the paper's 7 steps with 3 boxed scores (initial, calibrated, final); the label is the third box.
- "generic":  a domain-agnostic 3-step variant with one final box, for the prompt ablation.
- "label":    answer `\\boxed{k}` directly (the SFT-Label baseline).

A completion in every format is a sequence of lines; the step formats start each step with a header line
`Step k: ...` (k = 1..7 or 1..3) at the start of a line, and nothing may follow the final box but whitespace. The
strict parser in `sam/parse.py` enforces exactly this.

The rubric, the steps and the business rules are data (module-level tables, or a JSON file loaded with
`load_rules`), so a user can supply their own business rules without touching code. Prompts use the tokenizer's
chat template when it has one, plain text otherwise.
"""

import json
from pathlib import Path

FORMATS = ("criteria", "generic", "label")
LABELS = (-1, 0, 1, 2, 3)
NUM_STEPS = {"criteria": 7, "generic": 3, "label": 0}
NUM_BOXES = {"criteria": 3, "generic": 1, "label": 1}

# The label rubric (PAPER.md, "Label scale").
RUBRIC = {
    3: "the note satisfies the main need and is largely (more than 80 percent) about the query",
    2: "the note meets the main need with partial (10 to 80 percent) coverage, or meets a secondary need",
    1: "the need is barely met: the query is only mentioned, or less than 10 percent of the note is about it",
    0: "the need is not met, but the categories match or query keywords appear, or the note is only tangential",
    -1: "the need is not met, the categories differ and no query keyword appears",
}

# The seven steps of the criteria format: (short name used in the step header, instruction).
CRITERIA_STEPS = (
    ("query need", "Decide whether the query has a precise need (one clear intent) or a broad need (a primary "
     "need and secondary needs)."),
    ("coverage", "Estimate how much of the note is about the query: large, partial, mention or none."),
    ("category", "Compare the category of the query with the category of the note."),
    ("keywords", "List the query keywords the note hits and the ones it misses; a near miss counts as a miss."),
    ("initial score", "Give the initial score on the rubric as \\boxed{k}. Do not use the special cases here."),
    ("calibration", "Check the business special cases below. If one applies, give the calibrated score as "
     "\\boxed{k}; otherwise repeat the initial score in a box."),
    ("final score", "Give the final score as \\boxed{k}."),
)  # fmt: skip

GENERIC_STEPS = (
    ("query", "Work out what the query asks for."),
    ("note", "Work out what the note offers."),
    ("final score", "Judge how relevant the note is to the query and give the score as \\boxed{k}."),
)

# Business special cases for step 6: name -> description. Names match the query types of the built-in benchmark.
BUSINESS_RULES = {
    "qualifier": "The query has a qualifier. If the note keeps it, keep the score; if the note drops it, lower "
    "the score by one (not below 1); if the note contradicts it, the score is 0.",
    "comparison": "The query compares two things. If the note covers both, keep the score; if it covers only "
    "one side, lower the score by one (not below 1).",
    "ranking": "The query asks for a ranking. A note listing three or more items keeps its score; two items lower "
    "it by one (not below 1); a single item makes it 1.",
    "question": "The query is a question. If the note answers it directly, keep the score; otherwise the score is "
    "at most 1.",
    "numeric": "The query has a number (a price limit). If the note gives a matching number, keep the score; if "
    "it gives none, lower the score by one (not below 1).",
    "place": "The query names a place. A guide for that place keeps its score; a note about another place is 0.",
    "product": "The query names a product. Details of that product keep the score; a note that only mentions "
    "using it for something else is 1.",
    "author": "The query names an author. A note by exactly that author keeps its score; a partial name match is 1.",
}


def load_rules(path: str | Path) -> dict[str, str]:
    """Business rules from a JSON object {name: description}; raises ValueError naming the file and the problem."""
    path = Path(path)
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read business rules: {exc}") from None
    if not isinstance(rules, dict) or not rules:
        raise ValueError(f"{path}: business rules must be a non-empty JSON object {{name: description}}")
    for name, text in rules.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: rule {name!r} must have a non-empty string description")
    return rules


def _input_block(record) -> str:
    """The query, its side information and the note's fields; empty fields are omitted."""
    lines = [f"Query: {record.query}"]
    for key, value in sorted(record.query_extra.items()):
        if value not in ("", None, [], {}):
            lines.append(f"Query {key}: {value}")
    note = record.note
    for key in ("title", "content"):
        if note.get(key):
            lines.append(f"Note {key}: {note[key]}")
    if note.get("tags"):
        lines.append("Note tags: " + ", ".join(note["tags"]))
    for key, value in sorted(note.items()):
        if key not in ("title", "content", "tags") and value:
            lines.append(f"Note {key}: {value}")
    for key, value in sorted(record.note_extra.items()):
        if value not in ("", None, [], {}):
            lines.append(f"Note {key}: {value}")
    return "\n".join(lines)


def instruction(fmt: str = "criteria", rules: dict[str, str] | None = None) -> str:
    """The task text for `fmt` (everything but the input block)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {FORMATS}")
    rubric = "\n".join(f"{k}: {RUBRIC[k]}" for k in sorted(RUBRIC, reverse=True))
    head = (
        "Judge how relevant a note is to a search query. Scores:\n" + rubric + "\n"
        if fmt != "generic"
        else "Judge how relevant a note is to a search query, with a score from -1 (irrelevant) to 3 (fully "
        "relevant).\n"
    )
    if fmt == "label":
        return head + "Answer with the score only, as \\boxed{k}."
    if fmt == "generic":
        steps = "\n".join(f"Step {i}: ({name}) {text}" for i, (name, text) in enumerate(GENERIC_STEPS, 1))
        return head + "Reason in three steps, each on a new line starting with its header:\n" + steps + (
            "\nWrite nothing after the final box."
        )  # fmt: skip
    rules = BUSINESS_RULES if rules is None else rules
    steps = "\n".join(f"Step {i}: ({name}) {text}" for i, (name, text) in enumerate(CRITERIA_STEPS, 1))
    cases = "\n".join(f"- {name}: {text}" for name, text in rules.items())
    return (
        head
        + "Reason in seven steps, each on a new line starting with its header:\n"
        + steps
        + "\nBusiness special cases (step 6 only):\n"
        + cases
        + "\nWrite nothing after the final box."
    )


def render_prompt(
    record, fmt: str = "criteria", *, tokenizer=None, rules: dict[str, str] | None = None, with_instruction=True
) -> str:
    """The full prompt for one record; with a tokenizer that has a chat template, wrapped as a user turn.

    `with_instruction=False` leaves out the task text (rubric, steps, rules) and keeps the input block only: the
    instruction is the same for every record, so a model trained from random weights learns nothing from it
    while it costs most of the prompt's tokens (about 640 of 770 for the criteria format with the built-in
    tokenizer). The reasoning format is still taught by the traces. Pretrained models should keep it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {FORMATS}")
    head = instruction(fmt, rules) + "\n\n" if with_instruction else ""
    text = head + _input_block(record) + "\n\nAnswer:\n"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text.rstrip()}], tokenize=False, add_generation_prompt=True
        )
    return text


def render_label(label: int) -> str:
    """The whole completion of the label-only format: the boxed score."""
    return f"\\boxed{{{label}}}"


def render_gold_reasoning(record, fmt: str = "criteria") -> str:
    """The gold completion for `fmt` from the record's gold step values (built-in benchmark records carry them).

    Needs gold keys: need, coverage, query_category, note_category, hits, misses, initial, rule, rule_text,
    calibrated ("criteria"); the label alone suffices for "label".
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {FORMATS}")
    if fmt == "label":
        return render_label(record.label)
    gold = record.gold or {}
    missing = [k for k in ("need", "coverage", "query_category", "note_category", "hits", "misses") if k not in gold]
    if missing:
        raise ValueError(f"record {record.id}: gold is missing {missing}; cannot render a reasoning trace")
    need = "a precise need (one clear intent)" if gold["need"] == "precise" else "a broad need"
    hits = ", ".join(gold["hits"]) or "none"
    misses = ", ".join(gold["misses"]) or "none"
    match = "they match" if gold["query_category"] == gold["note_category"] else "they differ"
    if fmt == "generic":
        return (
            f"Step 1: The query {record.query} has {need}.\n"
            f"Step 2: The note is about {gold['note_category']}; the share about the query is {gold['coverage']}, "
            f"keyword hits: {hits}.\n"
            f"Step 3: Final score: \\boxed{{{record.label}}}"
        )
    initial, calibrated = gold["initial"], gold["calibrated"]
    if gold.get("rule"):
        verdict = f"stays at {initial}" if calibrated == initial else f"goes from {initial} to {calibrated}"
        step6 = f"Special case {gold['rule']}: {gold['rule_text']}, so the score {verdict}."
    else:
        step6 = "No special case applies, so the score stays the same."
    return (
        f"Step 1: The query {record.query} has {need}.\n"
        f"Step 2: The share of the note about the query is {gold['coverage']}.\n"
        f"Step 3: The query category is {gold['query_category']} and the note category is "
        f"{gold['note_category']}: {match}.\n"
        f"Step 4: Keyword hits: {hits}. Keyword misses: {misses}.\n"
        f"Step 5: By the rubric the initial score is \\boxed{{{initial}}}\n"
        f"Step 6: {step6} \\boxed{{{calibrated}}}\n"
        f"Step 7: The final score is \\boxed{{{record.label}}}"
    )
