"""Group-relative advantages over G completions per prompt (rewards laid out prompt-major: (P * G,)).

Methods:
- "grpo":   (r - mean_G) / (std_G + eps), std unbiased (torch.std, as the authors' verl code), eps 1e-6;
- "drgrpo": r - mean_G (Dr. GRPO: no std normalisation);
- "rloo":   r - mean of the other G - 1 rewards = G / (G - 1) * (r - mean_G).
Optional clamp to [-clamp, clamp] (the authors used 3). A group whose rewards are all equal carries no signal:
`zero_variance="keep"` keeps its rollouts with advantage exactly 0, "drop" also marks them invalid (the caller
leaves them out of the loss and its normaliser). Both count them.
"""

import torch

METHODS = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    method: str = "grpo",
    eps: float = 1e-6,
    clamp: float | None = 3.0,
    zero_variance: str = "keep",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(advantages (P*G,) fp32, valid (P*G,) bool, stats: dict of 0-dim tensors)."""
    if method not in METHODS:
        raise ValueError(f"unknown advantage method {method!r}; choose from {METHODS}")
    if zero_variance not in ("keep", "drop"):
        raise ValueError(f"zero_variance must be 'keep' or 'drop', got {zero_variance!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (P * {group_size},), got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # (P, G)
    mean = r.mean(dim=1, keepdim=True)
    if method == "grpo":
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    elif method == "drgrpo":
        adv = r - mean
    else:
        adv = (r - mean) * (group_size / (group_size - 1))
    if clamp is not None:
        adv = adv.clamp(-clamp, clamp)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1) zero-variance groups
    adv = torch.where(flat, 0.0, adv)
    valid = ~flat.expand_as(r) if zero_variance == "drop" else torch.ones_like(r, dtype=torch.bool)
    stats = {
        "zero_variance_groups": flat.sum(),
        "zero_variance_frac": flat.float().mean(),
        "reward_mean": r.mean(),
        "adv_abs_mean": adv.abs().mean(),
    }
    return adv.reshape(-1), valid.reshape(-1), stats
