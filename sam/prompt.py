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

# The seven steps of the criteria format: (short name, instruction). Each step's answer is a closed word or number
# (render_criteria_trace shows the exact wording), so every step can be checked against gold values.
CRITERIA_STEPS = (
    (
        "query need",
        "Write `need precise` if the query has one clear intent (a question, a product, a price), else `need broad`.",
    ),
    (
        "coverage",
        "Write `coverage`, the query's subject, and how many of the note's 8 sentences name it: large (4 or "
        "more), partial (2 or 3), mention (1) or none (0).",
    ),
    (
        "category",
        "Write `category`, the query's category, and `match` if it is the note's category, else `differ`.",
    ),
    ("keywords", "Write `keywords H of K`: how many of the query's K keywords appear in the note."),
    ("initial score", "Write `initial` and the rubric score as \\boxed{k}. Do not use the special cases here."),
    (
        "calibration",
        "Write the business special case and its outcome (e.g. `qualifier dropped`), or `no case`, "
        "then the calibrated score as \\boxed{k} (the initial score again if the case keeps it).",
    ),
    ("final score", "Write `final` and the final score as \\boxed{k}."),
)

GENERIC_STEPS = (
    ("query", "Work out what the query asks for."),
    ("note", "Work out what the note offers."),
    ("final score", "Judge how relevant the note is to the query and give the score as \\boxed{k}."),
)

# Business special cases for step 6: name -> description. Names match the query types of the built-in benchmark;
# the note's detail line (style, comparison, list, answer, price, place, model, author) is the evidence. A case
# applies whatever the initial score; it changes the score only where the description says so.
BUSINESS_RULES = {
    "qualifier": "The query has a qualifier. The note's style equal to it: kept, keep the score. Another style: "
    "dropped, lower a score of 2 or more by one.",
    "comparison": "The query compares two things. The note also compares the query's other one: both, keep the "
    "score. Something else: one side, lower a score of 2 or more by one.",
    "ranking": "The query asks for a top list. The note's list has that many picks: full, keep the score. Another "
    "number: short, lower a score of 2 or more by one.",
    "question": "The query asks how to do something. The note explains that: answered, keep the score. It explains "
    "something else: not answered, the score is at most 1.",
    "numeric": "The query names a price. The note's price equal to it: match, keep the score. Another price: off, "
    "lower a score of 2 or more by one.",
    "place": "The query names a place. The note's place is it: guide, keep the score. Another place: other place, "
    "the score is at most 0.",
    "product": "The query names a product model. The same model: details, keep the score. Another model of the "
    "brand: other model, the score is at most 1.",
    "author": "The query names an author. The note's author exactly: exact, keep the score. Same first name only: "
    "partial, the score is at most 1.",
}


def load_rules(path: str | Path) -> dict[str, str]:
    """Business rules from a JSON object {name: description}; raises ValueError naming the file and the problem."""
    path = Path(path)
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read business rules: {exc}") from None
    return check_rules(rules, str(path))


def check_rules(rules, where: str) -> dict[str, str]:
    """`rules` if it is a non-empty {name: description} object of strings; else ValueError naming `where`."""
    if not isinstance(rules, dict) or not rules:
        raise ValueError(f"{where}: business rules must be a non-empty JSON object {{name: description}}")
    for name, text in rules.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: rule {name!r} must have a non-empty string description")
    return rules


def _input_block(record) -> str:
    """The note's fields, then the query and its side information; empty fields are omitted. The query comes
    last, next to where the answer starts: every step of the reasoning compares the note with it."""
    lines = []
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
    lines.append(f"Query: {record.query}")
    for key, value in sorted(record.query_extra.items()):
        if value not in ("", None, [], {}):
            lines.append(f"Query {key}: {value}")
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
        return (
            head
            + "Reason in three steps, each on a new line starting with its header:\n"
            + steps
            + ("\nWrite nothing after the final box.")
        )
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


def render_criteria_trace(
    *,
    need: str,
    subject: str,
    coverage: str,
    category: str,
    match: bool,
    hits: int,
    keywords: int,
    initial: int,
    rule: str | None,
    case: str | None,
    calibrated: int,
    final: int,
) -> str:
    """The criteria format's 7 steps from step values, in closed words (no free text; steps 2 and 3 copy one word):

        Step 1: need broad                 (precise | broad)
        Step 2: coverage ramen partial     (the query's subject; large | partial | mention | none)
        Step 3: category food match        (the query's category; match | differ)
        Step 4: keywords 1 of 2            (query keywords found in the note, of all query keywords)
        Step 5: initial \\boxed{2}
        Step 6: qualifier dropped \\boxed{1}   (rule and case, or "no case")
        Step 7: final \\boxed{1}

    Every step is checkable against gold values (sam/verdict.py reads these words), and a small model can write
    it. Steps 2 and 3 first name what they judge, copied from the prompt's `Query subject` and `Query category`
    lines (one word each): the level and the verdict are then read at a word the model has just written, where a
    reader (runtime/reader.py) holds how often that word occurs in the note. Without the copy, the `tiny` model had
    to find the subject and count its mentions from one token, and never did (docs/LOG.md, 2026-12-02).
    """
    step6 = f"{rule} {case}" if rule else "no case"
    return (
        f"Step 1: need {need}\n"
        f"Step 2: coverage {subject} {coverage}\n"
        f"Step 3: category {category} {'match' if match else 'differ'}\n"
        f"Step 4: keywords {hits} of {keywords}\n"
        f"Step 5: initial \\boxed{{{initial}}}\n"
        f"Step 6: {step6} \\boxed{{{calibrated}}}\n"
        f"Step 7: final \\boxed{{{final}}}"
    )


def render_gold_reasoning(record, fmt: str = "criteria") -> str:
    """The gold completion for `fmt` from the record's gold step values (built-in benchmark records carry them).

    Needs gold keys: need, subject, coverage, query_category, note_category, hits, misses, initial, calibrated (and
    rule, case when a business rule applies) for "criteria" and "generic"; the label alone suffices for "label".
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {FORMATS}")
    if fmt == "label":
        return render_label(record.label)
    gold = record.gold or {}
    needed = ("need", "subject", "coverage", "query_category", "note_category", "hits", "misses", "initial")
    needed += ("calibrated",)
    missing = [k for k in needed if k not in gold]
    if missing:
        raise ValueError(f"record {record.id}: gold is missing {missing}; cannot render a reasoning trace")
    match = gold["query_category"] == gold["note_category"]
    hits, keywords = len(gold["hits"]), len(gold["hits"]) + len(gold["misses"])
    if fmt == "generic":
        return (
            f"Step 1: need {gold['need']}\n"
            f"Step 2: coverage {gold['subject']} {gold['coverage']}, category {gold['query_category']} "
            f"{'match' if match else 'differ'}, keywords {hits} of {keywords}\n"
            f"Step 3: final \\boxed{{{record.label}}}"
        )
    return render_criteria_trace(
        need=gold["need"],
        subject=gold["subject"],
        coverage=gold["coverage"],
        category=gold["query_category"],
        match=match,
        hits=hits,
        keywords=keywords,
        initial=gold["initial"],
        rule=gold.get("rule"),
        case=gold.get("case"),
        calibrated=gold["calibrated"],
        final=record.label,
    )
