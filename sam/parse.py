"""Strict parser of completions: boxed scores -> (initial, calibrated, final) with character spans, or a failure.

Well-formed, for each format (see sam/prompt.py):
- "criteria": step headers `Step 1:` .. `Step 7:` each exactly once, in order, each at the start of a line;
  exactly three boxes `\\boxed{k}`, the first inside step 5, the second inside step 6, the third inside step 7;
- "generic": headers `Step 1:` .. `Step 3:` likewise, exactly one box, inside step 3;
- "label": exactly one box and nothing else but whitespace.
In every format: each box holds one integer written plainly (`-1`, `0`, ... no spaces, signs other than a leading
minus, or leading zeros), in -1..3; nothing but whitespace after the last box; no `\\boxed` that is not a
complete `\\boxed{...}`. Anything else is a named failure, never a generous reading: `\\boxed{2 or 3}` is
non_integer, four boxes is wrong_box_count, a box echoed from the query before step 1 is box_outside_step, bare
boxes with no step headers are missing_steps.
"""

import re
from dataclasses import dataclass, field

from sam.prompt import FORMATS, LABELS, NUM_BOXES, NUM_STEPS

STATUSES = (
    "ok",
    "empty",  # nothing but whitespace
    "no_box",  # no \boxed{...} at all
    "malformed_box",  # \boxed not followed by a complete {...}
    "wrong_box_count",  # more or fewer boxes than the format has
    "non_integer",  # a box holding anything but a plain integer (empty box included)
    "out_of_range",  # an integer outside -1..3
    "missing_steps",  # step headers absent, repeated or out of order
    "box_outside_step",  # a box not in the step it belongs to
    "trailing_text",  # non-whitespace after the final box
)

_BOX = re.compile(r"\\boxed\{([^{}]*)\}")
_BOXED_WORD = re.compile(r"\\boxed")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_HEADER = re.compile(r"^Step (\d+):", re.MULTILINE)
# the step each box must sit in, per format
_BOX_STEPS = {"criteria": (5, 6, 7), "generic": (3,)}


@dataclass(frozen=True)
class ParseResult:
    status: str
    scores: tuple[int, ...] = ()  # the boxed integers in order (criteria: initial, calibrated, final)
    box_spans: tuple[tuple[int, int], ...] = ()  # [start, end) character span of each whole `\boxed{k}`
    step_starts: tuple[int, ...] = ()  # character offset of each step header (step formats)
    detail: str = field(default="", compare=False)  # human-readable reason for a failure

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> int | None:
        """The final score (the last box), or None when malformed."""
        return self.scores[-1] if self.ok else None


def _fail(status: str, detail: str) -> ParseResult:
    return ParseResult(status=status, detail=detail)


def parse_scores(text: str, fmt: str = "criteria") -> ParseResult:
    """Parse a completion in format `fmt` strictly; see the module docstring for what is well-formed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not isinstance(text, str):
        raise TypeError(f"parse_scores expects a string, got {type(text).__name__}")
    if not text.strip():
        return _fail("empty", "the completion is empty")

    boxes = list(_BOX.finditer(text))
    n_words = len(_BOXED_WORD.findall(text))
    if n_words == 0:
        return _fail("no_box", "no \\boxed{...} in the completion")
    if n_words != len(boxes):
        return _fail("malformed_box", f"{n_words - len(boxes)} \\boxed without a complete {{...}}")
    if len(boxes) != NUM_BOXES[fmt]:
        return _fail("wrong_box_count", f"{len(boxes)} boxes, the {fmt} format has {NUM_BOXES[fmt]}")
    scores = []
    for box in boxes:
        content = box.group(1)
        if not _INTEGER.fullmatch(content):
            return _fail("non_integer", f"box holds {content!r}, not a plain integer")
        value = int(content)
        if value not in LABELS:
            return _fail("out_of_range", f"score {value} is outside -1..3")
        scores.append(value)
    if text[boxes[-1].end() :].strip():
        return _fail("trailing_text", "text after the final box")
    spans = tuple((b.start(), b.end()) for b in boxes)

    if fmt == "label":
        if text[: boxes[0].start()].strip():
            return _fail("trailing_text", "the label format allows nothing but the box")
        return ParseResult("ok", tuple(scores), spans)

    headers = list(_HEADER.finditer(text))
    numbers = [int(h.group(1)) for h in headers]
    if numbers != list(range(1, NUM_STEPS[fmt] + 1)):
        return _fail("missing_steps", f"step headers {numbers}, expected 1..{NUM_STEPS[fmt]} in order")
    starts = [h.start() for h in headers] + [len(text)]
    for box, step in zip(boxes, _BOX_STEPS[fmt]):
        lo, hi = starts[step - 1], starts[step]
        if not (lo <= box.start() and box.end() <= hi):
            return _fail("box_outside_step", f"box {box.group(0)} is not inside step {step}")
    return ParseResult("ok", tuple(scores), spans, tuple(starts[:-1]))
