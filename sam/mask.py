"""Masking policies: the weight each segment's tokens keep of the rollout's advantage (the ablation axis).

Stepwise Advantage Masking (PAPER.md, the table "Rule"), for segments S1..S_S with verdicts c_k and outcome c:
- the last segment (the final answer) is always kept;
- a malformed completion is never masked;
- otherwise a segment is kept iff its verdict agrees with the outcome: in a correct rollout, intermediate scores
  that were wrong are not reinforced; in a wrong rollout, intermediate scores that were right are not penalised;
- exception (`exception=True`): in a correct rollout whose initial score was wrong and whose calibration was right
  (c3=1, c1=0, c2=1: calibration fixed the initial score), both are kept. `exception_segments` names the
  (initial, calibrated) segments: (0, 1) for the paper's boxes, (4, 5) for the 7-step segmentation.
Unknown verdicts (`known` False) are never masked: no mask acts on a guess.

Policies:
- "none":     all 1 (outcome GRPO);
- "sam":      the rule above, weights 1 or 0;
- "soft":     like sam, a masked segment keeps `alpha` (alpha=0 is sam, alpha=1 is none);
- "sequence": the whole rollout gets 0 when any intermediate segment would be masked by sam, else 1;
- "token":    verdicts per box (B, K) in, weights for the `box_tokens` segmentation (B, 2K) out: text segments
              keep 1, each box's score tokens follow the sam rule;
- "random":   the control arm: as many segments masked as sam masks on this batch, in expectation, but chosen
              without looking at the verdicts (weights 1 or 0). Eligible are the segments sam could mask at all:
              well-formed rollouts, known verdicts, not the last segment. Within each stratum (segment column x
              outcome) every eligible segment is dropped with probability p = (eligible segments sam masks) /
              (eligible segments), drawn from the `generator` passed in. Stratifying by outcome as well as by
              column keeps sam's masked fractions in positive and negative rollouts (the sign of the advantage
              that masking removes), so the arms differ only in which segments the verdicts pick.
Everything is tensor code on the verdicts' device, without host syncs.

Diagnostics (`diagnostics`): masked fractions, and how masking changes each token's weight in the loss. The loss
(grm_kernels/policy_loss.py) aggregates over *kept* tokens (keep > 0), so masking also renormalises: under
"seq-mean-token-mean" each rollout's mean runs over its kept tokens, and masking 65% of a rollout multiplies the
weight of its other tokens by 1 / 0.35 = 2.9; under "token-mean" the denominator is the batch's kept tokens, so
every kept token of the batch gains the same factor; under "seq-mean-token-sum" only a fully masked rollout
changes the denominator (the count of rollouts with a kept token).
"""

import torch

from grm_kernels.policy_loss import AGG_MODES

POLICIES = ("none", "sam", "soft", "sequence", "token", "random")


def _sam_keep(verdicts, outcome, well_formed, known, exception, exception_segments):
    """(B, S) bool: the SAM rule."""
    agree = verdicts == outcome[:, None]  # (B, S)
    keep = agree | ~known
    keep[:, -1] = True  # the final segment is always kept
    S = verdicts.shape[1]
    if exception and S > max(exception_segments):
        i0, i1 = exception_segments
        fixed = outcome & known[:, i0] & ~verdicts[:, i0] & known[:, i1] & verdicts[:, i1]  # (B,)
        keep[:, i0] |= fixed
        keep[:, i1] |= fixed
    return keep | ~well_formed[:, None]  # malformed: never masked


def _random_keep(sam_keep, outcome, well_formed, known, generator, seq_adv=None):
    """(B, S) bool: drop eligible segments at random, at sam's masking rate per (outcome, column) on this batch.
    With seq_adv, rollouts with advantage 0 (zero-variance groups) are not eligible: masking them changes nothing
    in the loss, so sam's rate is matched over the rollouts the update sees."""
    B, S = sam_keep.shape
    eligible = well_formed[:, None] & known  # (B, S) segments sam could mask ...
    if seq_adv is not None:
        eligible = eligible & (seq_adv != 0).to(eligible.device)[:, None]
    eligible[:, -1] = False  # ... never the final answer (sam keeps it, so p = 0 there anyway: stated, not relied on)
    masked = eligible & ~sam_keep  # (B, S)
    # per-stratum counts by a (2, B) x (B, S) product: row 0 negative rollouts, row 1 positive; exact in fp32 up to
    # 2^24 rollouts
    strata = torch.stack([~outcome, outcome]).float()  # (2, B)
    p = (strata @ masked.float()) / (strata @ eligible.float()).clamp(min=1)  # (2, S) in [0, 1]
    u = torch.rand(B, S, generator=generator, device=sam_keep.device)  # (B, S) in [0, 1)
    # u < p: p = 0 (sam masks nothing in the stratum) never drops, p = 1 always does
    drop = eligible & (u < p[outcome.long()])  # (B, S)
    return ~drop


def keep_weights(
    verdicts: torch.Tensor,
    outcome_correct: torch.Tensor,
    well_formed: torch.Tensor,
    *,
    policy: str = "sam",
    exception: bool = True,
    alpha: float = 0.0,
    known: torch.Tensor | None = None,
    exception_segments: tuple[int, int] = (0, 1),
    segment_tokens: torch.Tensor | None = None,
    seq_adv: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    agg: str = "seq-mean-token-mean",
) -> tuple[torch.Tensor, dict]:
    """Keep weights (B, S) fp32 (token policy: (B, 2S)) and diagnostics.

    verdicts (B, S) bool; outcome_correct, well_formed (B,) bool; known (B, S) bool or None (all known).
    generator: required by policy "random" (on the verdicts' device), unused otherwise. With segment_tokens
    (B, S_out) (tokens per output segment) the diagnostics include token fractions and the loss weights' change
    under the loss aggregation `agg`, and with seq_adv (B,) the advantage-weighted shares (see `diagnostics`).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown masking policy {policy!r}; choose from {POLICIES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if policy == "random" and generator is None:
        raise ValueError("policy 'random' needs generator= (a torch.Generator on the verdicts' device)")
    if policy == "random" and generator.device.type != verdicts.device.type:
        raise ValueError(f"generator is on {generator.device}, verdicts on {verdicts.device}")
    if (
        verdicts.dim() != 2
        or outcome_correct.shape != (verdicts.shape[0],)
        or well_formed.shape != outcome_correct.shape
    ):
        shapes = f"{tuple(verdicts.shape)}, {tuple(outcome_correct.shape)}, {tuple(well_formed.shape)}"
        raise ValueError(f"verdicts must be (B, S) and outcome_correct, well_formed (B,); got {shapes}")
    verdicts, outcome, well_formed = verdicts.bool(), outcome_correct.bool(), well_formed.bool()
    known = torch.ones_like(verdicts) if known is None else known.bool()
    B, S = verdicts.shape

    if policy == "none":
        weights = torch.ones(B, S, dtype=torch.float32, device=verdicts.device)
    else:
        keep = _sam_keep(verdicts, outcome, well_formed, known, exception, exception_segments)
        if policy == "sam":
            weights = keep.float()
        elif policy == "soft":
            weights = torch.where(keep, 1.0, alpha).float()
        elif policy == "sequence":
            drop = (~keep).any(dim=1, keepdim=True)  # (B, 1)
            weights = (~drop).float().expand(B, S).clone()
        elif policy == "random":
            weights = _random_keep(keep, outcome, well_formed, known, generator, seq_adv).float()
        else:  # token: interleave always-kept text segments with the boxes' sam weights
            weights = torch.stack([torch.ones_like(keep), keep], dim=2).reshape(B, 2 * S).float()
    return weights, diagnostics(weights, outcome, segment_tokens, seq_adv, agg=agg)


def token_loss_weights(weights: torch.Tensor, segment_tokens: torch.Tensor, agg: str) -> torch.Tensor:
    """(B, S) fp32: the weight one token of segment s of rollout b carries in the policy term of `policy_loss`
    under `agg`, i.e. its keep weight times the aggregation's normaliser (grm_kernels/policy_loss.py
    `policy_loss_normalizer` and `_sequence_weights`, at segment granularity). At ratio 1 this is
    |dloss / dlogp_t| / |A_b|.

    weights (B, S) keep weights in [0, 1]; segment_tokens (B, S) response tokens per segment. A token is kept when
    its keep weight is > 0 (as in the loss: a soft weight scales the token but still counts in the denominators).
    """
    tok = segment_tokens.float()  # (B, S)
    kept_per_seq = (tok * (weights > 0)).sum(dim=1)  # (B,)
    if agg == "token-mean":  # the batch's kept tokens
        norm = kept_per_seq.sum().clamp(min=1).expand_as(kept_per_seq)  # (B,)
    elif agg == "seq-mean-token-mean":  # the rollout's kept tokens x the rollouts with a kept token
        norm = kept_per_seq.clamp(min=1) * (kept_per_seq > 0).sum().clamp(min=1)  # (B,)
    elif agg == "seq-mean-token-sum":  # the rollouts with a kept token
        norm = (kept_per_seq > 0).sum().clamp(min=1).float().expand_as(kept_per_seq)  # (B,)
    else:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    return weights.float() / norm[:, None]  # (B, S)


def diagnostics(weights, outcome_correct, segment_tokens=None, seq_adv=None, *, agg="seq-mean-token-mean") -> dict:
    """What a keep-weight matrix does to a batch. 0-dim fp32 tensors, no host sync.

    weights (B, S) in [0, 1]; a soft weight w counts as 1 - w masked in the fractions.
    - seg_masked_frac_pos / _neg: share of segments masked in positive (correct) / negative rollouts.
    With segment_tokens (B, S) (response tokens per segment; rows that leave the loss, such as dropped groups,
    should count 0 tokens for the weights below to match the loss):
    - tok_masked_frac, tok_masked_frac_pos / _neg: share of response tokens masked, in all / positive / negative
      rollouts;
    - kept_weight_gain: mean of w_t / w0_t over the fully kept tokens (weight 1) of rollouts with a masked token,
      where w_t = `token_loss_weights(weights)` and w0_t = `token_loss_weights(ones)` under `agg`: the factor by
      which renormalisation over kept tokens scales the tokens that stay (1 when no rollout has a masked token).
      Soft tokens are left out of the mean: their ratio mixes the soft weight with the renormalisation.
    With seq_adv (B,) as well:
    - adv_mass_removed: sum |A_b| (1 - w) n / sum |A_b| n over segments with n tokens: the share of the
      advantage-weighted token count that masking removes, *before* the loss renormalises over kept tokens. It
      equals the share of the update's loss weight removed only where the normaliser does not depend on the mask
      (seq-mean-token-sum with no rollout fully masked);
    - weight_change: sum_t |A_b| |w_t - w0_t| / sum_t |A_b| w0_t: the L1 change of the advantage-weighted loss
      weights relative to the unmasked total (0 when nothing is masked). It counts both the weight taken off masked
      tokens and the weight renormalisation adds to kept ones: masking 65% of the tokens of every rollout under
      seq-mean-token-mean moves 0.65 of the weight and reads 0.65 + 0.65 = 1.3; without renormalisation
      (seq-mean-token-sum, no rollout fully masked) it equals adv_mass_removed.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    weights = weights.float()
    removed = 1.0 - weights  # (B, S)
    pos = outcome_correct.float()[:, None]
    neg = 1.0 - pos
    S = weights.shape[1]
    out = {
        "seg_masked_frac_pos": (removed * pos).sum() / (pos.sum() * S).clamp(min=1),
        "seg_masked_frac_neg": (removed * neg).sum() / (neg.sum() * S).clamp(min=1),
    }
    if segment_tokens is None:
        return out
    tok = segment_tokens.float()  # (B, S)
    out["tok_masked_frac"] = (removed * tok).sum() / tok.sum().clamp(min=1)
    out["tok_masked_frac_pos"] = (removed * tok * pos).sum() / (tok * pos).sum().clamp(min=1)
    out["tok_masked_frac_neg"] = (removed * tok * neg).sum() / (tok * neg).sum().clamp(min=1)

    w = token_loss_weights(weights, tok, agg)  # (B, S) per-token loss weight with the mask
    w0 = token_loss_weights(torch.ones_like(weights), tok, agg)  # (B, S) without: > 0 everywhere
    has_masked = ((removed > 0) & (tok > 0)).any(dim=1, keepdim=True)  # (B, 1)
    stay = tok * ((weights >= 1) & has_masked)  # (B, S) fully kept tokens of rollouts with a masked token
    gain_sum = (stay * w / w0).sum()
    out["kept_weight_gain"] = torch.where(stay.sum() > 0, gain_sum / stay.sum().clamp(min=1), 1.0)
    if seq_adv is not None:
        mass = seq_adv.abs().float()[:, None] * tok  # (B, S) |A_b| x tokens
        out["adv_mass_removed"] = (removed * mass).sum() / mass.sum().clamp(min=1e-12)
        # the denominator is the advantage-weighted loss weight of the unmasked batch: 0 only when every |A| is 0,
        # and then the numerator is 0 too
        out["weight_change"] = (mass * (w - w0).abs()).sum() / (mass * w0).sum().clamp(min=1e-12)
    return out
