"""Per-segment correctness verdicts, with unknowns explicit.

A `Verdicts` holds two (B, S) bool tensors: `correct` and `known`. Where `known` is False the verdict is unknown
(malformed completion, a step whose claim cannot be read, a record without gold values) and `correct` is False;
masking never acts on an unknown verdict.

Sources:
- "box" (the paper): each boxed score against the gold label, c_k = 1{y_k = l}. For the criteria format that is
  (B, 3), one per box; `expand_to_segments` maps it onto other segmentations (steps 1-5 take box 1's verdict,
  step 6 box 2's, step 7 box 3's).
- "gold" (finer than the paper): each of the 7 steps' claims read from the completion and compared with the
  record's gold value (need, coverage, category match, keyword hits and misses, initial, calibrated, final).
"""

import re
from dataclasses import dataclass

import torch

from sam.parse import ParseResult
from sam.segment import num_segments

SOURCES = ("box", "gold")


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


_STEP = re.compile(r"^Step (\d+):(.*)$", re.MULTILINE)
_COVERAGE = re.compile(r"\b(large|partial|mention|none)\b")
_HITS = re.compile(r"Keyword hits: (.*?)\. Keyword misses: (.*?)\.\s*$")


def _listed(text: str) -> set[str] | None:
    text = text.strip()
    return set() if text == "none" else {x.strip() for x in text.split(",") if x.strip()}


def _step_claims(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in _STEP.finditer(text)}


def gold_verdicts(texts: list[str], parses: list[ParseResult], golds: list[dict | None]) -> Verdicts:
    """(B, 7) verdicts of the criteria format's steps against gold values; unknown where a claim is unreadable."""
    B = len(texts)
    correct = torch.zeros(B, 7, dtype=torch.bool)
    known = torch.zeros(B, 7, dtype=torch.bool)
    for b, (text, parse, gold) in enumerate(zip(texts, parses, golds)):
        if not parse.ok or not gold:
            continue
        claims = _step_claims(text)
        checks: dict[int, bool | None] = {}
        # step 1: the need
        need = re.findall(r"\b(precise|broad)\b", claims.get(1, ""))
        checks[1] = (need[0] == gold.get("need")) if len(need) == 1 and "need" in gold else None
        # step 2: the coverage level
        cov = _COVERAGE.findall(claims.get(2, ""))
        checks[2] = (cov[-1] == gold.get("coverage")) if cov and "coverage" in gold else None
        # step 3: category match
        match = re.findall(r"\b(match|differ)\b", claims.get(3, ""))
        if match and "query_category" in gold and "note_category" in gold:
            checks[3] = (match[-1] == "match") == (gold["query_category"] == gold["note_category"])
        else:
            checks[3] = None
        # step 4: keyword hits and misses
        hm = _HITS.search(claims.get(4, ""))
        if hm and "hits" in gold and "misses" in gold:
            checks[4] = _listed(hm.group(1)) == set(gold["hits"]) and _listed(hm.group(2)) == set(gold["misses"])
        else:
            checks[4] = None
        # steps 5-7: the boxes against the gold initial, calibrated and final scores
        for step, key, score in zip((5, 6, 7), ("initial", "calibrated", "final"), parse.scores):
            checks[step] = (score == gold[key]) if key in gold else None
        for step, verdict in checks.items():
            if verdict is not None:
                known[b, step - 1] = True
                correct[b, step - 1] = verdict
    return Verdicts(correct, known)


def expand_to_segments(verdicts: Verdicts, segmenter: str, fmt: str = "criteria", source: str = "box") -> Verdicts:
    """Map box (B, 3) or gold step (B, 7) verdicts onto the segments of `segmenter`.

    box -> steps: steps 1-5 take box 1, step 6 box 2, step 7 box 3. gold -> boxes: S1 (steps 1-5) is correct iff
    every known step in it is correct (unknown if none is known); S2 = step 6; S3 = step 7. box_tokens uses one
    verdict per box (text segments are always kept by the `token` policy). none: the last box / step (the outcome).
    """
    S = num_segments(segmenter, fmt)
    c, k = verdicts.correct, verdicts.known
    if fmt != "criteria":
        # one box: the only verdict is the outcome itself
        return Verdicts(c[:, -1:].expand(-1, S).clone(), k[:, -1:].expand(-1, S).clone())
    if source == "box":
        if segmenter in ("boxes", "box_tokens"):
            return Verdicts(c, k)
        if segmenter == "steps":
            index = torch.tensor([0, 0, 0, 0, 0, 1, 2])
            return Verdicts(c[:, index], k[:, index])
        return Verdicts(c[:, -1:], k[:, -1:])
    if segmenter == "steps":
        return Verdicts(c, k)
    if segmenter in ("boxes", "box_tokens"):
        k1 = k[:, :5].any(dim=1)
        c1 = k1 & ~(k[:, :5] & ~c[:, :5]).any(dim=1)
        return Verdicts(torch.stack([c1, c[:, 5], c[:, 6]], 1), torch.stack([k1, k[:, 5], k[:, 6]], 1))
    return Verdicts(c[:, -1:], k[:, -1:])
