"""Numerical acceptance helpers shared by the kernel tests (STYLE.md, "Tests").

The 2x rule: a kernel's error against an fp64 gold value may be at most twice the error of the PyTorch reference
run in the same dtype, plus a small absolute floor. Both errors are printed on failure.
"""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def max_abs_err(x: torch.Tensor, gold: torch.Tensor) -> float:
    """Largest |x - gold|, NaN-aware: a NaN where gold is finite (or the reverse) counts as infinite error."""
    x, gold = x.detach().double().cpu(), gold.detach().double().cpu()
    nan_mismatch = torch.isnan(x) != torch.isnan(gold)
    if nan_mismatch.any():
        return float("inf")
    diff = (x - gold).abs()
    diff = torch.where(torch.isnan(gold), torch.zeros_like(diff), diff)
    return diff.max().item() if diff.numel() else 0.0


def assert_2x(name: str, out: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, floor: float) -> None:
    """Kernel output `out` vs `gold` is within 2x the same-dtype reference `ref`'s error, plus `floor`."""
    assert out.shape == gold.shape, f"{name}: shape {tuple(out.shape)} != gold {tuple(gold.shape)}"
    err_out, err_ref = max_abs_err(out, gold), max_abs_err(ref, gold)
    assert err_out <= 2 * err_ref + floor, (
        f"{name}: kernel error {err_out:.3e} > 2 x reference error {err_ref:.3e} + floor {floor:.1e}"
    )
