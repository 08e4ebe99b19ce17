"""Completion -> per-token step segment ids, cut on character offsets (never on token-id patterns).

Segmenters (S = number of segments, fixed per segmenter and format so a batch forms a (B, S) keep matrix):
- "boxes":      the paper's S1 | S2 | S3, each ending right after its box (S = number of boxes: 3 for criteria);
- "steps":      one segment per reasoning step, cut at each step header (S = 7 for criteria, 3 for generic);
- "box_tokens": text and box tokens alternate: [text][box 1][text][box 2][text][box 3 + rest] (S = 2 * boxes);
                the `token` masking policy needs this layout to reach the score tokens alone;
- "none":       one segment.
A token belongs to the segment in which its first character lies, so a token that spans a cut (a byte-level BPE
merge of "}" and "\\n", say) stays with the box it closes, and a multi-token box such as `\\boxed{-1}` stays whole
(the author's code assumed 5 tokens per box; that bug is avoided by construction). The one exception is the cut
where a box *begins* (box_tokens): byte-level BPE glues the space before a box to its backslash (`Ġ\\` in SmolLM2's
and Qwen2's tokenizers), and that token belongs to the box, so a token joins the box when any of its characters
lies in it. Tokens that decode to no
text (EOS) belong to the segment at the end of the text: the last one. Malformed completions get a single
segment (id 0 everywhere). Response tokens get ids 0..S-1 partitioning the response exactly; everything else
(prompt, padding) gets -1.
"""

from dataclasses import dataclass

import torch

from sam.parse import ParseResult, parse_scores
from sam.prompt import NUM_BOXES, NUM_STEPS

SEGMENTERS = ("boxes", "steps", "box_tokens", "none")


def num_segments(segmenter: str, fmt: str = "criteria") -> int:
    return Layout(segmenter, fmt).num_segments


@dataclass(frozen=True)
class Layout:
    """Everything the method knows about one segmentation (`segmenter` of a completion in format `fmt`): the
    segments and their names, which verdicts the masking rule reads for them, and where SAM's exception applies.

    - `num_segments` / `names`: the segments of `segment_batch`, in order;
    - `verdict_width`: the columns of the verdicts the masking rule reads: one per segment, except under box_tokens,
      where the rule reads one verdict per box and the `token` policy spreads it onto the box's tokens;
    - `box_columns`: for box-shaped verdicts (one per box), the box each verdict column takes;
    - `step_groups`: for the criteria format's per-step gold verdicts, the steps (1-based) each column covers (a
      column over several steps is right when every known step in it is right, unknown when none is known);
    - `exception_segments`: the (initial, calibrated) verdict columns of SAM's exception (sam/mask.py).
    """

    segmenter: str = "boxes"
    fmt: str = "criteria"

    def __post_init__(self):
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {self.segmenter!r}; choose from {SEGMENTERS}")
        if self.fmt not in NUM_BOXES:
            raise ValueError(f"unknown format {self.fmt!r}; choose from {tuple(NUM_BOXES)}")

    @property
    def num_boxes(self) -> int:
        return NUM_BOXES[self.fmt]

    @property
    def num_segments(self) -> int:
        if self.segmenter == "boxes":
            return self.num_boxes
        if self.segmenter == "steps":
            return max(1, NUM_STEPS[self.fmt])
        if self.segmenter == "box_tokens":
            return 2 * self.num_boxes
        return 1

    @property
    def names(self) -> tuple[str, ...]:
        boxes = ("initial", "calibrated", "final")[-self.num_boxes :]
        if self.segmenter == "boxes":
            return tuple(f"up to the {b} box" for b in boxes)
        if self.segmenter == "steps":
            return tuple(f"step {k}" for k in range(1, self.num_segments + 1))
        if self.segmenter == "box_tokens":
            return tuple(name for b in boxes for name in (f"text before the {b} box", f"{b} box"))
        return ("whole completion",)

    @property
    def verdict_width(self) -> int:
        return self.num_boxes if self.segmenter == "box_tokens" else self.num_segments

    @property
    def box_columns(self) -> tuple[int, ...]:
        last = self.num_boxes - 1
        if self.fmt != "criteria":  # one box: the only verdict is the outcome itself
            return (last,) * self.verdict_width
        if self.segmenter in ("boxes", "box_tokens"):
            return tuple(range(self.num_boxes))
        if self.segmenter == "steps":  # steps 1-5 lead to the initial box, 6 calibrates, 7 answers
            return (0, 0, 0, 0, 0, 1, 2)
        return (last,)

    @property
    def step_groups(self) -> tuple[tuple[int, ...], ...]:
        if self.segmenter == "steps":
            return tuple((k,) for k in range(1, NUM_STEPS[self.fmt] + 1))
        if self.segmenter in ("boxes", "box_tokens") and self.fmt == "criteria":
            return ((1, 2, 3, 4, 5), (6,), (7,))
        return ((NUM_STEPS[self.fmt],),)

    @property
    def exception_segments(self) -> tuple[int, int]:
        return (4, 5) if self.segmenter == "steps" else (0, 1)

    def segment(self, completion_ids: torch.Tensor, response_mask: torch.Tensor, tokenizer):
        """`segment_batch` in this layout."""
        return segment_batch(completion_ids, response_mask, tokenizer, segmenter=self.segmenter, fmt=self.fmt)


def token_char_spans(ids: list[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, [start, end) character span of each token) with special tokens decoding to nothing.

    Fast path: decode each token alone and concatenate, valid when that equals decoding the whole sequence
    (word-level and byte-level BPE on ASCII text). Otherwise (SentencePiece-style leading spaces, multi-byte
    characters split across tokens) fall back to prefix decoding, which is exact for any tokenizer.
    """
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    pieces = ["" if i in special else tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    if "".join(pieces) != text:
        ends = [
            len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False))
            for k in range(len(ids))
        ]
        pieces = [text[(ends[k - 1] if k else 0) : ends[k]] for k in range(len(ids))]
    spans, pos = [], 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return text, spans


def _cuts(parse: ParseResult, segmenter: str) -> list[tuple[int, bool]]:
    """(character offset at which a new segment starts, whether a token straddling the offset joins the new
    segment), ascending. Only a box's start is joined by a straddling token (the space glued to its backslash)."""
    if segmenter == "boxes":
        return [(end, False) for _, end in parse.box_spans[:-1]]
    if segmenter == "steps":
        return [(start, False) for start in parse.step_starts[1:]]
    if segmenter == "box_tokens":
        cuts = []
        for start, end in parse.box_spans:
            cuts += [(start, True), (end, False)]
        return cuts[:-1]  # text after the last box joins the last box's segment
    return []


def segment_completion(ids: list[int], tokenizer, *, segmenter: str = "boxes", fmt: str = "criteria"):
    """(segment id per token (list of int), ParseResult, the completion text)."""
    num_segments(segmenter, fmt)  # validates the names
    text, spans = token_char_spans(ids, tokenizer)
    parse = parse_scores(text, fmt)
    cuts = _cuts(parse, segmenter) if parse.ok else []
    seg = []
    for start, end in spans:
        # a token is past a cut when it starts at or after it, or (a box's start) when its last character reaches it;
        # its segment follows the last cut it is past (cuts ascend), so a token spanning several cuts never lands
        # in a segment between them. A zero-length token (EOS) decodes to nothing at the end: the last segment.
        past = max((j + 1 for j, (c, joins) in enumerate(cuts) if (end > c if joins else start >= c)), default=0)
        seg.append(past if end > start else len(cuts))
    return seg, parse, text


def segment_batch(
    completion_ids: torch.Tensor, response_mask: torch.Tensor, tokenizer, *, segmenter="boxes", fmt="criteria"
):
    """Per-token step ids for a batch of completions.

    completion_ids (B, T) int, response_mask (B, T) bool (True on the real response tokens, EOS included; False on
    prompt and padding). Returns (step_id (B, T) int32 on the ids' device, parses (list of B ParseResult),
    texts (list of B str)). This is string work on the host by nature (decode, regex): call it once per rollout
    batch, outside the loss.
    """
    if completion_ids.shape != response_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must be the same (B, T) shape"
        )
    ids_cpu, mask_cpu = completion_ids.cpu(), response_mask.cpu().bool()
    step_id = torch.full(ids_cpu.shape, -1, dtype=torch.int32)
    parses, texts = [], []
    for b in range(ids_cpu.shape[0]):
        positions = mask_cpu[b].nonzero().squeeze(1)
        seg, parse, text = segment_completion(ids_cpu[b, positions].tolist(), tokenizer, segmenter=segmenter, fmt=fmt)
        step_id[b, positions] = torch.tensor(seg, dtype=torch.int32)
        parses.append(parse)
        texts.append(text)
    return step_id.to(completion_ids.device), parses, texts
