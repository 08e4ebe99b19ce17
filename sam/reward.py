"""Outcome reward from the parse: correct final label -> `correct` (default 1.0; the authors' code used 2.0),
else 0; a malformed completion gets 0 minus `malformed_penalty`; optionally ordinal partial credit for a
well-formed wrong label, `correct * (1 - |y - l| / 4)` (4 = the width of the -1..3 scale). No format reward
beyond the penalty (as in the authors' setting). Every component is returned for logging.
"""

import torch

from sam.parse import ParseResult


def outcome_reward(
    parses: list[ParseResult],
    labels: torch.Tensor,
    *,
    correct: float = 1.0,
    malformed_penalty: float = 0.0,
    ordinal: bool = False,
) -> tuple[torch.Tensor, dict]:
    """(rewards (B,) fp32, components: dict of (B,) tensors) on the labels' device."""
    if len(parses) != labels.shape[0]:
        raise ValueError(f"{len(parses)} parses but {labels.shape[0]} labels")
    if malformed_penalty < 0:
        raise ValueError(f"malformed_penalty is subtracted; give it as a number >= 0, got {malformed_penalty}")
    device = labels.device
    well_formed = torch.tensor([p.ok for p in parses], dtype=torch.bool, device=device)
    predicted = torch.tensor([p.label if p.ok else -99 for p in parses], dtype=torch.long, device=device)
    is_correct = well_formed & (predicted == labels.long())
    base = is_correct.float() * correct
    partial = torch.zeros_like(base)
    if ordinal:
        distance = (predicted - labels.long()).abs().float()
        partial = torch.where(well_formed & ~is_correct, correct * (1 - distance / 4).clamp(min=0), 0.0)
    penalty = (~well_formed).float() * malformed_penalty
    rewards = base + partial - penalty
    return rewards, {
        "correct": is_correct,
        "well_formed": well_formed,
        "predicted": predicted,
        "ordinal_credit": partial,
        "malformed_penalty": penalty,
    }
