"""sam/mask.py: the SAM truth table in full, each policy's definition, diagnostics on a hand-built batch."""

import itertools

import pytest
import torch

from sam.mask import keep_weights


def paper_table(c1, c2, c3, well_formed, exception):
    """PAPER.md's rule, written out case by case: (keep S1, keep S2, keep S3)."""
    if not well_formed:
        return (1, 1, 1)
    if c3 and not c1 and c2 and exception:
        return (1, 1, 1)
    if c3:
        return (int(c1), int(c2), 1)
    return (int(not c1), int(not c2), 1)


CASES = list(itertools.product([0, 1], [0, 1], [0, 1], [True, False], [True, False]))


@pytest.mark.parametrize("c1,c2,c3,well_formed,exception", CASES)
def test_sam_truth_table(c1, c2, c3, well_formed, exception):
    verdicts = torch.tensor([[c1, c2, c3]], dtype=torch.bool)
    outcome = torch.tensor([bool(c3) and well_formed])
    weights, _ = keep_weights(verdicts, outcome, torch.tensor([well_formed]), policy="sam", exception=exception)
    assert weights.tolist() == [list(map(float, paper_table(c1, c2, c3, well_formed, exception)))]


def all_cases():
    v = torch.tensor([[c1, c2, c3] for c1, c2, c3, *_ in CASES], dtype=torch.bool)
    wf = torch.tensor([w for *_, w, _ in CASES])
    return v, v[:, 2] & wf, wf


def test_batched_table_matches_row_by_row():
    v, outcome, wf = all_cases()
    weights, _ = keep_weights(v, outcome, wf, exception=True)
    expected = [list(map(float, paper_table(*c[:3], c[3], True))) for c in CASES]
    assert weights.tolist() == expected


def test_none_soft_sequence():
    v, outcome, wf = all_cases()
    sam, _ = keep_weights(v, outcome, wf, policy="sam")
    none, _ = keep_weights(v, outcome, wf, policy="none")
    assert torch.all(none == 1)
    assert torch.equal(keep_weights(v, outcome, wf, policy="soft", alpha=0.0)[0], sam)
    assert torch.equal(keep_weights(v, outcome, wf, policy="soft", alpha=1.0)[0], none)
    soft, _ = keep_weights(v, outcome, wf, policy="soft", alpha=0.25)
    assert torch.equal(soft, torch.where(sam == 1, 1.0, 0.25))
    seq, _ = keep_weights(v, outcome, wf, policy="sequence")
    dropped = (sam == 0).any(dim=1)
    assert torch.equal(seq, torch.where(dropped[:, None], 0.0, 1.0).expand_as(sam))
    assert dropped.any() and not dropped.all()


def test_token_policy_masks_only_score_tokens():
    v, outcome, wf = all_cases()
    sam, _ = keep_weights(v, outcome, wf, policy="sam")
    tok, _ = keep_weights(v, outcome, wf, policy="token")
    assert tok.shape == (len(CASES), 6)
    assert torch.all(tok[:, 0::2] == 1)  # text segments
    assert torch.equal(tok[:, 1::2], sam)  # box segments follow the sam rule


def test_unknown_verdicts_are_never_masked():
    verdicts = torch.tensor([[False, False, True]])
    known = torch.tensor([[False, True, True]])
    weights, _ = keep_weights(verdicts, torch.tensor([True]), torch.tensor([True]), known=known)
    assert weights.tolist() == [[1.0, 0.0, 1.0]]


def test_exception_on_step_segments():
    # 7 step segments: initial score in segment 4, calibration in 5
    verdicts = torch.tensor([[True, True, True, True, False, True, True]])
    on, _ = keep_weights(verdicts, torch.tensor([True]), torch.tensor([True]), exception_segments=(4, 5))
    off, _ = keep_weights(verdicts, torch.tensor([True]), torch.tensor([True]), exception=False)
    assert on.tolist() == [[1.0] * 7] and off.tolist() == [[1, 1, 1, 1, 0, 1, 1]]


def test_diagnostics_on_a_hand_built_batch():
    # rollout 0: correct, S1 wrong -> S1 masked; rollout 1: wrong, S1 and S2 right -> both masked; rollout 2: clean
    verdicts = torch.tensor([[False, True, True], [True, True, False], [True, True, True]])
    outcome = torch.tensor([True, False, True])
    tokens = torch.tensor([[10, 5, 5], [8, 4, 8], [6, 6, 8]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    weights, d = keep_weights(verdicts, outcome, torch.ones(3, dtype=torch.bool), exception=False,
                              segment_tokens=tokens, seq_adv=adv)  # fmt: skip
    assert weights.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert d["seg_masked_frac_pos"].item() == pytest.approx(1 / 6)
    assert d["seg_masked_frac_neg"].item() == pytest.approx(2 / 3)
    assert d["tok_masked_frac_pos"].item() == pytest.approx(10 / 40)
    assert d["tok_masked_frac_neg"].item() == pytest.approx(12 / 20)
    assert d["adv_mass_removed"].item() == pytest.approx((10 * 1 + 12 * 2) / (20 * 1 + 20 * 2 + 20 * 0.5))


def test_bad_arguments():
    v = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown masking policy"):
        keep_weights(v, v[:, 0], v[:, 0], policy="random")
    with pytest.raises(ValueError, match="alpha"):
        keep_weights(v, v[:, 0], v[:, 0], policy="soft", alpha=2.0)
    with pytest.raises(ValueError, match="verdicts must be"):
        keep_weights(v, v[:1, 0], v[:, 0])
