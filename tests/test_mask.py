"""sam/mask.py: the SAM truth table in full, each policy's definition, diagnostics on a hand-built batch."""

import itertools

import pytest
import torch

from grm_kernels.policy_loss import AGG_MODES, policy_loss_ref
from sam.mask import diagnostics, keep_weights, token_loss_weights


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
    weights, d = keep_weights(
        verdicts, outcome, torch.ones(3, dtype=torch.bool), exception=False, segment_tokens=tokens, seq_adv=adv
    )
    assert weights.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert d["seg_masked_frac_pos"].item() == pytest.approx(1 / 6)
    assert d["seg_masked_frac_neg"].item() == pytest.approx(2 / 3)
    assert d["tok_masked_frac_pos"].item() == pytest.approx(10 / 40)
    assert d["tok_masked_frac_neg"].item() == pytest.approx(12 / 20)
    assert d["adv_mass_removed"].item() == pytest.approx((10 * 1 + 12 * 2) / (20 * 1 + 20 * 2 + 20 * 0.5))


def test_bad_arguments():
    v = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown masking policy"):
        keep_weights(v, v[:, 0], v[:, 0], policy="bogus")
    with pytest.raises(ValueError, match="needs generator"):
        keep_weights(v, v[:, 0], v[:, 0], policy="random")
    with pytest.raises(ValueError, match="agg must be"):
        keep_weights(v, v[:, 0], v[:, 0], agg="mean")
    with pytest.raises(ValueError, match="alpha"):
        keep_weights(v, v[:, 0], v[:, 0], policy="soft", alpha=2.0)
    with pytest.raises(ValueError, match="verdicts must be"):
        keep_weights(v, v[:1, 0], v[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# policy "random": the control arm


def random_batch(B, S, seed=0):
    """Verdicts right 70% of the time whatever the outcome, so sam masks ~30% of eligible segments in positive
    rollouts and ~70% in negative ones; 10% malformed, 15% unknown verdicts."""
    g = torch.Generator().manual_seed(seed)
    verdicts = torch.rand(B, S, generator=g) < 0.7
    wf = torch.rand(B, generator=g) > 0.1
    outcome = (torch.rand(B, generator=g) < 0.5) & wf
    known = torch.rand(B, S, generator=g) > 0.15
    return verdicts, outcome, wf, known


@pytest.mark.parametrize("S", [3, 7])
def test_random_matches_sam_rate_per_column_and_outcome(S):
    v, outcome, wf, known = random_batch(20000, S)
    sam, _ = keep_weights(v, outcome, wf, known=known, exception_segments=(S - 3, S - 2))
    rnd, _ = keep_weights(
        v,
        outcome,
        wf,
        known=known,
        exception_segments=(S - 3, S - 2),
        policy="random",
        generator=torch.Generator().manual_seed(1),
    )
    assert set(rnd.unique().tolist()) == {0.0, 1.0} and rnd.dtype == torch.float32
    eligible = wf[:, None] & known
    eligible[:, -1] = False
    rates = []
    for rows in (outcome, ~outcome):
        for s in range(S - 1):
            n = (eligible[:, s] & rows).sum().item()
            m_sam = ((sam[:, s] == 0) & rows).sum().item()
            m_rnd = ((rnd[:, s] == 0) & rows).sum().item()
            p = m_sam / n
            tol = 5 * (n * p * (1 - p)) ** 0.5 + 1  # 5 binomial standard deviations
            assert abs(m_rnd - m_sam) <= tol, (rows is outcome, s, m_rnd, m_sam, tol)
            rates.append(p)
    # the test is only meaningful where sam's rate differs between positive and negative rollouts
    assert min(rates[S - 1 :]) > max(rates[: S - 1]) + 0.2
    # ... and the random arm does not simply copy sam
    assert (rnd != sam).float().mean() > 0.1


def test_random_never_masks_what_sam_cannot():
    v, outcome, wf, known = random_batch(5000, 3)
    rnd, _ = keep_weights(v, outcome, wf, known=known, policy="random", generator=torch.Generator().manual_seed(0))
    assert torch.all(rnd[:, -1] == 1)  # the final segment
    assert torch.all(rnd[~wf] == 1)  # malformed rollouts
    assert torch.all(rnd[~known] == 1)  # unknown verdicts
    assert (rnd == 0).any()


def test_random_is_deterministic_per_generator_seed():
    v, outcome, wf, known = random_batch(2000, 3)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return keep_weights(v, outcome, wf, known=known, policy="random", generator=g)[0]

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_random_follows_sam_extremes():
    # verdicts agree with the outcome everywhere: sam masks nothing, so random masks nothing
    outcome = torch.tensor([True, False] * 50)
    v = outcome[:, None].expand(100, 3).clone()
    wf = torch.ones(100, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    assert torch.all(keep_weights(v, outcome, wf, policy="random", generator=g)[0] == 1)
    # verdicts disagree everywhere (and no exception): sam masks every eligible segment, and so does random
    rnd, _ = keep_weights(~v, outcome, wf, policy="random", exception=False, generator=g)
    assert torch.all(rnd[:, :2] == 0) and torch.all(rnd[:, 2] == 1)


# ---------------------------------------------------------------------------------------------------------------
# diagnostics: the loss weights under each aggregation

# rollout 0: correct, S1 (65 of 100 tokens) wrong -> S1 masked; rollout 1: wrong, no verdict right -> nothing masked
TOKENS = torch.tensor([[65, 20, 15], [30, 10, 60]])
ADV = torch.tensor([1.0, -0.5])


def two_rollouts(agg):
    v = torch.tensor([[False, True, True], [False, False, False]])
    weights, d = keep_weights(
        v,
        torch.tensor([True, False]),
        torch.ones(2, dtype=torch.bool),
        exception=False,
        segment_tokens=TOKENS,
        seq_adv=ADV,
        agg=agg,
    )
    assert weights.tolist() == [[0, 1, 1], [1, 1, 1]]
    return d


@pytest.mark.parametrize(
    "agg,gain,change",
    [
        # per rollout 1/kept: rollout 0's 35 kept tokens go from 1/200 to 1/70 (x 100/35 = 2.86)
        ("seq-mean-token-mean", 100 / 35, (65 / 200 + 35 * (1 / 70 - 1 / 200)) / (100 / 200 + 0.5 * 100 / 200)),
        # the batch's kept tokens, 200 -> 135: every kept token gains 200/135, rollout 1's too
        (
            "token-mean",
            200 / 135,
            (65 / 200 + 35 * (1 / 135 - 1 / 200) + 0.5 * 100 * (1 / 135 - 1 / 200)) / (100 / 200 + 0.5 * 100 / 200),
        ),
        # rollouts with a kept token, 2 -> 2: no renormalisation, the change is the advantage mass removed
        ("seq-mean-token-sum", 1.0, 65 / (100 + 0.5 * 100)),
    ],
)
def test_weight_diagnostics_by_hand(agg, gain, change):
    d = two_rollouts(agg)
    assert d["tok_masked_frac"].item() == pytest.approx(65 / 200)
    assert d["adv_mass_removed"].item() == pytest.approx(65 / 150)
    assert d["kept_weight_gain"].item() == pytest.approx(gain, rel=1e-6)
    assert d["weight_change"].item() == pytest.approx(change, rel=1e-6)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in d.values())


def test_the_2_9x_example():
    # S1 holds 65% of the tokens and is masked: under the paper's aggregation the rest weighs 1/0.35 = 2.9x more
    w = torch.tensor([[0.0, 1.0, 1.0]] * 4)
    d = diagnostics(w, torch.ones(4, dtype=torch.bool), torch.tensor([[65, 20, 15]] * 4), torch.ones(4))
    assert d["kept_weight_gain"].item() == pytest.approx(1 / 0.35, rel=1e-6)
    assert d["weight_change"].item() == pytest.approx(0.65 + 0.65, rel=1e-6)  # 0.65 off S1, 0.65 onto S2/S3
    assert d["adv_mass_removed"].item() == pytest.approx(0.65)


def test_fully_masked_rollout_changes_seq_mean_denominators():
    # the sequence policy drops rollout 0 whole: rollout 1 becomes the only rollout with a kept token
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    d = diagnostics(w, torch.tensor([True, False]), TOKENS, ADV, agg="seq-mean-token-sum")
    # rollout 0 loses its 0.5 per token, rollout 1's tokens go from 1/2 to 1
    assert d["weight_change"].item() == pytest.approx((100 * 0.5 + 0.5 * 100 * 0.5) / (100 * 0.5 + 0.5 * 100 * 0.5))
    assert d["adv_mass_removed"].item() == pytest.approx(100 / 150)
    assert d["kept_weight_gain"].item() == 1.0  # no rollout keeps a token beside a masked one


def test_soft_weights():
    # soft tokens still count in the denominators: no renormalisation, the change is the weight taken off
    w = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    for agg in AGG_MODES:
        d = diagnostics(w, torch.tensor([True, False]), TOKENS, ADV, agg=agg)
        assert d["kept_weight_gain"].item() == pytest.approx(1.0)
        assert d["tok_masked_frac"].item() == pytest.approx(0.5 * 65 / 200)
        assert d["weight_change"].item() == pytest.approx(d["adv_mass_removed"].item())
    # hard and soft in one rollout (seq-mean-token-mean): S1 masked, S2 at 0.5, S3 kept; 35 kept tokens
    w = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    d = diagnostics(w, torch.tensor([True, False]), TOKENS, ADV)
    w0 = 1 / 200
    moved = 65 * w0 + 20 * abs(0.5 / 70 - w0) + 15 * abs(1 / 70 - w0)
    assert d["weight_change"].item() == pytest.approx(moved / (100 * w0 + 0.5 * 100 * w0), rel=1e-6)
    assert d["kept_weight_gain"].item() == pytest.approx(200 / 70, rel=1e-6)  # S3's 15 tokens only


def test_nothing_masked():
    for agg in AGG_MODES:
        d = diagnostics(torch.ones(2, 3), torch.tensor([True, False]), TOKENS, ADV, agg=agg)
        assert d["weight_change"].item() == 0.0 and d["kept_weight_gain"].item() == 1.0
        assert d["tok_masked_frac"].item() == 0.0 and d["adv_mass_removed"].item() == 0.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_token_loss_weights_match_the_loss_gradient(agg):
    """At ratio 1 the loss is -sum_t A_t w_t rho_t: |dloss/dlogp_t| = |A_b| w_t, the quantity the diagnostics use.
    Hard, soft, fully masked rollouts and empty segments, against policy_loss_ref in fp64."""
    g = torch.Generator().manual_seed(0)
    B, S = 6, 3
    tokens = torch.randint(0, 9, (B, S), generator=g)
    tokens[0, 1] = 0  # an empty segment
    tokens[5] = 0  # a rollout with no response token
    weights = torch.tensor([0.0, 0.3, 1.0])[torch.randint(0, 3, (B, S), generator=g)]
    weights[1] = 0.0  # a fully masked rollout
    weights[2] = 1.0
    adv = torch.randn(B, generator=g).double()
    seq_id = torch.repeat_interleave(torch.arange(B), tokens.sum(1))  # (N,)
    step_id = torch.cat([torch.repeat_interleave(torch.arange(S), tokens[b]) for b in range(B)])  # (N,)
    logp = torch.zeros(len(seq_id), dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss_ref(logp, logp.detach(), adv, seq_id, step_id, weights.double(), agg=agg)
    loss.backward()
    w = token_loss_weights(weights, tokens, agg)  # (B, S)
    expected = adv.abs()[seq_id] * w.double()[seq_id, step_id]  # (N,)
    torch.testing.assert_close(logp.grad.abs(), expected, rtol=1e-6, atol=1e-12)
    # and weight_change from the gradients with and without the mask
    logp0 = torch.zeros_like(logp, requires_grad=True)
    policy_loss_ref(logp0, logp.detach(), adv, seq_id, step_id, torch.ones(B, S, dtype=torch.float64), agg=agg)[
        0
    ].backward()
    change = (logp.grad - logp0.grad).abs().sum() / logp0.grad.abs().sum()
    d = diagnostics(weights, adv > 0, tokens, adv, agg=agg)
    assert d["weight_change"].item() == pytest.approx(change.item(), rel=1e-5)
