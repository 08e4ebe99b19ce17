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


def record_chunks(monkeypatch):
    """Spy on the shared chunked backward: the widths of the d_weight chunks it computes, in order."""
    import grm_kernels._lmhead as lmhead  # the module whose name the launchers look up at call time

    widths, matmul = [], lmhead.matmul

    def spy(a, b, out, *, accumulate):
        if not accumulate:  # d_weight[chunk] = dz^T @ hidden, a = dz^T (C, N)
            widths.append(a.shape[0])
        matmul(a, b, out, accumulate=accumulate)

    monkeypatch.setattr(lmhead, "matmul", spy)
    return widths


def dirty_allocations(monkeypatch):
    """Fresh float tensors from torch.empty_like hold NaN (on the CPU they are often zero pages by luck): rows a
    kernel should have written, or zeroed, then show."""
    empty_like = torch.empty_like

    def dirty(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", dirty)
