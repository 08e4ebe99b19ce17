"""sam/segment.py and sam/verdict.py: exact partitions, whole boxes under word-level and byte-level BPE."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.schema import Record
from data.tokenizer import build_tokenizer
from sam.parse import parse_scores
from sam.prompt import render_gold_reasoning
from sam.segment import num_segments, segment_batch, segment_completion, token_char_spans
from sam.verdict import box_verdicts, expand_to_segments, gold_verdicts

GOLD = {
    "need": "broad",
    "subject": "ramen",
    "coverage": "partial",
    "query_category": "food",
    "note_category": "travel",
    "hits": ["ramen"],
    "misses": ["vegan"],
    "initial": -1,
    "rule": "qualifier",
    "case": "dropped",
    "rule_text": "the note drops the qualifier vegan",
    "calibrated": 0,
    "final": 0,
}


def record(label=0, **gold):
    g = {**GOLD, **gold}
    return Record("r", "vegan ramen", {"title": "t", "content": "c", "tags": []}, label, gold=g)


TRACE = render_gold_reasoning(record(initial=-1, calibrated=-1, final=-1, label=-1))
TRACE2 = render_gold_reasoning(record())
MALFORMED = "Step 1: I think \\boxed{2 or 3}"


@pytest.fixture(scope="module")
def word_level():
    return build_tokenizer([TRACE, TRACE2, MALFORMED])


@pytest.fixture(scope="module")
def byte_bpe():
    tok = Tokenizer(models.BPE())
    # no regex pre-split: merges may cross punctuation and newlines, as in real byte-level BPE vocabularies
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    # merges that cross a box's closing brace into the next step header, as real vocabularies have
    tok.train_from_iterator([TRACE, TRACE2] * 50 + ["-1}\nSt", "0}\nSt", "}\nS"] * 200, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("tok_name", ["word_level", "byte_bpe"])
@pytest.mark.parametrize("segmenter", ["boxes", "steps", "box_tokens", "none"])
def test_segments_partition_and_boxes_stay_whole(request, tok_name, segmenter):
    tok = request.getfixturevalue(tok_name)
    ids = tok(TRACE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seg, parse, text = segment_completion(ids, tok, segmenter=segmenter)
    assert parse.ok and text == TRACE
    S = num_segments(segmenter)
    assert len(seg) == len(ids) and set(seg) == set(range(S))  # every segment present, nothing else
    assert seg == sorted(seg)  # contiguous, in order: an exact partition
    assert seg[-1] == S - 1  # EOS joins the last segment
    _, spans = token_char_spans(ids, tok)
    box_segments = {"boxes": [0, 1, 2], "steps": [4, 5, 6], "box_tokens": [1, 3, 5], "none": [0, 0, 0]}[segmenter]
    for (start, end), expected in zip(parse.box_spans, box_segments):
        # every token whose first character lies in the box is in the box's segment; the box's last character
        # (the closing brace) is always in a token of that segment, so the segment ends right after the box
        inside = [s for (a, b), s in zip(spans, seg) if start <= a < end]
        assert inside and set(inside) == {expected}
        closing = [s for (a, b), s in zip(spans, seg) if a < end <= b]
        assert closing == [expected]


def test_byte_bpe_tokens_straddle_box_ends(byte_bpe):
    """The BPE fixture really has tokens that cross a box's end (so the test above means something)."""
    ids = byte_bpe(TRACE, add_special_tokens=False)["input_ids"]
    _, spans = token_char_spans(ids, byte_bpe)
    ends = [end for _, end in parse_scores(TRACE).box_spans]
    assert any(a < end < b for a, b in spans for end in ends)


def test_multi_token_box_stays_in_its_segment(word_level):
    ids = word_level(TRACE, add_special_tokens=False)["input_ids"]
    seg, parse, _ = segment_completion(ids, word_level, segmenter="boxes")
    _, spans = token_char_spans(ids, word_level)
    start, end = parse.box_spans[0]  # \boxed{-1}: backslash, boxed, {, -, 1, }
    covered = [s for (a, b), s in zip(spans, seg) if a < end and b > start]
    assert len(covered) >= 5 and set(covered) == {0}


def test_malformed_completion_is_one_segment(word_level):
    ids = word_level(MALFORMED, add_special_tokens=False)["input_ids"]
    seg, parse, _ = segment_completion(ids, word_level)
    assert not parse.ok and set(seg) == {0}


def test_batch_marks_prompt_and_padding(word_level):
    a = word_level(TRACE, add_special_tokens=False)["input_ids"]
    b = word_level(MALFORMED, add_special_tokens=False)["input_ids"]
    T = len(a) + 3
    ids = torch.full((2, T), word_level.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.bool)
    ids[0, 2 : 2 + len(a)] = torch.tensor(a)  # two prompt-like positions first
    mask[0, 2 : 2 + len(a)] = True
    ids[1, : len(b)] = torch.tensor(b)
    mask[1, : len(b)] = True
    step_id, parses, texts = segment_batch(ids, mask, word_level)
    assert step_id.dtype == torch.int32 and torch.all(step_id[~mask] == -1) and torch.all(step_id[mask] >= 0)
    assert texts == [TRACE, MALFORMED] and parses[0].ok and not parses[1].ok
    with pytest.raises(ValueError, match="same"):
        segment_batch(ids, mask[:, :-1], word_level)


def test_box_and_gold_verdicts():
    right = render_gold_reasoning(record())  # boxes -1, 0, 0 for label 0
    wrong_cov = right.replace("coverage ramen partial", "coverage ramen large")
    unreadable = right.replace("keywords 1 of 2", "some keywords")  # not the closed form: unknown, not wrong
    # the right level and verdict about the wrong subject or category are wrong steps, not right ones
    wrong_subject = right.replace("coverage ramen partial", "coverage sushi partial")
    wrong_category = right.replace("category food differ", "category travel differ")
    texts = [right, wrong_cov, unreadable, MALFORMED, wrong_subject, wrong_category]
    parses = [parse_scores(t) for t in texts]
    v = box_verdicts(parses, torch.tensor([0] * 6))
    assert v.correct.tolist()[0] == [False, True, True] and v.known.tolist()[3] == [False] * 3
    g = gold_verdicts(texts, parses, [GOLD] * 6)
    assert g.known[0].all() and g.correct[0].all()
    assert g.correct[1].tolist() == [True, False, True, True, True, True, True]
    assert g.known[2].tolist() == [True, True, True, False, True, True, True]
    assert not g.known[3].any()
    assert g.known[4].all() and g.correct[4].tolist() == [True, False, True, True, True, True, True]
    assert g.known[5].all() and g.correct[5].tolist() == [True, True, False, True, True, True, True]
    assert not gold_verdicts([right], [parses[0]], [None]).known.any()  # no gold: unknown, not guessed
    steps = expand_to_segments(v, "steps")
    assert steps.correct[0].tolist() == [False] * 5 + [True, True]
    boxes = expand_to_segments(g, "boxes", source="gold")
    assert boxes.correct.tolist()[1] == [False, True, True] and boxes.correct.tolist()[0] == [True, True, True]


@pytest.fixture(scope="module")
def glued_bpe():
    """Byte-level BPE whose merges glue the space before a box to its backslash (`Ġ\\`), as SmolLM2's and Qwen2's
    vocabularies do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TRACE, TRACE2] * 20 + [" \\", " \\b"] * 400, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("tok_name", ["word_level", "byte_bpe", "glued_bpe"])
def test_a_token_that_reaches_into_a_box_belongs_to_it(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ids = tok(TRACE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seg, parse, text = segment_completion(ids, tok, segmenter="box_tokens")
    _, spans = token_char_spans(ids, tok)
    straddling = 0
    for k, (start, end) in enumerate(parse.box_spans):
        for (s, e), sid in zip(spans, seg):
            if s < end and e > start:  # any character of the token inside box k
                assert sid == 2 * k + 1, (tok.convert_ids_to_tokens(ids), seg)
                straddling += s < start
    if tok_name == "glued_bpe":
        assert straddling == 3  # the fixture does glue ' \' at every box: the case is exercised


class _Pieces:
    """A stand-in tokenizer whose token k decodes to pieces[k]: any split of a text, however unlike a real one."""

    all_special_ids = ()

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids)


def test_a_token_spanning_several_cuts_takes_the_segment_after_the_last_one():
    # one token runs from inside box 1 into box 2: it must not fall into the text segment between them
    start = TRACE.index("\\boxed") + 8  # inside box 1
    end = TRACE.index("\\boxed", start) + 3  # inside box 2
    pieces = [TRACE[:start], TRACE[start:end], TRACE[end:]]
    seg, parse, _ = segment_completion([0, 1, 2], _Pieces(pieces), segmenter="box_tokens")
    assert parse.ok and seg == [1, 3, 5]
    assert segment_completion([0, 1, 2], _Pieces(pieces), segmenter="boxes")[0] == [0, 0, 1]  # first character
