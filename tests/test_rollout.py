"""sam/rollout.py (scoring a rollout batch) and sam/segment.Layout (one object per segmentation)."""

import pytest
import torch

from data.schema import Record
from data.tokenizer import build_tokenizer
from runtime.config import build_parser
from runtime.configs import DistillConfig, TrainConfig
from sam.mask import keep_weights
from sam.prompt import FORMATS, render_gold_reasoning
from sam.rollout import ScoringRules, score_rollouts
from sam.segment import SEGMENTERS, Layout
from sam.verdict import SOURCES, Verdicts, expand_to_segments

# a record whose intermediate boxes are both 2 (the answer varies with the label)
GOLD = dict(
    need="broad",
    subject="ramen",
    coverage="partial",
    query_category="food",
    note_category="food",
    hits=["ramen"],
    misses=[],
)
GOLD.update(initial=2, calibrated=2)


def record(label: int) -> Record:
    return Record("r", "ramen", {"title": "t", "content": "c", "tags": []}, label, gold=dict(GOLD, final=label))


def trace(label: int) -> str:
    """A well-formed criteria trace that answers `label` (initial and calibrated 2)."""
    return render_gold_reasoning(record(label))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([trace(k) for k in (-1, 0, 1, 2, 3)])


def batch(tok, labels_answered: list[int]):
    ids = [tok(trace(k), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k in labels_answered]
    T = max(map(len, ids))
    completion = torch.full((len(ids), T), tok.pad_token_id)
    response = torch.zeros(len(ids), T, dtype=torch.bool)
    for b, row in enumerate(ids):
        completion[b, : len(row)] = torch.tensor(row)
        response[b, : len(row)] = True
    return completion, response


@pytest.mark.parametrize("zero_variance", ["keep", "drop"])
def test_score_rollouts_groups_masks_and_dropped_groups(tok, zero_variance):
    # group 0: gold 2, answers 2 and 3 (one right: informative); group 1: gold 1, answers 1 and 1 (zero variance)
    records = [record(2), record(2), record(1), record(1)]
    completion, response = batch(tok, [2, 3, 1, 1])
    rules = ScoringRules(zero_variance=zero_variance)
    scored = score_rollouts(records, completion, response, tok, rules, group_size=2)
    assert scored.correct.tolist() == [True, False, True, True] and scored.well_formed.all()
    assert scored.keep.shape == (4, rules.layout.num_segments)
    # SAM: the right rollout keeps everything; the wrong one answered 3 after right intermediate boxes (2, 2): those
    # agree with the label, not with the (wrong) outcome, so they are masked and only the final box is penalised
    assert scored.keep[0].tolist() == [1, 1, 1] and scored.keep[1].tolist() == [0, 0, 1]
    assert scored.adv[0] > 0 > scored.adv[1] and scored.adv[2:].tolist() == [0, 0]
    in_loss = scored.step_id >= 0
    assert in_loss[:2].equal(response[:2])  # every response token of the informative group is in the loss
    if zero_variance == "drop":
        assert scored.valid.tolist() == [True, True, False, False] and not in_loss[2:].any()
    else:
        assert scored.valid.all() and in_loss[2:].equal(response[2:])
    assert scored.diagnostics and all(k.startswith(("sam/", "adv/")) for k in scored.diagnostics)


def test_scoring_rules_take_the_train_flags():
    cfg = TrainConfig(policy="soft", alpha=0.25, segmenter="steps", zero_variance="drop")
    rules = ScoringRules.of(cfg)
    assert (rules.policy, rules.alpha, rules.segmenter, rules.zero_variance) == ("soft", 0.25, "steps", "drop")
    assert rules.layout == Layout("steps", "criteria") and rules.layout.exception_segments == (4, 5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("segmenter", SEGMENTERS)
def test_layout_keep_weights_cover_exactly_its_segments(segmenter, fmt):
    """Whatever the format, the masking rule's weights have one column per segment of the layout (a one-box format
    under box_tokens once gave 4 weights for its 2 segments)."""
    layout = Layout(segmenter, fmt)
    assert len(layout.names) == layout.num_segments and len(layout.box_columns) == layout.verdict_width
    policy = "token" if segmenter == "box_tokens" else "sam"
    for source in SOURCES if fmt == "criteria" else ("box",):
        width = 7 if source == "gold" else layout.num_boxes
        v = expand_to_segments(
            Verdicts(torch.ones(2, width, dtype=torch.bool), torch.ones(2, width, dtype=torch.bool)),
            segmenter,
            fmt,
            source=source,
        )
        assert v.correct.shape == (2, layout.verdict_width)
        keep, _ = keep_weights(
            v.correct,
            torch.ones(2, dtype=torch.bool),
            torch.ones(2, dtype=torch.bool),
            policy=policy,
            known=v.known,
            exception_segments=layout.exception_segments,
        )
        assert keep.shape == (2, layout.num_segments), (segmenter, fmt, source)


def test_config_help_and_defaults_follow_the_subclass():
    def helps(cls):
        return {a.dest: a.help for a in build_parser(cls)._actions}

    train, distill = helps(TrainConfig), helps(DistillConfig)
    assert "RL and evaluation" in train["max_new_tokens"] and "(default: 96)" in train["max_new_tokens"]
    assert "training and evaluation" in distill["max_new_tokens"] and "(default: 160)" in distill["max_new_tokens"]
    assert "student init" in distill["seed"] and "model init" in train["seed"]
    assert train["device"] == distill["device"]  # declared once, in SessionConfig
