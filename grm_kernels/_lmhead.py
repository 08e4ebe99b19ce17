"""What the LM-head kernels share: the logit tile, the launch configuration, and the vocabulary-chunked backward.

Owner of the machinery common to the ops that read logits straight off an LM head, z = hidden @ weight^T / tau,
never storing them: grm_kernels/logprob.py (token log-probs and entropy) and grm_kernels/distill_kl.py (teacher /
student divergences). Each of them keeps its own forward, merge and dz kernels; from here they take
- `logits_tile`: one (BLOCK_N, BLOCK_V) fp32 tile of z, the inner step of every forward and dz kernel;
- `capability` and `lmhead_config`: tiles, vocabulary ranges and grouping by device and dtype, never by N;
- `chunked_backward`: d_hidden and d_weight from the op's dz kernel, one chunk of C vocabulary rows at a time:
  dz (N, C) = the op's kernel; d_hidden (N, D) fp32 += dz @ W[chunk]; d_weight[chunk] = dz^T @ hidden, with the
  two products in `_matmul_kernel` (launcher `matmul`). The chunk is as wide as `SCRATCH_BYTES` allows beside the
  accumulator, and at least `CHUNK_BYTES` (`chunk_width`), stored in `dz_dtype`.
No atomics anywhere: every output tile has one owner and a fixed reduction order, so the gradients are deterministic.
"""

import torch
import triton
import triton.language as tl

from grm_kernels._common import (
    FP_FUSION,
    INTERPRET,
    dot_acc,
    dot_precision,
    emulate_bf16_rounding,
    grouped_ids,
    interpret_dot,
    round_bf16_rtne,
)

# The backward's scratch memory: the (N, C) dL/dz chunk buffer and the (N, D) fp32 d_hidden accumulator together stay
# under SCRATCH_BYTES (under the 0.5 GiB of extra memory the benchmark allows at N = 16384, D = 4096), except that
# the chunk buffer always gets at least CHUNK_BYTES (a larger accumulator alone then decides the total).
SCRATCH_BYTES = 448 * 2**20
CHUNK_BYTES = 128 * 2**20
# input dtypes the kernels take (fp64 only through the references)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def logits_tile(
    # pointers
    hidden_ptr,  # (N, D) fp32 / bf16 / fp16
    weight_ptr,  # (V', D) same dtype; V' = V for the forward, the chunk width for the backward
    # index vectors
    rows,  # (BLOCK_N,) int64 row indices
    cols,  # (BLOCK_V,) int64 column indices into weight_ptr's rows
    row_mask,
    col_mask,
    # sizes
    D,
    # strides
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    # scalars
    inv_temp,
    # meta-parameters
    INTERPRET_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z tile (BLOCK_N, BLOCK_V) fp32 = hidden[rows] @ weight[cols]^T / tau; columns past the vocabulary are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        # int64: ds * stride_hd / stride_wd overflow int32 for a transposed or strided head with D * stride >= 2^31
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = ds < D
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        # W^T tile loaded directly in (BLOCK_D, BLOCK_V) layout
        w = tl.load(
            weight_ptr + cols[None, :] * stride_wv + ds[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_V)
        acc = dot_acc(h, w, acc, INTERPRET_DOT, DOT_PRECISION)
    z = acc * inv_temp
    return tl.where(col_mask[None, :], z, float("-inf"))


# Sizes specialised (no do_not_specialize): the contiguous dimension of every operand is D or the chunk width, and their
# known divisibility (by 16) lets the masked loads vectorise, which cp.async and the software pipeline need (with the
# sizes unspecialised the 16-bit loads were 2-byte scalars and the K loop was not pipelined). The row count N only
# ever gives a non-contiguous dimension; a new N class (1, multiple of 16, other) costs one compile, and the
# backward needs determinism, not batch invariance.
@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr,  # (M, K)
    b_ptr,  # (K, P)
    c_ptr,  # (M, P) out; read first when ACCUMULATE (then fp32)
    # sizes
    M,
    P,
    K,
    # strides
    stride_am,
    stride_ak,
    stride_bk,
    stride_bp,
    stride_cm,
    stride_cp,
    # meta-parameters
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,  # operands of different dtypes: multiply both in fp32
    INTERPRET_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """c (+)= a @ b with fp32 accumulation; one program owns one output tile, so the result is deterministic."""
    # grouped order: GROUP row blocks of `a` side by side, so each tile of `b` is read from HBM once per group
    pid_m, pid_p = grouped_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(P, BLOCK_P), GROUP)
    pid_m = pid_m.to(tl.int64)
    pid_p = pid_p.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    m_mask = rm < M
    p_mask = rp < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = rk < K
        # other=0.0: masked lanes are undefined without it, and they enter the dot product
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + rk[:, None] * stride_bk + rp[None, :] * stride_bp, mask=k_mask[:, None] & p_mask[None, :], other=0.0
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = dot_acc(a, b, acc, INTERPRET_DOT, DOT_PRECISION)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp
    c_mask = m_mask[:, None] & p_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    if ROUND_BF16:
        acc = round_bf16_rtne(acc)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def capability(device: torch.device) -> int | None:
    """The CUDA device's compute capability as one number (90 for sm_90), None off CUDA or under the interpreter.

    The launch configurations are keyed on it (bench.compile_check substitutes a target's number here).
    """
    if INTERPRET or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def tile_options(cfg: dict) -> dict:
    """The launch keywords an LM-head kernel takes from its configuration (`lmhead_config`; RANGES sizes the grid)."""
    options = {k: cfg[k] for k in ("GROUP", "BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")}
    return {**options, "enable_fp_fusion": FP_FUSION}


def lmhead_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles, vocabulary ranges and program grouping of the LM-head kernels. Depends on device and dtype only (never
    on N): a row's result must not depend on the batch.

    RANGES: the forward splits the vocabulary into up to RANGES ranges, one program per (row block, range), so even
    a few row blocks fill the GPU (at N = 4096, 32 row blocks x 32 ranges = 1024 programs for 132 SMs). GROUP: row
    blocks walked side by side (grm_kernels._common.grouped_ids) so that one read of a head tile serves GROUP programs.
    """
    cc = capability(device)
    if cc is None:
        # small tiles keep the interpreter quick on test shapes and exercise many ragged edges: 3 ranges of unequal
        # fill at the test vocabularies, groups of 2 row blocks with a short last group
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, RANGES=3, GROUP=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # the FMA path (IEEE products): 64 x 64 tiles, no spills (bench.compile_check)
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, RANGES=32, GROUP=8, num_warps=4, num_stages=3)
    # bf16 / fp16: 128-row tiles over 8 warps. 128 vocabulary columns where they fit (64 fp32 accumulator registers
    # per thread; 255 registers and no spill with the entropy on sm_80 / sm_90); sm_100's tensor-memory path spilled
    # 232 B at 128 columns and takes 64 (bench.compile_check, bench/RESULTS.md)
    block_v = 64 if cc >= 100 else 128
    return dict(BLOCK_N=128, BLOCK_V=block_v, BLOCK_D=64, RANGES=32, GROUP=8, num_warps=8, num_stages=3)


def _matmul_config(device: torch.device, dtype: torch.dtype, accumulate: bool) -> dict:
    if capability(device) is None:
        return dict(BLOCK_M=64, BLOCK_P=64, BLOCK_K=64, GROUP=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # FMA path: 128x128 tiles spilled 1.3-5.7 KB per thread on sm_80 (compile_check)
        return dict(BLOCK_M=64, BLOCK_P=64, BLOCK_K=32, GROUP=8, num_warps=4, num_stages=3)
    if accumulate:  # the fp32 read-modify-write epilogue: 128 x 256 tiles spilled 248-440 B (compile_check)
        return dict(BLOCK_M=128, BLOCK_P=128, BLOCK_K=64, GROUP=8, num_warps=8, num_stages=3)
    # write-only (d_weight): 128 x 256 tiles, 85 FLOP per operand byte instead of 64 (188-250 registers, no spills)
    return dict(BLOCK_M=128, BLOCK_P=256, BLOCK_K=64, GROUP=8, num_warps=8, num_stages=3)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """out (+)= a @ b in Triton with fp32 accumulation (any strides)."""
    M, K = a.shape
    P = b.shape[1]
    cfg = _matmul_config(a.device, torch.float32 if torch.float32 in (a.dtype, b.dtype) else a.dtype, accumulate)
    # mixed operands (an fp32 dz chunk with an fp16 weight or hidden): both go to fp32 in the kernel, multiplied as
    # TF32, which holds fp16 values exactly and keeps fp32's exponent range (dz_dtype's reason to be wide)
    upcast = a.dtype != b.dtype
    precision = "tf32" if upcast else dot_precision(a.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(P, cfg["BLOCK_P"]),)
    _matmul_kernel[grid](
        a,
        b,
        out,
        M,
        P,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        ACCUMULATE=accumulate,
        UPCAST=upcast,
        INTERPRET_DOT=interpret_dot(),
        DOT_PRECISION=precision,
        ROUND_BF16=emulate_bf16_rounding(out.dtype),
        GROUP=cfg["GROUP"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_P=cfg["BLOCK_P"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the backward's logits-gradient chunk: the inputs' dtype, except fp32 for fp16 inputs.

    dz = g (onehot - p) / tau: an upstream gradient of a token mean over many tokens (~1e-4) times probabilities
    ~1/V (~1e-5) is far below fp16's smallest subnormal (6e-8), so in fp16 most of the softmax part would be zero.
    bf16 has fp32's exponent range and keeps its own dtype (half the buffer).
    """
    return torch.float32 if dtype == torch.float16 else dtype


def chunk_width(N: int, V: int, elem_bytes: int, block: int, accumulator_bytes: int = 0) -> int:
    """Vocabulary rows per backward chunk, a multiple of `block`: the (N, C) buffer takes what SCRATCH_BYTES leaves
    beside the d_hidden accumulator, and at least CHUNK_BYTES.

    Each chunk reads and writes the fp32 (N, D) accumulator once, so fewer, wider chunks cut that traffic: at
    N = 16384, D = 4096 (a 256 MiB accumulator), 192 MiB of buffer gives C = 6144 and 25 chunks instead of 38.
    """
    budget = max(CHUNK_BYTES, SCRATCH_BYTES - accumulator_bytes)
    width = budget // max(1, N * elem_bytes)
    width = max(block, width // block * block)
    return min(width, triton.cdiv(V, block) * block)


def chunked_backward(hidden, weight, V: int, need_dh: bool, need_dw: bool, launch_dz) -> tuple:
    """(d_hidden, d_weight) of a loss on the logits hidden @ weight[:V]^T / tau, one vocabulary chunk at a time.

    hidden (N, D) and weight (>= V, D): head rows from V on take no part in the loss and get exactly zero gradient.
    `launch_dz(v0, c, dz_chunk)` launches the op's own kernel, which writes dL/d(logits) / tau of vocabulary rows
    [v0, v0 + c) into dz_chunk (N, c), dtype dz_dtype(hidden.dtype) (the op closes over its other arguments). Per
    chunk, in order: the dz kernel, then d_hidden (fp32 accumulator) += dz_chunk @ weight[v0 : v0 + c], then
    d_weight[v0 : v0 + c] = dz_chunk^T @ hidden. Returns d_hidden in hidden's dtype and d_weight in weight's (each
    None unless asked for).
    """
    N, D = hidden.shape
    d_hidden_acc = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    if need_dw:
        # the rows no chunk writes: those past V (a head padded past the vocabulary in use, distill_kl), or all of
        # them when there are no tokens
        d_weight[V if N else 0 :].zero_()
    if N == 0:
        return (d_hidden_acc.to(hidden.dtype) if need_dh else None), d_weight

    dz_type = dz_dtype(hidden.dtype)
    width = chunk_width(N, V, dz_type.itemsize, 256, N * D * 4 if need_dh else 0)
    dz = torch.empty(N, width, dtype=dz_type, device=hidden.device)  # (N, C) chunk buffer
    for v0 in range(0, V, width):
        c = min(width, V - v0)
        dz_chunk = dz[:, :c]  # (N, C) view
        launch_dz(v0, c, dz_chunk)
        w_chunk = weight[v0 : v0 + c]  # (C, D) view
        if need_dh:
            matmul(dz_chunk, w_chunk, d_hidden_acc, accumulate=True)  # (N, C) @ (C, D)
        if need_dw:
            matmul(dz_chunk.T, hidden, d_weight[v0 : v0 + c], accumulate=False)  # (C, N) @ (N, D)
    d_hidden = d_hidden_acc.to(hidden.dtype) if need_dh else None
    return d_hidden, d_weight
