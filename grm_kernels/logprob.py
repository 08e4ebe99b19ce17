"""Token log-probs (and entropy) straight from the LM head, without materialising the logits.

Math, for token t with final hidden state h_t (D,), head weight W (V, D), temperature tau and target y_t:

    z_t    = W h_t / tau                          (V,)  logits: computed tile by tile, never stored
    lse_t  = log sum_v exp(z_tv)
    logp_t = z_t[y_t] - lse_t
    H_t    = lse_t - sum_v p_tv z_tv,             p_t = softmax(z_t)

With upstream per-token gradients g_t = dL/dlogp_t and e_t = dL/dH_t (token log-probs feed a ratio, so the
upstream gradient is per token, never a single scalar):

    dL/dz_tv = g_t (1[v = y_t] - p_tv) - e_t p_tv (z_tv - lse_t + H_t)
    dL/dh_t  = 1/tau sum_v dL/dz_tv W_v           dL/dW_v = 1/tau sum_t dL/dz_tv h_t

Shapes: N tokens, D hidden size, V vocab size (any V: the ragged last vocab block is masked to -inf).

Forward (two kernels). `_logprob_fwd_kernel`: one program per (block of BLOCK_N rows, vocabulary range); the
vocabulary is cut into up to RANGES ranges of whole BLOCK_V tiles (`grm_kernels._common.vocab_ranges`, a function of V
and the device only), so a few row blocks still fill the GPU. A program sweeps its range tile by tile; each logit
tile (`logits_tile`) is a `tl.dot` over D with fp32 accumulation, folded into an online max / sum-exp (and, for the
entropy, an online sum of p * (z - max)); the target logit is picked up in the same pass. It writes its range's partial
statistics (max, sum-exp, entropy sum, target logit): 4 floats per row and range. Programs run in grouped order
(`grouped_ids`): GROUP row blocks side by side per range, so one read of a head tile from HBM serves GROUP
programs and the group's hidden rows stay in L2. `_logprob_merge_kernel` then combines the ranges of each row in
index order (the merge of Cut Cross-Entropy's split-V forward) into logp, the row max m and log sum exp(z - m)
(saved for backward) and the entropy: O(N) memory between forward and backward (O(R N) between the two kernels).

Backward (`chunked_backward`, shared with distill_kl), per chunk of C vocabulary rows (C as wide as `SCRATCH_BYTES`
allows for the chunk buffer and the d_hidden accumulator together, and at least `CHUNK_BYTES` of buffer: fewer
chunks, less accumulator traffic):
1. `_logprob_bwd_dz_kernel` recomputes the logit tiles of the chunk and writes dL/dz (N, C) in the input dtype
   (fp32 for fp16 inputs), programs grouped as in the forward;
2. `_matmul_kernel` accumulates d_hidden (N, D) += dz @ W[chunk] in an fp32 buffer;
3. `_matmul_kernel` writes d_weight[chunk] = dz^T @ hidden, complete in one pass over all N rows.
`logits_tile`, the launch configuration (`lmhead_config`), the chunk loop and `_matmul_kernel` live in
grm_kernels/_lmhead.py; the forward, merge and dz kernels here.
No atomics: every output tile has one owner and a fixed reduction order, so the gradients are deterministic.
Never an (N, V) tensor: the largest temporary is the (N, C) chunk plus the (N, D) fp32 accumulator.
Rooflines at a realistic shape (estimates until a GPU measures them): docs/kernels.md.

Batch invariance: the launch configuration and the vocabulary ranges depend on the device, dtype and V only, never
on N; rows do not interact inside a tile and the merge adds the ranges in a fixed order, so a row's logp is bitwise
the same whatever N is and wherever the row sits.

Targets: int64; `ignore_index` rows give logp 0, entropy 0 and exactly zero gradient. A target outside [0, V)
that is not `ignore_index` gives logp NaN in both implementations (raising would need a host sync on every call;
the NaN poisons the loss, which a training loop must check for).

References: the online softmax of Milakov & Gimelshein (arXiv 1805.02867); Cut Cross-Entropy (Wijmans et al.,
arXiv 2411.09009) for logits that never leave on-chip memory and the split-vocabulary forward with a merge;
Liger-Kernel's fused linear cross-entropy for the vocabulary-chunked backward.
"""

import torch
import triton
import triton.language as tl

from grm_kernels._common import (
    FP_FUSION,
    MERGE_BLOCK,
    dot_precision,
    emulate_bf16_rounding,
    grouped_ids,
    interpret_dot,
    merge_rows,
    range_program,
    resolve_impl,
    round_bf16_rtne,
    round_tf32_rtne,
    vocab_ranges,
)
from grm_kernels._lmhead import FLOAT_DTYPES, chunked_backward, lmhead_config, logits_tile, tile_options

# ----------------------------------------------------------------------------------------------------------------
# Reference


def token_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    upcast: bool = False,
):
    """Readable PyTorch reference: materialises the (N, V) logits. The spec for tests, benchmarks and impl="ref".

    The logits are computed in the inputs' dtype (fp32 with `upcast=True`) and the softmax in fp32 (fp64 for fp64
    inputs, which is how tests build their gold values).
    """
    if upcast and hidden.dtype != torch.float64:
        hidden, weight = hidden.float(), weight.float()
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(out_dtype) / temperature  # (N, V)
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
    vocab = weight.shape[0]
    valid = targets != ignore_index  # (N,)
    in_range = (targets >= 0) & (targets < vocab)  # (N,)
    safe_targets = torch.where(in_range, targets, torch.zeros_like(targets))
    logp = logprobs.gather(1, safe_targets[:, None]).squeeze(1)  # (N,)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)  # (N,)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit(do_not_specialize=["N", "n_ranges", "range_cols"])  # one binary for every batch (batch invariance)
def _logprob_fwd_kernel(
    # pointers
    hidden_ptr,  # (N, D) fp32 / bf16 / fp16
    weight_ptr,  # (V, D) same dtype
    targets_ptr,  # (N,) int64
    part_ptr,  # (4, R, N) fp32, out: per vocabulary range, row max m, sum exp(z - m), entropy sum t, target logit
    # sizes
    N,
    V,
    D,
    n_ranges,  # R
    range_cols,  # columns per range, a multiple of BLOCK_V
    # strides
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    # scalars
    inv_temp,
    ignore_index,
    # meta-parameters
    WITH_ENTROPY: tl.constexpr,
    INTERPRET_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_N rows x one vocabulary range [v_lo, v_hi); a group's row blocks run side by side
    rows, row_mask, pid_r, v_lo, v_hi = range_program(N, V, n_ranges, range_cols, GROUP, BLOCK_N)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)  # (BLOCK_N,) int64

    # Online statistics per row, relative to the running max m:
    #   s = sum exp(z - m),  t = sum exp(z - m) * (z - m)  =>  lse = m + log s,  H = log s - t / s.
    # Tracking t relative to m avoids the cancellation of lse - sum p z when logits are large.
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V  # a tile never crosses a range boundary (range_cols is a multiple of BLOCK_V)
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_hn,
            stride_hd,
            stride_wv,
            stride_wd,
            inv_temp,
            INTERPRET_DOT,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )  # (BLOCK_N, BLOCK_V) fp32, -inf past V
        # every tile starts below V, so it holds a real column and m_new is finite after the first tile
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new[:, None])  # 0 on masked columns
        if WITH_ENTROPY:
            # rescale t to the new max: sum e_old * (z - m_new) = alpha * (t + (m - m_new) * s); guarded because
            # (m - m_new) * s is (-inf) * 0 on the first tile
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            ez = e * tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(ez, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        # the target column lies in one tile of one range; elsewhere this adds 0
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    # int64 offsets (pid_r is int64): 4 * R * N passes 2^31 at N = 512M / R
    out = part_ptr + pid_r * N + rows
    plane = n_ranges.to(tl.int64) * N
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, t, mask=row_mask)
    tl.store(out + 3 * plane, z_tgt, mask=row_mask)


@triton.jit(do_not_specialize=["N", "n_ranges"])  # one binary for every batch (batch invariance)
def _logprob_merge_kernel(
    # pointers
    part_ptr,  # (4, R, N) fp32: the forward's per-range statistics
    targets_ptr,  # (N,) int64
    logp_ptr,  # (N,) fp32, out
    max_ptr,  # (N,) fp32, out: row max of z, saved for backward
    logsum_ptr,  # (N,) fp32, out: log sum exp(z - max), saved for backward
    entropy_ptr,  # (N,) fp32, out: written only when WITH_ENTROPY
    # sizes
    N,
    V,
    n_ranges,
    # scalars
    ignore_index,
    # meta-parameters
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row statistics from the per-range ones, ranges taken in index order (a fixed order: batch invariance)."""
    rows, row_mask, n64, plane = merge_rows(N, n_ranges, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for r in range(0, n_ranges):
        m = tl.maximum(m, tl.load(part_ptr + r * n64 + rows, mask=row_mask, other=float("-inf")))
    m = tl.where(row_mask, m, 0.0)  # rows past N: finite, so no -inf - -inf below (nothing is stored for them)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(0, n_ranges):
        at = part_ptr + r * n64 + rows
        m_r = tl.load(at, mask=row_mask, other=float("-inf"))
        s_r = tl.load(at + plane, mask=row_mask, other=0.0)
        # an empty range (m_r = -inf, s_r = 0) adds nothing; the where keeps (-inf) * 0 out of the shift
        shift = tl.where(s_r > 0, m_r - m, 0.0)
        scale = tl.exp(shift) * s_r
        s += scale
        if WITH_ENTROPY:
            t_r = tl.load(at + 2 * plane, mask=row_mask, other=0.0)
            # sum_v e^(z - m) (z - m) over the range = e^(m_r - m) (t_r + (m_r - m) s_r)
            t += tl.exp(shift) * t_r + shift * scale
        z_tgt += tl.load(at + 3 * plane, mask=row_mask, other=0.0)  # one range holds it, the others hold 0

    # lse = m + log s is never formed: (z - m) - log s keeps the precision that rounding lse at the magnitude
    # of the logits would lose (it measurably hurt the gradients of peaked rows)
    s = tl.where(row_mask, s, 1.0)  # rows past N: no log(0) (nothing is stored for them)
    log_s = tl.log(s)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    logp = tl.where(in_range, (z_tgt - m) - log_s, float("nan"))
    logp = tl.where(valid, logp, 0.0)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(max_ptr + rows, m, mask=row_mask)
    tl.store(logsum_ptr + rows, log_s, mask=row_mask)
    if WITH_ENTROPY:
        entropy = tl.where(valid, log_s - t / s, 0.0)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)


# N and v_start vary per call; C (a multiple of 256, or V's remainder) stays specialised: its divisibility lets the dz
# stores vectorise (gradients need determinism, not batch invariance)
@triton.jit(do_not_specialize=["N", "v_start"])
def _logprob_bwd_dz_kernel(
    # pointers
    hidden_ptr,  # (N, D) fp32 / bf16 / fp16
    weight_ptr,  # (C, D) same dtype: the vocabulary chunk starting at row v_start of the head weight
    targets_ptr,  # (N,) int64
    max_ptr,  # (N,) fp32
    logsum_ptr,  # (N,) fp32
    entropy_ptr,  # (N,) fp32, read only when WITH_ENTROPY
    grad_logp_ptr,  # (N,) fp32, contiguous
    grad_entropy_ptr,  # (N,) fp32, contiguous, read only when WITH_ENTROPY
    dz_ptr,  # (N, C) dz_dtype(inputs' dtype), out: dL/d(logits) = dL/dz / tau
    # sizes
    N,
    C,
    D,
    v_start,
    # strides
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_dzn,
    stride_dzv,
    # scalars
    inv_temp,
    ignore_index,
    # meta-parameters
    WITH_ENTROPY: tl.constexpr,
    INTERPRET_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    ROUND_TF32: tl.constexpr,  # dz feeds a TF32 dot (fp16 inputs): round it to nearest first
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grouped order: the programs resident at once cover GROUP row blocks (their hidden rows stay in L2) and walk
    # the chunk's vocabulary tiles, each tile of the head read from HBM once per group
    pid_n, pid_v = grouped_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(C, BLOCK_V), GROUP)
    pid_n = pid_n.to(tl.int64)
    pid_v = pid_v.to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # within the chunk
    row_mask = rows < N
    col_mask = cols < C

    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(logsum_ptr + rows, mask=row_mask, other=0.0)
    # ignored rows get zero upstream gradient here, so their dz row (and gradient contribution) is exactly 0
    g = tl.where(valid, tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0), 0.0)

    z = logits_tile(
        hidden_ptr,
        weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        D,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        inv_temp,
        INTERPRET_DOT,
        DOT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )  # (BLOCK_N, BLOCK_V) fp32
    logprob = (z - row_max[:, None]) - log_s[:, None]  # log softmax, -inf on masked columns
    p = tl.exp(logprob)  # 0 on masked columns
    is_tgt = (cols[None, :] + v_start) == tgt[:, None]
    dz = tl.where(is_tgt, g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        ge = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0), 0.0)
        # dH/dz_v = -p_v (z_v - lse + H); masked columns (z = -inf, p = 0) get 0, not 0 * inf
        z_centred = tl.where(col_mask[None, :], logprob + ent[:, None], 0.0)
        dz -= ge[:, None] * p * z_centred
    dz = dz * inv_temp
    if ROUND_BF16:
        dz = round_bf16_rtne(dz)
    if ROUND_TF32:
        dz = round_tf32_rtne(dz)
    tl.store(
        dz_ptr + rows[:, None] * stride_dzn + cols[None, :] * stride_dzv,
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def token_logprobs_forward(hidden, weight, targets, inv_temp: float, ignore_index: int, with_entropy: bool):
    """Launch the forward on checked inputs (no autograd): (logp, row max, log sum exp(z - max), entropy), each (N,)
    fp32; the entropy is empty without `with_entropy`. The autograd function's forward, and what bench.compile_check
    compiles."""
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    row_max = torch.empty(N, dtype=torch.float32, device=hidden.device)
    log_sum = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, row_max, log_sum, entropy
    cfg = lmhead_config(hidden.device, hidden.dtype)
    n_ranges, range_cols = vocab_ranges(V, cfg["BLOCK_V"], cfg["RANGES"])
    part = torch.empty(4, n_ranges, N, dtype=torch.float32, device=hidden.device)  # O(R N) between the two kernels
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * n_ranges,)
    _logprob_fwd_kernel[grid](
        hidden,
        weight,
        targets,
        part,
        N,
        V,
        D,
        n_ranges,
        range_cols,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        inv_temp,
        ignore_index,
        WITH_ENTROPY=with_entropy,
        INTERPRET_DOT=interpret_dot(),
        DOT_PRECISION=dot_precision(hidden.dtype),
        **tile_options(cfg),
    )
    _logprob_merge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
        part,
        targets,
        logp,
        row_max,
        log_sum,
        entropy if with_entropy else log_sum,
        N,
        V,
        n_ranges,
        ignore_index,
        WITH_ENTROPY=with_entropy,
        BLOCK=MERGE_BLOCK,
        num_warps=4,
        enable_fp_fusion=FP_FUSION,
    )
    return logp, row_max, log_sum, entropy


def token_logprobs_backward(
    hidden,
    weight,
    targets,
    row_max,
    log_sum,
    entropy,
    grad_logp,
    grad_entropy,
    inv_temp,
    ignore_index,
    need_dh,
    need_dw,
):
    """Launch the backward (no autograd): (d_hidden, d_weight), each None unless asked for, from the forward's saved
    statistics and the upstream gradients (grad_entropy None: no entropy term). The vocabulary chunks and the two
    gradient products are grm_kernels._lmhead.chunked_backward's; this op supplies its dz kernel."""
    N, D = hidden.shape
    with_entropy = grad_entropy is not None
    cfg = lmhead_config(hidden.device, hidden.dtype)
    precision = dot_precision(hidden.dtype)
    grad_logp = grad_logp.contiguous()  # a sum()'s backward hands an expanded (stride 0) gradient
    grad_entropy = grad_entropy.contiguous() if with_entropy else grad_logp
    entropy = entropy if with_entropy else log_sum  # placeholder pointer, never read

    def launch_dz(v0, c, dz_chunk):
        w_chunk = weight[v0 : v0 + c]  # (C, D) view
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(c, cfg["BLOCK_V"]),)
        _logprob_bwd_dz_kernel[grid](
            hidden,
            w_chunk,
            targets,
            row_max,
            log_sum,
            entropy,
            grad_logp,
            grad_entropy,
            dz_chunk,
            N,
            c,
            D,
            v0,
            hidden.stride(0),
            hidden.stride(1),
            w_chunk.stride(0),
            w_chunk.stride(1),
            dz_chunk.stride(0),
            dz_chunk.stride(1),
            inv_temp,
            ignore_index,
            WITH_ENTROPY=with_entropy,
            INTERPRET_DOT=interpret_dot(),
            DOT_PRECISION=precision,
            ROUND_BF16=emulate_bf16_rounding(dz_chunk.dtype),
            ROUND_TF32=dz_chunk.dtype != hidden.dtype,
            **tile_options(cfg),
        )

    return chunked_backward(hidden, weight, weight.shape[0], need_dh, need_dw, launch_dz)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, return_entropy):
        # the kernels read targets[row] as targets_ptr + row: a strided view must be made dense first
        targets = targets.contiguous()
        inv_temp = 1.0 / temperature
        logp, row_max, log_sum, entropy = token_logprobs_forward(
            hidden, weight, targets, inv_temp, ignore_index, return_entropy
        )
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum, entropy)
        ctx.inv_temp, ctx.ignore_index, ctx.return_entropy = inv_temp, ignore_index, return_entropy
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, row_max, log_sum, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden, d_weight = token_logprobs_backward(
            hidden,
            weight,
            targets,
            row_max,
            log_sum,
            entropy,
            grad_logp,
            grad_entropy if ctx.return_entropy else None,
            ctx.inv_temp,
            ctx.ignore_index,
            need_dh,
            need_dw,
        )
        return d_hidden, d_weight, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _check_inputs(hidden, weight, targets, temperature) -> None:
    op = "token_logprobs"
    if not (
        isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(targets, torch.Tensor)
    ):
        raise TypeError(f"{op}: hidden, weight and targets must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{op}: hidden must be (N, D) and weight (V, D); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary (V = 0)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"{op}: targets must be ({hidden.shape[0]},) to match hidden; got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: unsupported dtype {hidden.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{op}: tensors on different devices: {hidden.device}, {weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < float("inf")):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """Log-probability of each target token under softmax(hidden @ weight^T / temperature), never forming logits.

    hidden (N, D) and weight (V, D) in fp32 / bf16 / fp16 (fp64 only with impl="ref"); targets (N,) int64.
    Returns logp (N,) fp32, and entropy (N,) fp32 with `return_entropy=True`. Differentiable w.r.t. hidden and
    weight. impl: "auto" (Triton on CUDA, reference otherwise), "triton" or "ref".
    """
    _check_inputs(hidden, weight, targets, temperature)
    impl = resolve_impl(impl, hidden, "token_logprobs")
    if impl == "ref":
        return token_logprobs_ref(
            hidden, weight, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    if hidden.dtype == torch.float64:
        raise TypeError("token_logprobs: fp64 is supported by impl='ref' only")
    return _TokenLogprobs.apply(hidden, weight, targets, float(temperature), int(ignore_index), bool(return_entropy))
