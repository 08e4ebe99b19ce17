"""Per-segment correctness verdicts, with unknowns explicit.

A `Verdicts` holds two (B, S) bool tensors: `correct` and `known`. Where `known` is False the verdict is unknown
(malformed completion, a step whose claim cannot be read, a record without gold values) and `correct` is False;
masking never acts on an unknown verdict.

Sources:
- "box" (the paper): each boxed score against the gold label, c_k = 1{y_k = l}. For the criteria format that is
  (B, 3), one per box; `expand_to_segments` maps it onto other segmentations (steps 1-5 take box 1's verdict,
  step 6 box 2's, step 7 box 3's).
- "gold" (finer than the paper): each of the 7 steps' claims read from the completion and compared with the
  record's gold value (need, subject and coverage, query category and match, keyword hits and misses, initial,
  calibrated, final).
- "gold-box": box-shaped (B, 3) like "box", but each intermediate box against its own gold value: box 1 against the
  record's gold initial score, box 2 against the gold calibrated score, box 3 against the label. Under "box" a
  correct initial score that calibration then changes (initial != label) reads as wrong, so SAM would mask a
  right step in a correct rollout; "gold-box" judges each box by what that step should have said.
"""

import re
from dataclasses import dataclass

import torch

from sam.parse import ParseResult
from sam.segment import Layout

SOURCES = ("box", "gold", "gold-box")


@dataclass
class Verdicts:
    correct: torch.Tensor  # (B, S) bool
    known: torch.Tensor  # (B, S) bool


def box_verdicts(parses: list[ParseResult], labels: torch.Tensor, num_boxes: int = 3) -> Verdicts:
    """Each boxed score against the gold label; unknown for malformed completions."""
    labels = labels.cpu().tolist()
    correct = torch.zeros(len(parses), num_boxes, dtype=torch.bool)
    known = torch.zeros(len(parses), num_boxes, dtype=torch.bool)
    for b, (parse, label) in enumerate(zip(parses, labels)):
        if parse.ok and len(parse.scores) == num_boxes:
            correct[b] = torch.tensor([s == label for s in parse.scores])
            known[b] = True
    return Verdicts(correct, known)


# the gold key each intermediate box is judged against under "gold-box"; the last box is judged against the label
_GOLD_BOX_KEYS = ("initial", "calibrated")


def gold_box_verdicts(
    parses: list[ParseResult], golds: list[dict | None], labels: torch.Tensor, num_boxes: int = 3
) -> Verdicts:
    """(B, num_boxes) verdicts: box k < last against gold[("initial", "calibrated")[k]], the last box against the
    label. Unknown for a malformed completion (all boxes) and, per box, where the record has no gold value for it
    (a record without gold keeps box 3 known against its label): no verdict is guessed."""
    if not 1 <= num_boxes <= len(_GOLD_BOX_KEYS) + 1:
        raise ValueError(f"gold_box_verdicts: num_boxes must be in 1..{len(_GOLD_BOX_KEYS) + 1}, got {num_boxes}")
    if len(golds) != len(parses) or labels.shape != (len(parses),):
        raise ValueError(f"gold_box_verdicts: {len(parses)} parses, {len(golds)} golds, labels {tuple(labels.shape)}")
    labels = labels.cpu().tolist()
    keys = _GOLD_BOX_KEYS[: num_boxes - 1]
    correct = torch.zeros(len(parses), num_boxes, dtype=torch.bool)
    known = torch.zeros(len(parses), num_boxes, dtype=torch.bool)
    for b, (parse, gold, label) in enumerate(zip(parses, golds, labels)):
        if not parse.ok or len(parse.scores) != num_boxes:
            continue  # malformed: every box unknown
        gold = gold or {}
        targets = [gold.get(key) for key in keys] + [label]  # None: no gold value for this box
        for k, (score, target) in enumerate(zip(parse.scores, targets)):
            if target is not None:
                known[b, k] = True
                correct[b, k] = score == target
    return Verdicts(correct, known)


_STEP = re.compile(r"^Step (\d+):(.*)$", re.MULTILINE)
# each step's claim, in the closed words of sam.prompt.render_criteria_trace; a claim that does not read exactly
# like this is unknown, never wrong: a step is judged on what it says, not on its wording
_CLAIMS = {
    1: re.compile(r"^ need (precise|broad)$"),
    2: re.compile(r"^ coverage (\S+) (large|partial|mention|none)$"),
    3: re.compile(r"^ category (\S+) (match|differ)$"),
    4: re.compile(r"^ keywords (\d+) of (\d+)$"),
}


def _step_claims(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2).rstrip() for m in _STEP.finditer(text)}


def gold_verdicts(texts: list[str], parses: list[ParseResult], golds: list[dict | None]) -> Verdicts:
    """(B, 7) verdicts of the criteria format's steps against gold values; unknown where a claim is unreadable.

    Steps 1-4 are closed words (need; the subject and its coverage level; the query's category and whether it
    matches; the number of keyword hits of the query's keywords); steps 5-7 are the boxes against the gold
    initial, calibrated and final scores. Only checkable claims are judged: a step whose text does not read as
    its closed form, or whose gold value is missing, is unknown (and masking never acts on it)."""
    B = len(texts)
    correct = torch.zeros(B, 7, dtype=torch.bool)
    known = torch.zeros(B, 7, dtype=torch.bool)
    for b, (text, parse, gold) in enumerate(zip(texts, parses, golds)):
        if not parse.ok or not gold:
            continue
        claims = _step_claims(text)
        read = {k: pattern.match(claims.get(k, "")) for k, pattern in _CLAIMS.items()}
        checks: dict[int, bool | None] = dict.fromkeys(range(1, 8))
        if read[1] and "need" in gold:
            checks[1] = read[1].group(1) == gold["need"]
        # steps 2 and 3 name what they judge first: judging the wrong subject or category is a wrong step
        if read[2] and "coverage" in gold:
            same = read[2].group(1) == gold["subject"] if "subject" in gold else True
            checks[2] = same and read[2].group(2) == gold["coverage"]
        if read[3] and "query_category" in gold and "note_category" in gold:
            match = gold["query_category"] == gold["note_category"]
            checks[3] = read[3].group(1) == gold["query_category"] and (read[3].group(2) == "match") == match
        if read[4] and "hits" in gold and "misses" in gold:
            hits, total = len(gold["hits"]), len(gold["hits"]) + len(gold["misses"])
            checks[4] = (int(read[4].group(1)), int(read[4].group(2))) == (hits, total)
        for step, key, score in zip((5, 6, 7), ("initial", "calibrated", "final"), parse.scores):
            checks[step] = (score == gold[key]) if key in gold else None
        for step, verdict in checks.items():
            if verdict is not None:
                known[b, step - 1] = True
                correct[b, step - 1] = verdict
    return Verdicts(correct, known)


def expand_to_segments(verdicts: Verdicts, segmenter: str, fmt: str = "criteria", source: str = "box") -> Verdicts:
    """Map box (B, K) or gold step (B, 7) verdicts onto the verdict columns of a segmentation (sam.segment.Layout:
    one per segment, one per box under box_tokens, whose text segments the `token` policy always keeps).

    Box-shaped verdicts ("box", "gold-box") go through `Layout.box_columns` (under steps: steps 1-5 take box 1,
    step 6 box 2, step 7 box 3; none: the last box, the outcome). Gold step verdicts go through
    `Layout.step_groups`: a column over several steps (S1 = steps 1-5 under boxes) is correct iff every known step
    in it is correct, and unknown if none is known. In a format with one box the only verdict is the outcome.
    """
    if source not in SOURCES:
        raise ValueError(f"expand_to_segments: source must be one of {SOURCES}, got {source!r}")
    layout = Layout(segmenter, fmt)
    c, k = verdicts.correct, verdicts.known
    if fmt != "criteria" or source in ("box", "gold-box"):  # one verdict per box
        index = torch.tensor(layout.box_columns if fmt == "criteria" else (c.shape[1] - 1,) * layout.verdict_width)
        return Verdicts(c[:, index], k[:, index])
    cols_c, cols_k = [], []
    for steps in layout.step_groups:
        index = torch.tensor([s - 1 for s in steps])
        known = k[:, index].any(dim=1)
        cols_k.append(known)
        cols_c.append(known & ~(k[:, index] & ~c[:, index]).any(dim=1))
    return Verdicts(torch.stack(cols_c, 1), torch.stack(cols_k, 1))
