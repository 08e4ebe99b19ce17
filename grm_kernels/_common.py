"""Helpers shared by the kernel files: implementation choice and interpreter detection.

Triton reads `TRITON_INTERPRET` when a `@triton.jit` function is defined, i.e. when the kernel module is imported,
so the flag is captured once here and every kernel module agrees with it.
"""

import os

import torch
import triton
import triton.language as tl

# True when Triton kernels run in the CPU interpreter (tests on a machine without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

IMPLS = ("auto", "triton", "ref")

# Floating-point contraction (a * b + c as one FMA) is pinned, not left to Triton's default: the default differs
# between Triton versions, and it changes the bits of every log-prob, so the same code would give different
# results (and old_logp != logp on the same weights) across an upgrade. On, as Triton <= 3.9 compiled by default.
FP_FUSION = True

# Rows per program of the split forwards' merge kernels (a few loads per row and range: memory-bound and small).
MERGE_BLOCK = 256


def resolve_impl(impl: str, tensor: torch.Tensor, op: str) -> str:
    """Map `impl` to "triton" or "ref"; "auto" picks Triton for CUDA tensors and the reference otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda else "ref"
    if impl == "triton" and not tensor.is_cuda and not INTERPRET:
        raise ValueError(
            f"{op}: impl='triton' got CPU tensors; run on CUDA, or set TRITON_INTERPRET=1 before triton is "
            "imported to use the (slow) interpreter"
        )
    return impl


def dot_precision(dtype: torch.dtype) -> str | None:
    """`input_precision` for `tl.dot`: IEEE products for fp32 inputs, Triton's default (None) otherwise.

    Triton's default for fp32 is TF32 (~1e-3 relative error), which would break the 2x rule against a PyTorch fp32
    matmul (no TF32 unless asked). 16-bit inputs have exact products either way.
    """
    return "ieee" if dtype == torch.float32 else None


# Whether dot_acc replaces tl.dot by a broadcast multiply (see dot_acc): under the interpreter, unless a test turns it
# off to run the tl.dot path itself with fp32 inputs, where the interpreter's tl.dot (numpy) is exact enough.
INTERPRET_DOT = INTERPRET


def interpret_dot() -> bool:
    return INTERPRET_DOT


@triton.jit
def dot_acc(a, b, acc, INTERPRET_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a (M, K), b (K, P), acc (M, P) fp32.

    Under the CPU interpreter (INTERPRET_DOT) `tl.dot` is replaced by a broadcast multiply and a sum over K:
    - the Triton 3.9 interpreter computes `tl.dot` on bf16 operands wrongly (results off by ~1e10, seen
      2026-11-22); upcasting is exact, since bf16/fp16 products are exact in fp32, as in the GPU's MMA;
    - the interpreter's `tl.dot` is numpy's BLAS matmul, whose result for a row depends on the row's position in
      the tile, so batch invariance could not be tested; a sum over an outer axis adds every element in the same
      order. On the GPU one MMA computes each output element the same way wherever its row sits.
    """
    if INTERPRET_DOT:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def emulate_bf16_rounding(dtype: torch.dtype) -> bool:
    """Whether kernels must round fp32 -> bf16 by hand before storing (meta-parameter ROUND_BF16).

    The Triton 3.9 CPU interpreter converts fp32 to bf16 by truncation (round toward zero), even when asked for
    "rtne" (seen 2026-11-22): a bias of -2^-9 relative on average, which fails the 2x rule on gradients. The GPU
    rounds to nearest-even; `round_bf16_rtne` reproduces that exactly in the interpreter.
    """
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def round_bf16_rtne(x):
    """fp32 tensor -> fp32 tensor holding the nearest bf16 value (ties to even), so a later cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_tf32_rtne(x):
    """fp32 tensor -> fp32 tensor holding the nearest TF32 value (10 mantissa bits, ties to even). The tensor cores
    read fp32 operands of a TF32 dot by truncating the low 13 bits (a bias toward zero, up to twice round-to-nearest's
    error); rounding first makes the dot exact on them."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def grouped_ids(pid, n_blocks, n_cols, GROUP: tl.constexpr):
    """(block, col) of program `pid` on a (n_blocks x n_cols) grid walked in groups of GROUP row blocks.

    Consecutive programs take the GROUP row blocks of one group for the same column, then the next column: the
    programs resident at once share a few row blocks (their operand stays in L2) and each column tile is read by
    GROUP programs at about the same time (one HBM read serves them all). The order changes which program runs
    when, never what a program computes, so results do not depend on it.
    """
    per_group = GROUP * n_cols
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(n_blocks - first, GROUP)  # the last group may be short
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def range_program(N, V, n_ranges, range_cols, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """What this program of a split forward owns: (rows (BLOCK_N,) int64, their mask, range index (int64), first
    column, end column) on the (row block x range) grid in grouped order. The end is at most V, and not above the
    first column for a range past V (its loop then does not run)."""
    pid_n, pid_r = grouped_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_ranges, GROUP)
    pid_r = pid_r.to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    v_lo = pid_r * range_cols
    return rows, rows < N, pid_r, v_lo, tl.minimum(v_lo + range_cols, V)


@triton.jit
def merge_rows(N, n_ranges, BLOCK: tl.constexpr):
    """What this program of a merge kernel owns in the (planes, R, N) partials: (rows (BLOCK,) int64, their mask,
    N as int64 (range r's rows start at r * N, past 2^31 at N = 2^31 / R), elements per plane R * N)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    n64 = N.to(tl.int64)
    return rows, rows < N, n64, n_ranges.to(tl.int64) * n64


def vocab_ranges(V: int, block_v: int, max_ranges: int) -> tuple[int, int]:
    """(number of ranges, columns per range) splitting a V-column vocabulary for the split forward kernels.

    A function of V and the launch configuration (device, dtype) only, never of the row count: the merge adds the
    ranges in a fixed order, so a row's result stays the same whatever the batch. Each range is a whole number of
    BLOCK_V tiles and holds at least one column; when the tiles do not divide evenly the last range is shorter.
    (The kernels would also accept a range past V, which reports "no columns": max -inf, sum 0.)
    """
    tiles = triton.cdiv(V, block_v)
    per = triton.cdiv(tiles, max(1, min(max_ranges, tiles)))  # tiles per range
    return triton.cdiv(tiles, per), per * block_v
