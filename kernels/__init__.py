"""Fused Triton ops; each module also holds its PyTorch reference (`<op>_ref`)."""

from kernels.logprob import token_logprobs, token_logprobs_ref

__all__ = ["token_logprobs", "token_logprobs_ref"]
