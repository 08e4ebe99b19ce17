"""Fused Triton ops; each module also holds its PyTorch reference (`<op>_ref`)."""

from kernels.logprob import token_logprobs, token_logprobs_ref
from kernels.policy_loss import LossNormalizer, policy_loss, policy_loss_normalizer, policy_loss_ref

__all__ = [
    "LossNormalizer",
    "policy_loss",
    "policy_loss_normalizer",
    "policy_loss_ref",
    "token_logprobs",
    "token_logprobs_ref",
]
