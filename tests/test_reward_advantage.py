"""sam/reward.py and sam/advantage.py on hand-computed values."""

import math

import pytest
import torch

from sam.advantage import group_advantages
from sam.parse import ParseResult
from sam.reward import outcome_reward


def ok(label):
    return ParseResult("ok", (label, label, label))


BAD = ParseResult("wrong_box_count")


def test_outcome_reward_components():
    parses = [ok(2), ok(1), BAD, ok(-1)]
    labels = torch.tensor([2, 3, 2, 3])
    r, c = outcome_reward(parses, labels, correct=2.0, malformed_penalty=0.5)
    assert r.tolist() == [2.0, 0.0, -0.5, 0.0]
    assert c["correct"].tolist() == [True, False, False, False]
    assert c["well_formed"].tolist() == [True, True, False, True]
    r, c = outcome_reward(parses, labels, ordinal=True)
    # partial credit 1 - |y - l| / 4 for well-formed wrong labels; malformed still 0
    assert r.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert c["ordinal_credit"].tolist() == [0.0, 0.5, 0.0, 0.0]


def test_outcome_reward_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        outcome_reward([ok(1)], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="malformed_penalty"):
        outcome_reward([ok(1)], torch.tensor([1]), malformed_penalty=-1.0)


def test_grpo_on_hand_computed_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # G = 4: one informative group, one flat
    adv, valid, stats = group_advantages(rewards, 4, clamp=None)
    std = math.sqrt(((0.75) ** 2 + 3 * 0.25**2) / 3)  # unbiased
    expected = [0.75 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 3 + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert valid.all() and stats["zero_variance_groups"] == 1
    _, valid, _ = group_advantages(rewards, 4, zero_variance="drop")
    assert valid.tolist() == [True] * 4 + [False] * 4


def test_drgrpo_rloo_and_clamp():
    rewards = torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, 4, method="drgrpo")[0].tolist() == [1.5, -0.5, -0.5, -0.5]
    # RLOO: r_i minus the mean of the others
    assert group_advantages(rewards, 4, method="rloo")[0].tolist() == pytest.approx([2.0, -2 / 3, -2 / 3, -2 / 3])
    rewards = torch.tensor([1.0] + [0.0] * 15)  # a lone success among 16: GRPO advantage ~3.87
    assert group_advantages(rewards, 16, clamp=3.0)[0][0].item() == 3.0
    assert group_advantages(rewards, 16, clamp=None)[0][0].item() > 3.0


def test_advantage_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="method"):
        group_advantages(torch.zeros(4), 2, method="ppo")
