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
              keep 1, each box's score tokens follow the sam rule.
Everything is tensor code on the verdicts' device, without host syncs.
"""

import torch

POLICIES = ("none", "sam", "soft", "sequence", "token")


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
) -> tuple[torch.Tensor, dict]:
    """Keep weights (B, S) fp32 (token policy: (B, 2S)) and diagnostics.

    verdicts (B, S) bool; outcome_correct, well_formed (B,) bool; known (B, S) bool or None (all known).
    With segment_tokens (B, S_out) (tokens per output segment) the diagnostics include token fractions, and with
    seq_adv (B,) the share of advantage mass removed.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown masking policy {policy!r}; choose from {POLICIES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
        else:  # token: interleave always-kept text segments with the boxes' sam weights
            weights = torch.stack([torch.ones_like(keep), keep], dim=2).reshape(B, 2 * S).float()
    return weights, diagnostics(weights, outcome, segment_tokens, seq_adv)


def diagnostics(weights, outcome_correct, segment_tokens=None, seq_adv=None) -> dict:
    """Fractions of segments (and tokens) masked in positive (correct) and negative rollouts, and the share of
    advantage mass removed. A soft weight w counts as 1 - w masked. 0-dim tensors, no host sync."""
    removed = 1.0 - weights  # (B, S)
    pos = outcome_correct.float()[:, None]
    neg = 1.0 - pos
    S = weights.shape[1]
    out = {
        "seg_masked_frac_pos": (removed * pos).sum() / (pos.sum() * S).clamp(min=1),
        "seg_masked_frac_neg": (removed * neg).sum() / (neg.sum() * S).clamp(min=1),
    }
    if segment_tokens is not None:
        tok = segment_tokens.float()
        out["tok_masked_frac_pos"] = (removed * tok * pos).sum() / (tok * pos).sum().clamp(min=1)
        out["tok_masked_frac_neg"] = (removed * tok * neg).sum() / (tok * neg).sum().clamp(min=1)
        if seq_adv is not None:
            mass = seq_adv.abs().float()[:, None] * tok  # (B, S)
            out["adv_mass_removed"] = (removed * mass).sum() / mass.sum().clamp(min=1e-12)
    return out
