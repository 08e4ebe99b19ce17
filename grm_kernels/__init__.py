"""Fused Triton ops; each module also holds its PyTorch reference (`<op>_ref`).

INTERPRET: whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was imported), so
callers can accept impl="triton" on CPU tensors.
"""

from grm_kernels._common import INTERPRET
from grm_kernels.distill_kl import distill_kl, distill_kl_ref
from grm_kernels.logprob import token_logprobs, token_logprobs_ref
from grm_kernels.policy_loss import LossNormalizer, policy_loss, policy_loss_normalizer, policy_loss_ref

__all__ = [
    "INTERPRET",
    "LossNormalizer",
    "distill_kl",
    "distill_kl_ref",
    "policy_loss",
    "policy_loss_normalizer",
    "policy_loss_ref",
    "token_logprobs",
    "token_logprobs_ref",
]
