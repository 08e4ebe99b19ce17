"""Scoring a GRPO rollout batch, the method end to end before the loss: parse -> segment -> reward -> verdicts ->
group advantages -> masking weights -> the per-token segment ids the loss reads.

    rules = ScoringRules(policy="sam", segmenter="boxes")
    scored = score_rollouts(records, completion, response, tokenizer, rules, group_size=G, generator=gen)
    policy_loss(logp, old, scored.adv, seq_id, scored.step_id, scored.keep, ...)

Each piece has its own module (parse.py, segment.py, reward.py, verdict.py, advantage.py, mask.py); this one wires
them in the order DESIGN.md gives ("One GRPO step, as data"). A new masking rule belongs in mask.py, a new
advantage estimator in advantage.py, a new segmentation in segment.py (its `Layout`); this function passes the
rules on. The work is host-side string processing, once per step, on whole groups (no communication).
"""

from dataclasses import dataclass, fields

import torch

from sam.advantage import group_advantages
from sam.mask import keep_weights
from sam.prompt import NUM_BOXES
from sam.reward import outcome_reward
from sam.segment import Layout
from sam.verdict import box_verdicts, expand_to_segments, gold_box_verdicts, gold_verdicts


@dataclass(frozen=True)
class ScoringRules:
    """How rollouts are scored: train.py's flags of the same names (`of(cfg)` takes them from a config)."""

    fmt: str = "criteria"  # reasoning format the completions follow
    segmenter: str = "boxes"  # segmentation (sam/segment.py)
    verdicts: str = "box"  # verdict source (sam/verdict.py)
    policy: str = "sam"  # masking policy (sam/mask.py)
    exception: bool = True  # SAM's exception
    alpha: float = 0.5  # what a masked segment keeps under the soft policy
    agg: str = "seq-mean-token-mean"  # loss aggregation (for the masking diagnostics)
    adv_method: str = "grpo"  # advantage estimator (sam/advantage.py)
    adv_clamp: float = 3.0  # advantage clamp (0 = off)
    zero_variance: str = "keep"  # groups with equal rewards: keep or drop
    reward_correct: float = 1.0  # reward of a correct final label (sam/reward.py)
    malformed_penalty: float = 0.0  # subtracted from a malformed completion's reward
    ordinal_reward: bool = False  # partial credit for a near-miss label

    @classmethod
    def of(cls, cfg) -> "ScoringRules":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def layout(self) -> Layout:
        return Layout(self.segmenter, self.fmt)


@dataclass
class ScoredRollouts:
    """A scored rollout batch of B = groups x G completions, prompt-major."""

    step_id: torch.Tensor  # (B, T) int32 on the completions' device: segment of each token, -1 outside the loss
    adv: torch.Tensor  # (B,) fp32 sequence advantages
    keep: torch.Tensor  # (B, S) fp32 keep weight of each segment
    valid: torch.Tensor  # (B,) bool: in the loss (False for the groups --zero-variance drop leaves out)
    rewards: torch.Tensor  # (B,) fp32
    correct: torch.Tensor  # (B,) bool: final label right
    well_formed: torch.Tensor  # (B,) bool
    diagnostics: dict  # masking diagnostics (sam.mask.diagnostics) as "sam/<name>", advantages' as "adv/<name>"


def raw_verdicts(source: str, parses, texts, records, labels: torch.Tensor, fmt: str):
    """The verdicts of one source (sam/verdict.py): per box (box, gold-box) or per criteria step (gold)."""
    if source == "box":
        return box_verdicts(parses, labels, NUM_BOXES[fmt])
    if source == "gold-box":
        return gold_box_verdicts(parses, [r.gold for r in records], labels, NUM_BOXES[fmt])
    return gold_verdicts(texts, parses, [r.gold for r in records])


def score_rollouts(
    records,
    completion: torch.Tensor,
    response: torch.Tensor,
    tokenizer,
    rules: ScoringRules,
    *,
    group_size: int,
    generator: torch.Generator | None = None,
) -> ScoredRollouts:
    """Score the completions (B, T) (response mask (B, T) bool) of `records` (one per completion, each group's G
    copies together). `generator` draws the random control's masks (policy "random"; a CPU generator)."""
    layout = rules.layout
    step_id, parses, texts = layout.segment(completion, response, tokenizer)
    labels = torch.tensor([r.label for r in records])
    rewards, outcome = outcome_reward(
        parses,
        labels,
        correct=rules.reward_correct,
        malformed_penalty=rules.malformed_penalty,
        ordinal=rules.ordinal_reward,
    )
    raw = raw_verdicts(rules.verdicts, parses, texts, records, labels, rules.fmt)
    verdicts = expand_to_segments(raw, rules.segmenter, rules.fmt, source=rules.verdicts)
    adv, valid, adv_stats = group_advantages(
        rewards, group_size, method=rules.adv_method, clamp=rules.adv_clamp or None, zero_variance=rules.zero_variance
    )
    # tokens per segment of the rollouts in the loss (dropped groups count none), for the weight diagnostics
    seg_tokens = torch.stack([(step_id == s).sum(1) for s in range(layout.num_segments)], 1).cpu() * valid[:, None]
    keep, sam_diag = keep_weights(
        verdicts.correct,
        outcome["correct"],
        outcome["well_formed"],
        policy=rules.policy,
        exception=rules.exception,
        alpha=rules.alpha,
        known=verdicts.known,
        exception_segments=layout.exception_segments,
        segment_tokens=seg_tokens,
        seq_adv=adv,
        generator=generator,
        agg=rules.agg,
    )
    dev = completion.device
    step_id = torch.where(valid.to(dev)[:, None], step_id.to(dev), -1)  # dropped groups leave the loss
    diagnostics = {**{f"sam/{k}": v for k, v in sam_diag.items()}, **{f"adv/{k}": v for k, v in adv_stats.items()}}
    return ScoredRollouts(step_id, adv, keep, valid, rewards, outcome["correct"], outcome["well_formed"], diagnostics)
