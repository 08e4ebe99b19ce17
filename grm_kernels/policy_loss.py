"""Clipped-surrogate policy loss with step-segmented masked advantages formed inside the kernel.

Inputs are flat over the N tokens of a (micro-)batch of B rollouts: token t belongs to rollout seq_id[t] and to
its step segment step_id[t] (-1 outside the response: prompt, padding). Per token (PAPER.md, "Objective"):

    A_t    = seq_adv[seq_id[t]] * keep[seq_id[t], step_id[t]]           SAM: keep in [0, 1], 0 = segment masked
    r_t    = logp_t - old_logp_t, clamped to [-c, c]                     c = log_ratio_clamp (ln 1e3)
    rho_t  = exp(r_t)
    pg_t   = -A_t rho_t, or -A_t clip(rho_t, 1 - eps_low, 1 + eps_high) where that is strictly larger (clipped)
    pg_t   = min(pg_t, -dual_clip A_t)  for A_t < 0                      dual clip
    kl_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                  k3 estimator of KL(pi || ref)

A response token is *kept* when keep > 0. The policy term aggregates over kept tokens, the KL term over all
response tokens (the unmasked response mask, as the authors' code does):

    token-mean           sum_t w_t pg_t / (kept tokens)
    seq-mean-token-mean  sum_b [sum_{t in b} pg_t / (kept tokens of b)] / (rollouts with a kept token)   (paper)
    seq-mean-token-sum   sum_b [sum_{t in b} pg_t] / (rollouts with a kept token)
    loss = policy term + kl_coef * KL term (same mode, response tokens instead of kept tokens)

A fully masked rollout contributes nothing and is not counted. The counts come from a `LossNormalizer`; computed
on the whole batch (and summed over ranks) and handed to every micro-batch call, the micro-batch losses add up to
the whole batch's loss, even when a rollout's tokens are split across micro-batches.

Gradient: only w.r.t. logp, dL/dlogp_t = g * w_t * dpg_t/dlogp_t (+ kl term), with g the upstream scalar gradient.
At the clip boundaries (rho exactly 1 - eps_low or 1 + eps_high) a token is not clipped and keeps its gradient;
the log-ratio clamp passes the gradient on [-c, c] inclusive (as `torch.clamp`). Everything runs on device: no
host syncs, metrics come back as 0-dim tensors.

A step_id >= S or a seq_id outside [0, B) on a response token makes the loss NaN (checking would need a host
sync); so does a NaN in any input.
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from grm_kernels._common import FP_FUSION, resolve_impl

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
METRICS = (
    "clip_frac_low",  # kept tokens with A < 0 clipped at 1 - eps_low
    "clip_frac_high",  # kept tokens with A > 0 clipped at 1 + eps_high
    "dual_clip_frac",  # kept tokens with A < 0 capped by the dual clip
    "ratio_mean",  # mean rho over response tokens
    "ratio_max",  # max rho over response tokens
    "approx_kl",  # mean (rho - 1) - log rho over response tokens: k3 estimate of KL(old || new)
    "ref_kl",  # mean k3 to the reference over response tokens (0 without ref_logp)
    "masked_frac",  # response tokens whose segment keep weight is 0
    "kept_adv_mean",  # mean A_t over kept tokens
)
# per-block partial sums written by the forward kernel, in this order
_PG, _KL, _KEPT, _RESP, _CLIP_LO, _CLIP_HI, _DUAL, _RATIO, _APPROX_KL, _REF_KL, _MASKED, _ADV = range(12)
_NUM_PARTIALS = 12


class LossNormalizer(NamedTuple):
    """Denominators of the aggregation, as tensors (no host sync). Build with `policy_loss_normalizer`."""

    kept_per_seq: torch.Tensor  # (B,) fp32: kept tokens of each rollout
    resp_per_seq: torch.Tensor  # (B,) fp32: response tokens of each rollout
    pg: torch.Tensor  # () fp32: kept tokens (token-mean) or rollouts with a kept token (seq-mean-*)
    kl: torch.Tensor  # () fp32: response tokens (token-mean) or rollouts with a response token (seq-mean-*)


def policy_loss_normalizer(seq_id, step_id, keep, *, agg: str = "seq-mean-token-mean") -> LossNormalizer:
    """Counts for `agg` over the given tokens. For several micro-batches, call it on the whole batch and pass the
    result to every `policy_loss` call. Across ranks, all-reduce only the two scalars `pg` and `kl` (SUM) and keep
    `kept_per_seq` / `resp_per_seq` local: they are indexed by this rank's own rollout ids, so summing them would add
    other ranks' unrelated rollouts into each entry (train.py's rl_update does exactly this)."""
    if agg not in AGG_MODES:
        raise ValueError(f"policy_loss_normalizer: agg must be one of {AGG_MODES}, got {agg!r}")
    B, S = keep.shape
    resp = step_id >= 0  # (N,)
    seq = torch.where(resp, seq_id.long(), 0).clamp(0, B - 1)  # (N,) safe gather index
    step = torch.where(resp, step_id.long(), 0).clamp(0, S - 1)
    kept = resp & (keep[seq, step] > 0)  # (N,)
    kept_per_seq = torch.zeros(B, dtype=torch.float32, device=keep.device).index_add_(0, seq, kept.float())
    resp_per_seq = torch.zeros(B, dtype=torch.float32, device=keep.device).index_add_(0, seq, resp.float())
    if agg == "token-mean":
        pg, kl = kept_per_seq.sum(), resp_per_seq.sum()
    else:
        pg, kl = (kept_per_seq > 0).float().sum(), (resp_per_seq > 0).float().sum()
    return LossNormalizer(kept_per_seq, resp_per_seq, pg, kl)


# ----------------------------------------------------------------------------------------------------------------
# Reference


def policy_loss_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    seq_adv: torch.Tensor,
    seq_id: torch.Tensor,
    step_id: torch.Tensor,
    keep: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float | None = math.log(1e3),
    kl_coef: float = 0.0,
    agg: str = "seq-mean-token-mean",
    normalizer: LossNormalizer | None = None,
    upcast: bool = False,
):
    """Readable PyTorch reference; same signature and results as `policy_loss` (plus `upcast`: compute in fp64)."""
    if upcast:
        logp, old_logp, seq_adv, keep = logp.double(), old_logp.double(), seq_adv.double(), keep.double()
        ref_logp = ref_logp.double() if ref_logp is not None else None
    B, S = keep.shape
    resp = step_id >= 0  # (N,) response tokens
    seq, step = seq_id.long(), step_id.long()
    in_range = (seq >= 0) & (seq < B) & (step < S)
    seq_safe = torch.where(resp & in_range, seq, 0)
    step_safe = torch.where(resp & in_range, step, 0)
    keep_t = keep[seq_safe, step_safe]  # (N,)
    adv = seq_adv[seq_safe] * keep_t  # (N,) the masked advantage
    adv = torch.where(resp & ~in_range, torch.full_like(adv, float("nan")), adv)
    kept = resp & ((keep_t > 0) | ~in_range)  # out-of-range tokens stay in, so their NaN reaches the loss

    log_ratio = logp - old_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = surr_clipped > surr  # strict: at the boundary the token keeps its gradient
    pg = torch.where(clipped, surr_clipped, surr)
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual = (adv < 0) & (pg > dual_bound)
        pg = torch.where(dual, dual_bound, pg)

    if normalizer is None:
        normalizer = policy_loss_normalizer(seq_id, step_id, keep, agg=agg)
    pg = torch.where(kept, pg, torch.zeros_like(pg))
    if agg == "token-mean":
        loss = pg.sum() / normalizer.pg.clamp(min=1)
    else:
        per_seq = torch.zeros(B, dtype=pg.dtype, device=pg.device).index_add(0, seq_safe, pg)  # (B,)
        if agg == "seq-mean-token-mean":
            per_seq = per_seq / normalizer.kept_per_seq.to(pg.dtype).clamp(min=1)
        loss = per_seq.sum() / normalizer.pg.clamp(min=1)

    ref_kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp - logp
        ref_kl = torch.where(resp, torch.exp(delta) - delta - 1.0, torch.zeros_like(delta))
        if kl_coef != 0.0:
            if agg == "token-mean":
                kl_term = ref_kl.sum() / normalizer.kl.clamp(min=1)
            else:
                per_seq = torch.zeros(B, dtype=ref_kl.dtype, device=ref_kl.device).index_add(0, seq_safe, ref_kl)
                if agg == "seq-mean-token-mean":
                    per_seq = per_seq / normalizer.resp_per_seq.to(ref_kl.dtype).clamp(min=1)
                kl_term = per_seq.sum() / normalizer.kl.clamp(min=1)
            loss = loss + kl_coef * kl_term

    with torch.no_grad():
        n_kept, n_resp = kept.sum().clamp(min=1), resp.sum().clamp(min=1)
        ratio_r = torch.where(resp, ratio, torch.zeros_like(ratio))
        metrics = {
            "clip_frac_low": (kept & clipped & (adv < 0)).sum() / n_kept,
            "clip_frac_high": (kept & clipped & (adv > 0)).sum() / n_kept,
            "dual_clip_frac": (kept & dual).sum() / n_kept,
            "ratio_mean": ratio_r.sum() / n_resp,
            "ratio_max": torch.where(resp, ratio, torch.full_like(ratio, float("-inf"))).max()
            if ratio.numel()
            else ratio.new_tensor(float("-inf")),
            "approx_kl": torch.where(resp, (ratio - 1) - log_ratio, torch.zeros_like(ratio)).sum() / n_resp,
            "ref_kl": ref_kl.sum() / n_resp,
            "masked_frac": (resp & (keep_t == 0)).sum() / n_resp,
            "kept_adv_mean": torch.where(kept, adv, torch.zeros_like(adv)).sum() / n_kept,
        }
        metrics = {k: v.float() for k, v in metrics.items()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _token_terms(
    offs,
    mask,
    # pointers
    logp_ptr,  # (N,) fp32
    old_logp_ptr,  # (N,) fp32
    ref_logp_ptr,  # (N,) fp32, read only when HAS_REF
    seq_adv_ptr,  # (B,) fp32
    seq_id_ptr,  # (N,) int32 / int64
    step_id_ptr,  # (N,) int32 / int64
    keep_ptr,  # (B, S) fp32
    seq_w_pg_ptr,  # (B,) fp32: weight of one kept token of rollout b in the policy term
    seq_w_kl_ptr,  # (B,) fp32: weight of one response token of rollout b in the KL term
    # sizes
    B,
    S,
    # strides
    stride_kb,
    stride_ks,
    # scalars
    clip_low,
    clip_high,
    dual_clip,
    log_ratio_clamp,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    """Per-token quantities shared by forward and backward (all fp32, zero outside the response)."""
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0)
    old = tl.load(old_logp_ptr + offs, mask=mask, other=0.0)
    seq = tl.load(seq_id_ptr + offs, mask=mask, other=0).to(tl.int64)
    step = tl.load(step_id_ptr + offs, mask=mask, other=-1).to(tl.int64)
    resp = mask & (step >= 0)
    in_range = (seq >= 0) & (seq < B) & (step < S)
    idx_ok = resp & in_range
    keep = tl.load(keep_ptr + seq * stride_kb + step * stride_ks, mask=idx_ok, other=0.0)
    # the SAM advantage, formed here from the rollout's advantage and its segment's keep weight
    adv = tl.load(seq_adv_ptr + seq, mask=idx_ok, other=0.0) * keep
    adv = tl.where(resp & ~in_range, float("nan"), adv)
    kept = resp & ((keep > 0) | ~in_range)  # out-of-range tokens stay in, so their NaN reaches the loss

    diff = logp - old
    if HAS_CLAMP:
        log_ratio = tl.minimum(tl.maximum(diff, -log_ratio_clamp), log_ratio_clamp)
        d_log_ratio = ((diff >= -log_ratio_clamp) & (diff <= log_ratio_clamp)).to(tl.float32)
    else:
        log_ratio = diff
        d_log_ratio = tl.full(diff.shape, 1.0, tl.float32)
    ratio = tl.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = surr_clipped > surr  # strict: ratio strictly outside the clip range, so its gradient is 0
    pg = tl.where(clipped, surr_clipped, surr)
    d_pg = tl.where(clipped, 0.0, -adv * ratio * d_log_ratio)
    if HAS_DUAL:
        dual_bound = -adv * dual_clip
        dual = (adv < 0) & (pg > dual_bound)
        pg = tl.where(dual, dual_bound, pg)
        d_pg = tl.where(dual, 0.0, d_pg)
    else:
        dual = tl.zeros(clipped.shape, tl.int1)

    w_pg = tl.load(seq_w_pg_ptr + seq, mask=kept & in_range, other=0.0)
    pg = tl.where(kept, pg, 0.0)
    d_pg = tl.where(kept, d_pg, 0.0)
    if HAS_REF:
        ref = tl.load(ref_logp_ptr + offs, mask=mask, other=0.0)
        delta = ref - logp
        kl = tl.where(resp, tl.exp(delta) - delta - 1.0, 0.0)
        d_kl = tl.where(resp, 1.0 - tl.exp(delta), 0.0)
        w_kl = tl.load(seq_w_kl_ptr + seq, mask=resp & in_range, other=0.0)
    else:
        kl = tl.zeros_like(logp)
        d_kl = tl.zeros_like(logp)
        w_kl = tl.zeros_like(logp)
    return pg, d_pg, w_pg, kl, d_kl, w_kl, adv, ratio, log_ratio, resp, kept, keep, clipped, dual


@triton.jit(do_not_specialize=["N", "B"])  # sizes that vary per call: one binary for all (batch invariance)
def _policy_loss_fwd_kernel(
    # pointers
    logp_ptr,  # (N,) fp32
    old_logp_ptr,  # (N,) fp32
    ref_logp_ptr,  # (N,) fp32 or a dummy when not HAS_REF
    seq_adv_ptr,  # (B,) fp32
    seq_id_ptr,  # (N,) int
    step_id_ptr,  # (N,) int
    keep_ptr,  # (B, S) fp32
    seq_w_pg_ptr,  # (B,) fp32
    seq_w_kl_ptr,  # (B,) fp32
    partials_ptr,  # (num_blocks, NUM_PARTIALS) fp32, out: per-block sums
    ratio_max_ptr,  # (num_blocks,) fp32, out: per-block max ratio over response tokens
    # sizes
    N,
    B,
    S,
    # strides
    stride_kb,
    stride_ks,
    # scalars
    clip_low,
    clip_high,
    dual_clip,
    log_ratio_clamp,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    pg, d_pg, w_pg, kl, d_kl, w_kl, adv, ratio, log_ratio, resp, kept, keep, clipped, dual = _token_terms(
        offs,
        mask,
        logp_ptr,
        old_logp_ptr,
        ref_logp_ptr,
        seq_adv_ptr,
        seq_id_ptr,
        step_id_ptr,
        keep_ptr,
        seq_w_pg_ptr,
        seq_w_kl_ptr,
        B,
        S,
        stride_kb,
        stride_ks,
        clip_low,
        clip_high,
        dual_clip,
        log_ratio_clamp,
        HAS_REF,
        HAS_DUAL,
        HAS_CLAMP,
    )
    kept_f = kept.to(tl.float32)
    resp_f = resp.to(tl.float32)
    out = partials_ptr + pid * NUM_PARTIALS
    # the order matches _PG, _KL, ... on the host
    tl.store(out + 0, tl.sum(pg * w_pg, axis=0))
    tl.store(out + 1, tl.sum(kl * w_kl, axis=0))
    tl.store(out + 2, tl.sum(kept_f, axis=0))
    tl.store(out + 3, tl.sum(resp_f, axis=0))
    tl.store(out + 4, tl.sum((kept & clipped & (adv < 0)).to(tl.float32), axis=0))
    tl.store(out + 5, tl.sum((kept & clipped & (adv > 0)).to(tl.float32), axis=0))
    tl.store(out + 6, tl.sum((kept & dual).to(tl.float32), axis=0))
    tl.store(out + 7, tl.sum(tl.where(resp, ratio, 0.0), axis=0))
    tl.store(out + 8, tl.sum(tl.where(resp, (ratio - 1.0) - log_ratio, 0.0), axis=0))
    tl.store(out + 9, tl.sum(kl, axis=0))
    tl.store(out + 10, tl.sum((resp & (keep == 0)).to(tl.float32), axis=0))
    tl.store(out + 11, tl.sum(tl.where(kept, adv, 0.0), axis=0))
    tl.store(ratio_max_ptr + pid, tl.max(tl.where(resp, ratio, float("-inf")), axis=0))


@triton.jit(do_not_specialize=["N", "B"])  # sizes that vary per call: one binary for all (batch invariance)
def _policy_loss_bwd_kernel(
    # pointers
    logp_ptr,  # (N,) fp32
    old_logp_ptr,  # (N,) fp32
    ref_logp_ptr,  # (N,) fp32 or a dummy when not HAS_REF
    seq_adv_ptr,  # (B,) fp32
    seq_id_ptr,  # (N,) int
    step_id_ptr,  # (N,) int
    keep_ptr,  # (B, S) fp32
    seq_w_pg_ptr,  # (B,) fp32
    seq_w_kl_ptr,  # (B,) fp32
    grad_loss_ptr,  # () fp32: upstream gradient of the scalar loss
    grad_logp_ptr,  # (N,) fp32, out
    # sizes
    N,
    B,
    S,
    # strides
    stride_kb,
    stride_ks,
    # scalars
    clip_low,
    clip_high,
    dual_clip,
    log_ratio_clamp,
    kl_coef,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    pg, d_pg, w_pg, kl, d_kl, w_kl, adv, ratio, log_ratio, resp, kept, keep, clipped, dual = _token_terms(
        offs,
        mask,
        logp_ptr,
        old_logp_ptr,
        ref_logp_ptr,
        seq_adv_ptr,
        seq_id_ptr,
        step_id_ptr,
        keep_ptr,
        seq_w_pg_ptr,
        seq_w_kl_ptr,
        B,
        S,
        stride_kb,
        stride_ks,
        clip_low,
        clip_high,
        dual_clip,
        log_ratio_clamp,
        HAS_REF,
        HAS_DUAL,
        HAS_CLAMP,
    )
    g = tl.load(grad_loss_ptr)
    grad = g * (d_pg * w_pg + kl_coef * d_kl * w_kl)
    tl.store(grad_logp_ptr + offs, grad, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers

_BLOCK = 1024


def _sequence_weights(normalizer: LossNormalizer, agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) weight of one kept token of rollout b in the policy term, and of one response token in the KL term."""
    pg_norm, kl_norm = normalizer.pg.clamp(min=1), normalizer.kl.clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (
            1.0 / (normalizer.kept_per_seq.clamp(min=1) * pg_norm),
            1.0 / (normalizer.resp_per_seq.clamp(min=1) * kl_norm),
        )
    ones = torch.ones_like(normalizer.kept_per_seq)
    return ones / pg_norm, ones / kl_norm


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, seq_adv, seq_id, step_id, keep, seq_w_pg, seq_w_kl, opts):
        N = logp.shape[0]
        B, S = keep.shape
        num_blocks = max(1, triton.cdiv(N, _BLOCK))
        partials = torch.zeros(num_blocks, _NUM_PARTIALS, dtype=torch.float32, device=logp.device)
        ratio_max = torch.full((num_blocks,), float("-inf"), dtype=torch.float32, device=logp.device)
        has_ref = ref_logp is not None
        if N > 0:
            _policy_loss_fwd_kernel[(num_blocks,)](
                logp,
                old_logp,
                ref_logp if has_ref else logp,
                seq_adv,
                seq_id,
                step_id,
                keep,
                seq_w_pg,
                seq_w_kl,
                partials,
                ratio_max,
                N,
                B,
                S,
                keep.stride(0),
                keep.stride(1),
                opts["clip_low"],
                opts["clip_high"],
                opts["dual_clip"],
                opts["log_ratio_clamp"],
                HAS_REF=has_ref,
                HAS_DUAL=opts["has_dual"],
                HAS_CLAMP=opts["has_clamp"],
                NUM_PARTIALS=_NUM_PARTIALS,
                BLOCK=_BLOCK,
                enable_fp_fusion=FP_FUSION,
            )
        sums = partials.sum(dim=0)  # (NUM_PARTIALS,) fixed-order reduction: deterministic
        loss = sums[_PG] + opts["kl_coef"] * sums[_KL]
        ctx.save_for_backward(logp, old_logp, ref_logp, seq_adv, seq_id, step_id, keep, seq_w_pg, seq_w_kl)
        ctx.opts = opts
        stats = torch.cat([sums, ratio_max.max().reshape(1)])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logp, old_logp, ref_logp, seq_adv, seq_id, step_id, keep, seq_w_pg, seq_w_kl = ctx.saved_tensors
        opts = ctx.opts
        N = logp.shape[0]
        B, S = keep.shape
        grad_logp = torch.empty_like(logp)
        if N > 0:
            has_ref = ref_logp is not None
            _policy_loss_bwd_kernel[(triton.cdiv(N, _BLOCK),)](
                logp,
                old_logp,
                ref_logp if has_ref else logp,
                seq_adv,
                seq_id,
                step_id,
                keep,
                seq_w_pg,
                seq_w_kl,
                grad_loss.contiguous(),
                grad_logp,
                N,
                B,
                S,
                keep.stride(0),
                keep.stride(1),
                opts["clip_low"],
                opts["clip_high"],
                opts["dual_clip"],
                opts["log_ratio_clamp"],
                opts["kl_coef"],
                HAS_REF=has_ref,
                HAS_DUAL=opts["has_dual"],
                HAS_CLAMP=opts["has_clamp"],
                BLOCK=_BLOCK,
                enable_fp_fusion=FP_FUSION,
            )
        return grad_logp, None, None, None, None, None, None, None, None, None


def _stats_to_metrics(stats: torch.Tensor) -> dict:
    n_kept, n_resp = stats[_KEPT].clamp(min=1), stats[_RESP].clamp(min=1)
    return {
        "clip_frac_low": stats[_CLIP_LO] / n_kept,
        "clip_frac_high": stats[_CLIP_HI] / n_kept,
        "dual_clip_frac": stats[_DUAL] / n_kept,
        "ratio_mean": stats[_RATIO] / n_resp,
        "ratio_max": stats[_NUM_PARTIALS],
        "approx_kl": stats[_APPROX_KL] / n_resp,
        "ref_kl": stats[_REF_KL] / n_resp,
        "masked_frac": stats[_MASKED] / n_resp,
        "kept_adv_mean": stats[_ADV] / n_kept,
    }


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _check(logp, old_logp, seq_adv, seq_id, step_id, keep, ref_logp, opts, agg, normalizer) -> None:
    op = "policy_loss"
    tensors = {"logp": logp, "old_logp": old_logp, "seq_adv": seq_adv, "seq_id": seq_id, "step_id": step_id}
    tensors["keep"] = keep
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if logp.dim() != 1:
        raise ValueError(f"{op}: logp must be (N,), got {tuple(logp.shape)}")
    N = logp.shape[0]
    for name in ("old_logp", "seq_id", "step_id"):
        if tensors[name].shape != (N,):
            raise ValueError(f"{op}: {name} must be ({N},) like logp, got {tuple(tensors[name].shape)}")
    if ref_logp is not None and (not isinstance(ref_logp, torch.Tensor) or ref_logp.shape != (N,)):
        raise ValueError(f"{op}: ref_logp must be a ({N},) tensor like logp")
    if keep.dim() != 2 or keep.shape[1] == 0:
        raise ValueError(f"{op}: keep must be (B, S) with S >= 1, got {tuple(keep.shape)}")
    if seq_adv.shape != (keep.shape[0],):
        raise ValueError(f"{op}: seq_adv must be ({keep.shape[0]},) to match keep {tuple(keep.shape)}")
    for name in ("logp", "old_logp", "seq_adv", "keep"):
        if tensors[name].dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {tensors[name].dtype}")
    if ref_logp is not None and ref_logp.dtype != torch.float32:
        raise TypeError(f"{op}: ref_logp must be float32, got {ref_logp.dtype}")
    for name in ("seq_id", "step_id"):
        if tensors[name].dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {tensors[name].dtype}")
    devices = {t.device for t in tensors.values()} | ({ref_logp.device} if ref_logp is not None else set())
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devices))}")
    if agg not in AGG_MODES:
        raise ValueError(f"{op}: agg must be one of {AGG_MODES}, got {agg!r}")
    if not 0.0 <= opts["clip_low"] < 1.0:
        raise ValueError(f"{op}: clip_low must be in [0, 1), got {opts['clip_low']}")
    if not opts["clip_high"] >= 0.0:
        raise ValueError(f"{op}: clip_high must be >= 0, got {opts['clip_high']}")
    if opts["dual_clip"] is not None and not opts["dual_clip"] > 1.0:
        raise ValueError(f"{op}: dual_clip must be > 1 (or None to disable), got {opts['dual_clip']}")
    if opts["log_ratio_clamp"] is not None and not opts["log_ratio_clamp"] > 0.0:
        raise ValueError(f"{op}: log_ratio_clamp must be > 0 (or None), got {opts['log_ratio_clamp']}")
    if not opts["kl_coef"] >= 0.0:
        raise ValueError(f"{op}: kl_coef must be >= 0, got {opts['kl_coef']}")
    if opts["kl_coef"] > 0.0 and ref_logp is None:
        raise ValueError(f"{op}: kl_coef > 0 needs ref_logp")
    if normalizer is not None:
        if not isinstance(normalizer, LossNormalizer):
            raise TypeError(f"{op}: normalizer must be a LossNormalizer (see policy_loss_normalizer)")
        if normalizer.kept_per_seq.shape != (keep.shape[0],):
            raise ValueError(
                f"{op}: normalizer is for {normalizer.kept_per_seq.shape[0]} rollouts, keep has {keep.shape[0]}"
            )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    seq_adv: torch.Tensor,
    seq_id: torch.Tensor,
    step_id: torch.Tensor,
    keep: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float | None = math.log(1e3),
    kl_coef: float = 0.0,
    agg: str = "seq-mean-token-mean",
    normalizer: LossNormalizer | None = None,
    impl: str = "auto",
):
    """GRPO/PPO clipped-surrogate loss with SAM advantages built per token from (seq_adv, keep, seq_id, step_id).

    logp, old_logp, ref_logp: (N,) fp32 token log-probs (logp differentiable); seq_adv (B,) fp32 rollout
    advantages; seq_id, step_id (N,) int32/int64 (step_id -1 outside the response); keep (B, S) fp32 segment
    weights (1 keep, 0 masked, in between for soft masking). dual_clip / log_ratio_clamp None disable them.
    Returns (loss () fp32, metrics: dict of detached 0-dim tensors, see METRICS).
    """
    opts = dict(clip_low=float(clip_low), clip_high=float(clip_high), kl_coef=float(kl_coef))
    opts["dual_clip"] = None if dual_clip is None else float(dual_clip)
    opts["log_ratio_clamp"] = None if log_ratio_clamp is None else float(log_ratio_clamp)
    _check(logp, old_logp, seq_adv, seq_id, step_id, keep, ref_logp, opts, agg, normalizer)
    impl = resolve_impl(impl, logp, "policy_loss")
    if impl == "ref":
        return policy_loss_ref(
            logp,
            old_logp,
            seq_adv,
            seq_id,
            step_id,
            keep,
            ref_logp=ref_logp,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            log_ratio_clamp=log_ratio_clamp,
            kl_coef=kl_coef,
            agg=agg,
            normalizer=normalizer,
        )
    if normalizer is None:
        normalizer = policy_loss_normalizer(seq_id, step_id, keep, agg=agg)
    seq_w_pg, seq_w_kl = _sequence_weights(normalizer, agg)
    opts["has_dual"], opts["has_clamp"] = opts["dual_clip"] is not None, opts["log_ratio_clamp"] is not None
    opts["dual_clip"] = opts["dual_clip"] or 0.0
    opts["log_ratio_clamp"] = opts["log_ratio_clamp"] or 0.0
    loss, stats = _PolicyLoss.apply(
        logp.contiguous(),
        old_logp.contiguous(),
        None if ref_logp is None else ref_logp.contiguous(),
        seq_adv.contiguous(),
        seq_id.contiguous(),
        step_id.contiguous(),
        keep,
        seq_w_pg.contiguous(),
        seq_w_kl.contiguous(),
        opts,
    )
    return loss, _stats_to_metrics(stats.detach())
