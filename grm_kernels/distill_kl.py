"""Token-level distillation losses between a teacher and a student, straight from both LM heads, never forming logits.

Math, for token t with student hidden state hs_t (Ds,), student head Ws (Vs, Ds), teacher hidden state ht_t (Dt,),
teacher head Wt (Vt, Dt), temperature tau and the shared vocabulary V <= min(Vs, Vt):

    zs_t = Ws[:V] hs_t / tau,  zt_t = Wt[:V] ht_t / tau           (V,)  computed tile by tile, never stored
    q = softmax(zs_t) (student),  p = softmax(zt_t) (teacher)

    fkl  = KL(p || q) = sum_v p_v (log p_v - log q_v)             forward KL: mass-covering
    rkl  = KL(q || p) = sum_v q_v (log q_v - log p_v)             reverse KL: mode-seeking
    jsd  = [beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)),   m = beta p + (1 - beta) q

`jsd` is the generalised Jensen-Shannon divergence of GKD (Agarwal et al., arXiv 2306.13649, with P = teacher), divided
by beta (1 - beta). The division makes it continuous in beta with the two KLs as its end points: as beta -> 0 it
tends to fkl, as beta -> 1 to rkl, and beta = 0 / 1 compute exactly fkl / rkl. At beta = 0.5 it is 4 x the
textbook JSD (multiply by beta (1 - beta) for the value of Liger-Kernel's JSD, which mixes m the same way).
No tau^2 factor is applied (Hinton et al. scale soft-target losses by tau^2; callers who want it multiply).

Gradients flow to the student only (teacher inputs are constants). With per-token upstream gradient g_t:

    fkl:  dL/dzs_v = g (q_v - p_v)
    rkl:  dL/dzs_v = g q_v (log q_v - log p_v - rkl)
    jsd:  dL/dzs_v = g q_v (log q_v - log m_v - KL(q || m)) / beta
    dL/dhs = 1/tau sum_v dL/dzs_v Ws_v,      dL/dWs_v = 1/tau sum_t dL/dzs_tv hs_t   (rows v >= V get 0)

Vocabularies: models that share a tokenizer often pad their heads to different sizes (152064 vs 151936 rows for
Qwen2.5 7B vs 0.5B). Both softmaxes then run over the first V = min(Vs, Vt) rows, or over `vocab_size` rows when
given (pass the tokenizer's length to leave the padding rows out as well); a different Vs and Vt without
`vocab_size` is announced with a warning.

Forward (split over the vocabulary as in grm_kernels/logprob.py): `_distill_fwd_kernel` runs one program per (row block,
vocabulary range); each sweeps its range, computing the student and the teacher logit tile with `logits_tile`
(grm_kernels/_lmhead.py) and folding them into online statistics (max and sum-exp of both rows). fkl and rkl need one
sweep: the expectation E_p[(zt - mt) - (zs - ms)] is carried along relative to the running maxima, rescaled when they
move (as the entropy in logprob.py). `_distill_merge_kernel` combines the ranges in index order (rescaling each range's
expectation by both models' shifts). jsd needs the normalised log-probs for log m, so once the statistics are merged
`_distill_jsd_kernel` sweeps the ranges a second time and `_distill_jsd_merge_kernel` adds their KL(p || m) and
KL(q || m). Only O(N) statistics leave the forward: both maxima and log-sum-exps and one auxiliary value per row (the
divergence itself for fkl / rkl, KL(q || m) for jsd).

Backward, per chunk of C vocabulary rows, in the loop logprob.py uses too (grm_kernels/_lmhead.py's `chunked_backward`):
`_distill_bwd_dz_kernel` recomputes both logit tiles and writes dL/dzs (N, C) in the student's dtype (fp32 for an fp16
student); `_matmul_kernel` then accumulates d_hidden and writes the chunk of d_weight (student head rows past V get
zero). Deterministic (no atomics) and batch-invariant (launch configuration and ranges independent of N, merges in a
fixed order).

mask (N,) bool: rows with mask False get loss 0 and zero gradient (their hidden states must still be finite: they
enter d_weight's matmul with a zero coefficient).

References: Hinton et al. (arXiv 1503.02531) for distillation; MiniLLM (Gu et al., arXiv 2306.08543) for the reverse
KL; GKD (Agarwal et al., arXiv 2306.13649) for the generalised JSD and on-policy distillation; Liger-Kernel's fused
linear JSD for the idea of fusing the heads into the divergence.
"""

import math
import warnings

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

KINDS = ("fkl", "rkl", "jsd")
_KIND_ID = {"fkl": 0, "rkl": 1, "jsd": 2}

# ----------------------------------------------------------------------------------------------------------------
# Reference


def _effective_kind(kind: str, beta: float) -> str:
    """jsd at beta 0 / 1 is fkl / rkl exactly (the formula is 0 / 0 there)."""
    if kind == "jsd" and beta == 0.0:
        return "fkl"
    if kind == "jsd" and beta == 1.0:
        return "rkl"
    return kind


def distill_kl_ref(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
):
    """Readable PyTorch reference: materialises both (N, V) logit matrices. The spec for tests and impl="ref".

    Logits are computed in each model's dtype, the softmaxes and divergences in fp32 (fp64 for fp64 inputs).
    """
    V = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0])
    out_dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    zs = (student_hidden @ student_weight[:V].T).to(out_dtype) / temperature  # (N, V)
    zt = (teacher_hidden.detach() @ teacher_weight[:V].detach().T).to(out_dtype) / temperature  # (N, V)
    log_q = torch.log_softmax(zs, dim=-1)
    log_p = torch.log_softmax(zt, dim=-1)
    kind = _effective_kind(kind, beta)
    if kind == "fkl":
        loss = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "rkl":
        loss = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        loss = kl_pm / (1 - beta) + kl_qm / beta
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _student_teacher_tiles(
    s_hidden_ptr,
    s_weight_ptr,
    t_hidden_ptr,
    t_weight_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    Ds,
    Dt,
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    inv_temp,
    INTERPRET_DOT: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(student, teacher) logit tiles (BLOCK_N, BLOCK_V) fp32 of the same rows and vocabulary columns."""
    zs = logits_tile(
        s_hidden_ptr,
        s_weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        Ds,
        stride_shn,
        stride_shd,
        stride_swv,
        stride_swd,
        inv_temp,
        INTERPRET_DOT,
        S_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    zt = logits_tile(
        t_hidden_ptr,
        t_weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        Dt,
        stride_thn,
        stride_thd,
        stride_twv,
        stride_twd,
        inv_temp,
        INTERPRET_DOT,
        T_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    return zs, zt


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """log(beta p + (1 - beta) q) from log p and log q (finite)."""
    a = log_p + log_beta
    b = log_q + log_1m_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit(do_not_specialize=["N", "n_ranges", "range_cols"])  # one binary for every batch (batch invariance)
def _distill_fwd_kernel(
    # pointers
    s_hidden_ptr,  # (N, Ds) student
    s_weight_ptr,  # (>= V, Ds)
    t_hidden_ptr,  # (N, Dt) teacher
    t_weight_ptr,  # (>= V, Dt)
    part_ptr,  # (5, R, N) fp32, out: per vocabulary range, ms, ss, mt, st and acc (KIND 0 / 1) of the range
    # sizes
    N,
    V,
    Ds,
    Dt,
    n_ranges,  # R
    range_cols,  # columns per range, a multiple of BLOCK_V
    # strides
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    # scalars
    inv_temp,
    # meta-parameters
    KIND: tl.constexpr,  # 0 fkl, 1 rkl, 2 jsd (statistics only; the divergence is a second pass)
    INTERPRET_DOT: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_N rows x one vocabulary range [v_lo, v_hi), row blocks grouped as in grm_kernels/logprob.py
    rows, row_mask, pid_r, v_lo, v_hi = range_program(N, V, n_ranges, range_cols, GROUP, BLOCK_N)

    # online statistics per row; for fkl (rkl) `acc` = sum_v e_t (e_s) * [(zt - mt) - (zs - ms)] (negated for rkl)
    # relative to the running maxima, so the final expectation never subtracts two large numbers
    ms = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    mt = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    st = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V  # a tile never crosses a range boundary
        zs, zt = _student_teacher_tiles(
            s_hidden_ptr,
            s_weight_ptr,
            t_hidden_ptr,
            t_weight_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            Ds,
            Dt,
            stride_shn,
            stride_shd,
            stride_swv,
            stride_swd,
            stride_thn,
            stride_thd,
            stride_twv,
            stride_twd,
            inv_temp,
            INTERPRET_DOT,
            S_PRECISION,
            T_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        ms_new = tl.maximum(ms, tl.max(zs, axis=1))
        mt_new = tl.maximum(mt, tl.max(zt, axis=1))
        alpha_s = tl.exp(ms - ms_new)  # 0 on the first tile
        alpha_t = tl.exp(mt - mt_new)
        es = tl.exp(zs - ms_new[:, None])  # 0 on masked columns
        et = tl.exp(zt - mt_new[:, None])
        if KIND < 2:
            # (zt - mt) - (zs - ms) of the earlier columns moves by (mt - mt_new) - (ms - ms_new) with the maxima;
            # on the first tile (maxima -inf, sums 0) that is taken as 0, and masked columns (z = -inf) give 0,
            # so no inf - inf is ever formed
            moved = (tl.where(st > 0, mt, mt_new) - mt_new) - (tl.where(ss > 0, ms, ms_new) - ms_new)
            zt_0 = tl.where(col_mask[None, :], zt, mt_new[:, None])
            zs_0 = tl.where(col_mask[None, :], zs, ms_new[:, None])
            diff = (zt_0 - mt_new[:, None]) - (zs_0 - ms_new[:, None])
            if KIND == 0:
                acc = alpha_t * (acc + moved * st) + tl.sum(et * diff, axis=1)
            else:
                acc = alpha_s * (acc - moved * ss) - tl.sum(es * diff, axis=1)
        ss = alpha_s * ss + tl.sum(es, axis=1)
        st = alpha_t * st + tl.sum(et, axis=1)
        ms = ms_new
        mt = mt_new

    # int64 offsets (pid_r is int64): 5 * R * N passes 2^31 at N = 429M / R
    out = part_ptr + pid_r * N + rows
    plane = n_ranges.to(tl.int64) * N
    tl.store(out, ms, mask=row_mask)
    tl.store(out + plane, ss, mask=row_mask)
    tl.store(out + 2 * plane, mt, mask=row_mask)
    tl.store(out + 3 * plane, st, mask=row_mask)
    if KIND < 2:
        tl.store(out + 4 * plane, acc, mask=row_mask)


@triton.jit(do_not_specialize=["N", "n_ranges"])  # one binary for every batch (batch invariance)
def _distill_merge_kernel(
    # pointers
    part_ptr,  # (5, R, N) fp32: the forward's per-range statistics
    mask_ptr,  # (N,) bool, read only when HAS_MASK
    loss_ptr,  # (N,) fp32, out (KIND 0 / 1)
    s_max_ptr,  # (N,) fp32, out: row max of zs
    s_logsum_ptr,  # (N,) fp32, out: log sum exp(zs - max)
    t_max_ptr,  # (N,) fp32, out
    t_logsum_ptr,  # (N,) fp32, out
    aux_ptr,  # (N,) fp32, out (KIND 0 / 1): the divergence, unmasked (the backward of rkl needs it)
    # sizes
    N,
    n_ranges,
    # meta-parameters
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row statistics (and fkl / rkl) from the per-range ones, ranges in index order (batch invariance)."""
    rows, row_mask, n64, plane = merge_rows(N, n_ranges, BLOCK)
    ms = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    mt = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for r in range(0, n_ranges):
        at = part_ptr + r * n64 + rows
        ms = tl.maximum(ms, tl.load(at, mask=row_mask, other=float("-inf")))
        mt = tl.maximum(mt, tl.load(at + 2 * plane, mask=row_mask, other=float("-inf")))
    ms = tl.where(row_mask, ms, 0.0)  # rows past N: finite, so no -inf - -inf below (nothing is stored for them)
    mt = tl.where(row_mask, mt, 0.0)
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    st = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(0, n_ranges):
        at = part_ptr + r * n64 + rows
        ss_r = tl.load(at + plane, mask=row_mask, other=0.0)
        st_r = tl.load(at + 3 * plane, mask=row_mask, other=0.0)
        # an empty range (maxima -inf, sums 0) adds nothing; the where keeps (-inf) * 0 out of the shifts
        shift_s = tl.where(ss_r > 0, tl.load(at, mask=row_mask, other=0.0) - ms, 0.0)
        shift_t = tl.where(st_r > 0, tl.load(at + 2 * plane, mask=row_mask, other=0.0) - mt, 0.0)
        ss += tl.exp(shift_s) * ss_r
        st += tl.exp(shift_t) * st_r
        if KIND < 2:
            # the range's (zt - mt_r) - (zs - ms_r) is (zt - mt) - (zs - ms) less shift_t - shift_s, and its weights
            # e^(z - m_r) are the global ones over e^shift (the rescaling of the kernel's own loop)
            acc_r = tl.load(at + 4 * plane, mask=row_mask, other=0.0)
            if KIND == 0:
                acc += tl.exp(shift_t) * (acc_r + (shift_t - shift_s) * st_r)
            else:
                acc += tl.exp(shift_s) * (acc_r - (shift_t - shift_s) * ss_r)

    ss = tl.where(row_mask, ss, 1.0)  # rows past N: no log(0) (nothing is stored for them)
    st = tl.where(row_mask, st, 1.0)
    log_ss = tl.log(ss)
    log_st = tl.log(st)
    tl.store(s_max_ptr + rows, ms, mask=row_mask)
    tl.store(s_logsum_ptr + rows, log_ss, mask=row_mask)
    tl.store(t_max_ptr + rows, mt, mask=row_mask)
    tl.store(t_logsum_ptr + rows, log_st, mask=row_mask)
    if KIND < 2:
        if KIND == 0:
            loss = acc / st - log_st + log_ss  # E_p[log p - log q]
        else:
            loss = acc / ss - log_ss + log_st  # E_q[log q - log p]
        valid = row_mask
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0)
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)
        tl.store(aux_ptr + rows, loss, mask=row_mask)


@triton.jit(do_not_specialize=["N", "n_ranges", "range_cols"])  # one binary for every batch (batch invariance)
def _distill_jsd_kernel(
    # pointers
    s_hidden_ptr,  # (N, Ds) student
    s_weight_ptr,  # (>= V, Ds)
    t_hidden_ptr,  # (N, Dt) teacher
    t_weight_ptr,  # (>= V, Dt)
    s_max_ptr,  # (N,) fp32: the merged row statistics
    s_logsum_ptr,
    t_max_ptr,
    t_logsum_ptr,
    part_ptr,  # (2, R, N) fp32, out: KL(p || m) and KL(q || m) over each range
    # sizes
    N,
    V,
    Ds,
    Dt,
    n_ranges,
    range_cols,
    # strides
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    # scalars
    inv_temp,
    log_beta,
    log_1m_beta,
    # meta-parameters
    INTERPRET_DOT: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """jsd's second sweep: log m needs the normalised log-probs, so it runs once the statistics are merged."""
    rows, row_mask, pid_r, v_lo, v_hi = range_program(N, V, n_ranges, range_cols, GROUP, BLOCK_N)
    ms = tl.load(s_max_ptr + rows, mask=row_mask, other=0.0)
    mt = tl.load(t_max_ptr + rows, mask=row_mask, other=0.0)
    log_ss = tl.load(s_logsum_ptr + rows, mask=row_mask, other=0.0)
    log_st = tl.load(t_logsum_ptr + rows, mask=row_mask, other=0.0)
    kl_pm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl_qm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        zs, zt = _student_teacher_tiles(
            s_hidden_ptr,
            s_weight_ptr,
            t_hidden_ptr,
            t_weight_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            Ds,
            Dt,
            stride_shn,
            stride_shd,
            stride_swv,
            stride_swd,
            stride_thn,
            stride_thd,
            stride_twv,
            stride_twd,
            inv_temp,
            INTERPRET_DOT,
            S_PRECISION,
            T_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        log_q = tl.where(col_mask[None, :], (zs - ms[:, None]) - log_ss[:, None], 0.0)
        log_p = tl.where(col_mask[None, :], (zt - mt[:, None]) - log_st[:, None], 0.0)
        log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
        q = tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
        p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
        kl_pm += tl.sum(p * (log_p - log_m), axis=1)
        kl_qm += tl.sum(q * (log_q - log_m), axis=1)
    out = part_ptr + pid_r * N + rows
    tl.store(out, kl_pm, mask=row_mask)
    tl.store(out + n_ranges.to(tl.int64) * N, kl_qm, mask=row_mask)


@triton.jit(do_not_specialize=["N", "n_ranges"])  # one binary for every batch (batch invariance)
def _distill_jsd_merge_kernel(
    # pointers
    part_ptr,  # (2, R, N) fp32: per-range KL(p || m), KL(q || m)
    mask_ptr,  # (N,) bool, read only when HAS_MASK
    loss_ptr,  # (N,) fp32, out
    aux_ptr,  # (N,) fp32, out: KL(q || m), unmasked (the backward needs it)
    # sizes
    N,
    n_ranges,
    # scalars
    beta,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, row_mask, n64, plane = merge_rows(N, n_ranges, BLOCK)
    kl_pm = tl.zeros((BLOCK,), dtype=tl.float32)
    kl_qm = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(0, n_ranges):  # index order: a fixed order of addition (batch invariance)
        kl_pm += tl.load(part_ptr + r * n64 + rows, mask=row_mask, other=0.0)
        kl_qm += tl.load(part_ptr + plane + r * n64 + rows, mask=row_mask, other=0.0)
    loss = kl_pm / (1.0 - beta) + kl_qm / beta
    valid = row_mask
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(aux_ptr + rows, kl_qm, mask=row_mask)


@triton.jit(do_not_specialize=["N"])  # C stays specialised, as in logprob.py's dz kernel (vectorised stores)
def _distill_bwd_dz_kernel(
    # pointers
    s_hidden_ptr,  # (N, Ds)
    s_weight_ptr,  # (C, Ds): the vocabulary chunk of the student head
    t_hidden_ptr,  # (N, Dt)
    t_weight_ptr,  # (C, Dt): the same rows of the teacher head
    mask_ptr,  # (N,) bool, read only when HAS_MASK
    s_max_ptr,
    s_logsum_ptr,
    t_max_ptr,
    t_logsum_ptr,
    aux_ptr,
    grad_ptr,  # (N,) fp32 upstream gradient, contiguous
    dz_ptr,  # (N, C) dz_dtype(student dtype), out: dL/d(student logits) / tau
    # sizes
    N,
    C,
    Ds,
    Dt,
    # strides
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    stride_dzn,
    stride_dzv,
    # scalars
    inv_temp,
    beta,  # jsd only, 0 < beta < 1; with its logs
    log_beta,
    log_1m_beta,
    # meta-parameters
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INTERPRET_DOT: tl.constexpr,
    S_PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    ROUND_TF32: tl.constexpr,  # dz feeds a TF32 dot (fp16 inputs): round it to nearest first
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grouped order as in grm_kernels/logprob.py's dz kernel: GROUP row blocks side by side over the chunk's tiles
    pid_n, pid_v = grouped_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(C, BLOCK_V), GROUP)
    pid_n = pid_n.to(tl.int64)
    pid_v = pid_v.to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < C
    valid = row_mask
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0)

    zs, zt = _student_teacher_tiles(
        s_hidden_ptr,
        s_weight_ptr,
        t_hidden_ptr,
        t_weight_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        Ds,
        Dt,
        stride_shn,
        stride_shd,
        stride_swv,
        stride_swd,
        stride_thn,
        stride_thd,
        stride_twv,
        stride_twd,
        inv_temp,
        INTERPRET_DOT,
        S_PRECISION,
        T_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    ms = tl.load(s_max_ptr + rows, mask=row_mask, other=0.0)
    mt = tl.load(t_max_ptr + rows, mask=row_mask, other=0.0)
    log_ss = tl.load(s_logsum_ptr + rows, mask=row_mask, other=0.0)
    log_st = tl.load(t_logsum_ptr + rows, mask=row_mask, other=0.0)
    # masked columns (z = -inf) are set to log-prob 0 and probability 0, so no inf - inf or 0 * inf appears
    log_q = tl.where(col_mask[None, :], (zs - ms[:, None]) - log_ss[:, None], 0.0)
    log_p = tl.where(col_mask[None, :], (zt - mt[:, None]) - log_st[:, None], 0.0)
    q = tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
    if KIND == 0:
        dz = q - tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
    elif KIND == 1:
        aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
        dz = q * (log_q - log_p - aux[:, None])
    else:
        aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
        log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
        dz = q * (log_q - log_m - aux[:, None]) / beta
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    dz = tl.where(valid[:, None], dz * (g * inv_temp)[:, None], 0.0)
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


def _strides(hs, ws, ht, wt):
    return (
        hs.stride(0),
        hs.stride(1),
        ws.stride(0),
        ws.stride(1),
        ht.stride(0),
        ht.stride(1),
        wt.stride(0),
        wt.stride(1),
    )


def _beta_args(kind_id: int, beta: float) -> tuple[float, float, float]:
    """(beta, log beta, log(1 - beta)) for jsd; placeholders for the two KLs, which do not read them."""
    if kind_id != _KIND_ID["jsd"]:
        return 0.5, 0.0, 0.0
    return beta, math.log(beta), math.log1p(-beta)


def distill_config(hs: torch.Tensor, ht: torch.Tensor) -> dict:
    """Tiles from both models' dtypes (never from N). Two logit tiles live at once here, so the tiles are smaller than
    logprob's (`lmhead_config`): an fp32 operand on either side takes the fp32 tiles with half the rows (an fp32 teacher
    on 16-bit tiles ran the FMA path and spilled; at 64 rows fp32 spilled 16-280 B); 16-bit pairs take 64 rows and up to
    128 vocabulary columns: 64 x 128 on sm_80 / sm_90, 64 x 64 on sm_100 (logprob's columns there); 128 rows spilled
    8-32 B in jsd's second sweep on sm_90 / sm_100 (bench.compile_check)."""
    wide = torch.float32 in (hs.dtype, ht.dtype)
    cfg = dict(lmhead_config(hs.device, torch.float32 if wide else hs.dtype))
    if wide:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
    else:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)  # logprob's columns: 128, or 64 on sm_100
    return cfg


def distill_kl_forward(hs, ws, ht, wt, mask, V: int, kind_id: int, beta: float, inv_temp: float):
    """Launch the forward on checked inputs (no autograd): (loss (N,) fp32, statistics for the backward). The
    autograd function's forward, and what bench.compile_check compiles."""
    N = hs.shape[0]
    f32 = dict(dtype=torch.float32, device=hs.device)
    loss, s_max, s_logsum, t_max, t_logsum, aux = (torch.empty(N, **f32) for _ in range(6))
    stats = (s_max, s_logsum, t_max, t_logsum, aux)
    if N == 0:
        return loss, stats
    cfg = distill_config(hs, ht)
    n_ranges, range_cols = vocab_ranges(V, cfg["BLOCK_V"], cfg["RANGES"])
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * n_ranges,)
    merge_grid = (triton.cdiv(N, MERGE_BLOCK),)
    mask_arg = mask if mask is not None else loss  # placeholder pointer, never read without HAS_MASK
    heads = (hs, ws, ht, wt)
    sizes = (N, V, hs.shape[1], ht.shape[1], n_ranges, range_cols)
    tiles = dict(
        INTERPRET_DOT=interpret_dot(),
        S_PRECISION=dot_precision(hs.dtype),
        T_PRECISION=dot_precision(ht.dtype),
        **tile_options(cfg),
    )
    part = torch.empty(5 if kind_id < 2 else 4, n_ranges, N, **f32)  # O(R N) between the kernels
    _distill_fwd_kernel[grid](*heads, part, *sizes, *_strides(*heads), inv_temp, KIND=kind_id, **tiles)
    _distill_merge_kernel[merge_grid](
        part,
        mask_arg,
        loss,
        *stats,
        N,
        n_ranges,
        KIND=kind_id,
        HAS_MASK=mask is not None,
        BLOCK=MERGE_BLOCK,
        num_warps=4,
        enable_fp_fusion=FP_FUSION,
    )
    if kind_id == _KIND_ID["jsd"]:
        _, log_beta, log_1m_beta = _beta_args(kind_id, beta)
        kl_part = torch.empty(2, n_ranges, N, **f32)
        _distill_jsd_kernel[grid](
            *heads, *stats[:4], kl_part, *sizes, *_strides(*heads), inv_temp, log_beta, log_1m_beta, **tiles
        )
        _distill_jsd_merge_kernel[merge_grid](
            kl_part,
            mask_arg,
            loss,
            aux,
            N,
            n_ranges,
            beta,
            HAS_MASK=mask is not None,
            BLOCK=MERGE_BLOCK,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return loss, stats


def distill_kl_backward(hs, ws, ht, wt, mask, stats, grad, V, kind_id, beta, inv_temp, need_dh, need_dw):
    """Launch the backward (no autograd): (d_student_hidden, d_student_weight), each None unless asked for, from the
    forward's statistics and the upstream gradient. The vocabulary chunks and the two gradient products are
    grm_kernels._lmhead.chunked_backward's (student head rows from V on get zero); this op supplies its dz kernel."""
    N = hs.shape[0]
    cfg = distill_config(hs, ht)
    grad = grad.contiguous()

    def launch_dz(v0, c, dz_chunk):  # dz_chunk: dz_dtype(student dtype), fp32 for fp16 (g * p underflows in fp16)
        ws_chunk, wt_chunk = ws[v0 : v0 + c], wt[v0 : v0 + c]
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(c, cfg["BLOCK_V"]),)
        _distill_bwd_dz_kernel[grid](
            hs,
            ws_chunk,
            ht,
            wt_chunk,
            mask if mask is not None else grad,
            *stats,
            grad,
            dz_chunk,
            N,
            c,
            hs.shape[1],
            ht.shape[1],
            *_strides(hs, ws_chunk, ht, wt_chunk),
            dz_chunk.stride(0),
            dz_chunk.stride(1),
            inv_temp,
            *_beta_args(kind_id, beta),
            KIND=kind_id,
            HAS_MASK=mask is not None,
            INTERPRET_DOT=interpret_dot(),
            S_PRECISION=dot_precision(hs.dtype),
            T_PRECISION=dot_precision(ht.dtype),
            ROUND_BF16=emulate_bf16_rounding(dz_chunk.dtype),
            ROUND_TF32=dz_chunk.dtype != hs.dtype,
            **tile_options(cfg),
        )

    return chunked_backward(hs, ws, V, need_dh, need_dw, launch_dz)


class _DistillKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, mask, V, kind_id, beta, inv_temp):
        # the kernels read mask[row] as mask_ptr + row: a strided view must be made dense first
        mask = mask.contiguous() if mask is not None else None
        loss, stats = distill_kl_forward(hs, ws, ht, wt, mask, V, kind_id, beta, inv_temp)
        ctx.save_for_backward(hs, ws, ht, wt, mask, *stats)
        ctx.args = (V, kind_id, beta, inv_temp)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hs, ws, ht, wt, mask, *stats = ctx.saved_tensors
        d_hidden, d_weight = distill_kl_backward(
            hs, ws, ht, wt, mask, stats, grad, *ctx.args, *ctx.needs_input_grad[:2]
        )
        return d_hidden, d_weight, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _shared_vocab(student_weight, teacher_weight, vocab_size) -> int:
    Vs, Vt = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if Vs != Vt:  # Python's default warning filter shows it once per call site
            warnings.warn(
                f"distill_kl: the student head has {Vs} rows and the teacher head {Vt}; the loss runs over the "
                f"shared first {min(Vs, Vt)} (pass vocab_size=len(tokenizer) to leave the padding rows out too)",
                stacklevel=3,
            )
        return min(Vs, Vt)
    return vocab_size


def _check_inputs(hs, ws, ht, wt, kind, beta, temperature, mask, vocab_size) -> None:
    op = "distill_kl"
    named = {"student_hidden": hs, "student_weight": ws, "teacher_hidden": ht, "teacher_weight": wt}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 2-D tensor, got {shape}")
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{op}: {name} has unsupported dtype {t.dtype}")
    if hs.shape[1] != ws.shape[1]:
        raise ValueError(f"{op}: student hidden size mismatch: hidden {tuple(hs.shape)}, weight {tuple(ws.shape)}")
    if ht.shape[1] != wt.shape[1]:
        raise ValueError(f"{op}: teacher hidden size mismatch: hidden {tuple(ht.shape)}, weight {tuple(wt.shape)}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"{op}: student has {hs.shape[0]} tokens, teacher {ht.shape[0]}; they must be aligned")
    if hs.dtype != ws.dtype or ht.dtype != wt.dtype:
        raise TypeError(
            f"{op}: hidden and weight must share a dtype per model: student {hs.dtype}/{ws.dtype}, "
            f"teacher {ht.dtype}/{wt.dtype}"
        )
    if len({hs.device, ws.device, ht.device, wt.device}) != 1:
        raise ValueError(f"{op}: tensors on different devices: {hs.device}, {ws.device}, {ht.device}, {wt.device}")
    if min(ws.shape[0], wt.shape[0]) == 0:
        raise ValueError(f"{op}: empty vocabulary (student {ws.shape[0]} rows, teacher {wt.shape[0]})")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= float(beta) <= 1.0):
        raise ValueError(f"{op}: beta must be a number in [0, 1], got {beta!r}")
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < float("inf")):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if vocab_size is not None and not (
        isinstance(vocab_size, int) and 1 <= vocab_size <= min(ws.shape[0], wt.shape[0])
    ):
        raise ValueError(
            f"{op}: vocab_size must be an int in [1, {min(ws.shape[0], wt.shape[0])}] (the smaller "
            f"head), got {vocab_size!r}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (hs.shape[0],):
            what = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{op}: mask must be a bool tensor of shape ({hs.shape[0]},), got {what}")
        if mask.device != hs.device:
            raise ValueError(f"{op}: mask is on {mask.device}, the hidden states on {hs.device}")


def distill_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token divergence (N,) fp32 between teacher and student next-token distributions, never forming logits.

    student_hidden (N, Ds) and student_weight (Vs, Ds); teacher_hidden (N, Dt) and teacher_weight (Vt, Dt); each
    model in fp32 / bf16 / fp16 (fp64 with impl="ref" only), the two may differ. kind: "fkl" KL(teacher || student),
    "rkl" KL(student || teacher), "jsd" the generalised JSD / (beta (1 - beta)) (see the module docstring; beta 0
    and 1 give fkl and rkl). temperature divides both models' logits. mask (N,) bool: False rows give 0 and no
    gradient. vocab_size: softmax over the first vocab_size head rows (default: the smaller head). Differentiable
    w.r.t. the student's hidden states and head only. impl: "auto" (Triton on CUDA, reference otherwise), "triton",
    "ref".
    """
    _check_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, kind, beta, temperature, mask, vocab_size
    )
    V = _shared_vocab(student_weight, teacher_weight, vocab_size)
    impl = resolve_impl(impl, student_hidden, "distill_kl")
    if impl == "ref":
        return distill_kl_ref(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            kind=kind,
            beta=beta,
            temperature=temperature,
            mask=mask,
            vocab_size=V,
        )
    if torch.float64 in (student_hidden.dtype, teacher_hidden.dtype):
        raise TypeError("distill_kl: fp64 is supported by impl='ref' only")
    kind = _effective_kind(kind, float(beta))
    return _DistillKL.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        mask,
        V,
        _KIND_ID[kind],
        float(beta),
        1.0 / float(temperature),
    )
