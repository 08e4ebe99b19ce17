"""grm_kernels/policy_loss.py: the Triton kernel (interpreter on CPU) against its reference and hand-computed values."""

import math

import pytest
import torch

from grm_kernels.logprob import token_logprobs
from grm_kernels.policy_loss import (
    AGG_MODES,
    METRICS,
    policy_loss,
    policy_loss_normalizer,
    policy_loss_ref,
)
from tests.numerics import assert_2x, requires_cuda


def make_batch(B=6, S=3, N=200, *, seed=0, spread=0.3, device="cpu"):
    """A flat batch: rollouts of varied length, each with prompt tokens (step -1) then segments 0..S-1."""
    g = torch.Generator().manual_seed(seed)
    seq_id, step_id = [], []
    lengths = torch.randint(1, max(2, 2 * N // B), (B,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        prompt = int(torch.randint(0, 4, (1,), generator=g))
        steps = torch.randint(0, S, (n,), generator=g).sort().values  # segments in order, some of length 1
        seq_id += [b] * (prompt + n)
        step_id += [-1] * prompt + steps.tolist()
    seq_id, step_id = torch.tensor(seq_id), torch.tensor(step_id)
    n_tok = seq_id.shape[0]
    old = -torch.rand(n_tok, generator=g) * 3
    logp = old + torch.randn(n_tok, generator=g) * spread
    ref = old + torch.randn(n_tok, generator=g) * 0.2
    seq_adv = torch.randn(B, generator=g)
    keep = (torch.rand(B, S, generator=g) > 0.3).float()
    keep[:, -1] = 1.0  # the last segment is always kept under SAM
    to = dict(device=device)
    return dict(
        logp=logp.to(**to),
        old_logp=old.to(**to),
        seq_adv=seq_adv.to(**to),
        seq_id=seq_id.to(**to),
        step_id=step_id.to(**to),
        keep=keep.to(**to),
        ref_logp=ref.to(**to),
    )


def loss_and_grad(fn, batch, **kw):
    logp = batch["logp"].detach().clone().requires_grad_()
    args = {k: v for k, v in batch.items() if k != "logp"}
    if "ref_logp" in kw:
        args.pop("ref_logp")
    loss, metrics = fn(logp, **args, **kw)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def triton_fn(*a, **k):
    return policy_loss(*a, impl="triton", **k)


def fp64_batch(batch):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"kl_coef": 0.05}, id="kl"),
    pytest.param({"dual_clip": None, "log_ratio_clamp": None}, id="no-dual-no-clamp"),
    pytest.param({"clip_low": 0.1, "clip_high": 0.1, "dual_clip": 1.5}, id="tight"),
]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_matches_fp64_reference(agg, opts):
    batch = make_batch(spread=0.6)  # wide ratios so every clip branch is taken
    loss, grad, metrics = loss_and_grad(triton_fn, batch, agg=agg, **opts)
    ref_loss, ref_grad, ref_metrics = loss_and_grad(policy_loss_ref, batch, agg=agg, **opts)
    gold_loss, gold_grad, _ = loss_and_grad(policy_loss_ref, fp64_batch(batch), agg=agg, **opts)
    assert_2x("loss", loss, ref_loss, gold_loss, 1e-6)
    assert_2x("dL/dlogp", grad, ref_grad, gold_grad, 1e-7)
    assert set(metrics) == set(METRICS)
    for name in METRICS:
        assert torch.allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6), name
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0


def test_every_branch_taken():
    batch = make_batch(spread=0.6)
    _, _, m = loss_and_grad(triton_fn, batch, clip_low=0.1, clip_high=0.1, dual_clip=1.5)
    assert m["dual_clip_frac"] > 0 and m["masked_frac"] > 0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_micro_batches_with_shared_normalizer_equal_whole_batch(agg, impl):
    batch = make_batch(B=8, N=300, seed=1)
    kw = dict(agg=agg, kl_coef=0.1, impl=impl)
    whole_loss, whole_grad, _ = loss_and_grad(policy_loss, batch, **kw)
    norm = policy_loss_normalizer(batch["seq_id"], batch["step_id"], batch["keep"], agg=agg)
    n = batch["logp"].shape[0]
    # uneven cuts that split rollouts across micro-batches
    cuts = [0, n // 5, n // 2 + 3, n - 1, n]
    total, grads = 0.0, []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = {k: (v[lo:hi] if k not in ("seq_adv", "keep") else v) for k, v in batch.items()}
        loss, grad, _ = loss_and_grad(policy_loss, part, normalizer=norm, **kw)
        total = total + loss
        grads.append(grad)
    assert torch.allclose(total, whole_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.cat(grads), whole_grad, rtol=1e-5, atol=1e-9)


def test_all_kept_equals_plain_grpo():
    """keep = 1 everywhere: the loss is GRPO's with the rollout advantage on every response token."""
    batch = make_batch(seed=2)
    batch["keep"] = torch.ones_like(batch["keep"])
    loss, grad, _ = loss_and_grad(triton_fn, batch, agg="token-mean", dual_clip=None, log_ratio_clamp=None)
    resp = batch["step_id"] >= 0
    adv = batch["seq_adv"][batch["seq_id"]]
    logp = batch["logp"].double().requires_grad_()
    ratio = torch.exp(logp - batch["old_logp"].double())
    token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    expected = token[resp].mean()
    expected.backward()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert torch.allclose(grad.double(), logp.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_ratio_one_gives_policy_gradient(agg):
    """On-policy (logp == old_logp): loss = -sum w_t A_t and dL/dlogp_t = -w_t A_t for kept tokens."""
    batch = make_batch(seed=3)
    batch["logp"] = batch["old_logp"].clone()
    loss, grad, m = loss_and_grad(triton_fn, batch, agg=agg)
    B = batch["keep"].shape[0]
    resp = batch["step_id"] >= 0
    seq, step = batch["seq_id"], batch["step_id"].clamp(min=0)
    adv = batch["seq_adv"][seq] * batch["keep"][seq, step]
    kept = resp & (batch["keep"][seq, step] > 0)
    counts = torch.zeros(B).index_add_(0, seq, kept.float())
    n_seqs = (counts > 0).sum()
    if agg == "token-mean":
        w = kept.float() / kept.sum()
    elif agg == "seq-mean-token-mean":
        w = kept.float() / (counts[seq].clamp(min=1) * n_seqs)
    else:
        w = kept.float() / n_seqs
    assert torch.allclose(loss, -(w * adv).sum(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad, -w * adv, rtol=1e-5, atol=1e-9)
    assert m["ratio_mean"] == 1 and m["approx_kl"] == 0 and m["clip_frac_low"] == 0


def implementation_ratio(log_ratio: float, impl: str) -> float:
    """The fp32 ratio exp(log_ratio) exactly as `impl` computes it (read back through the ratio_max metric):
    exp may differ by an ulp between implementations, and the boundary test needs the exact value."""
    one = torch.ones(1)
    _, m = policy_loss(
        torch.tensor([log_ratio]),
        torch.zeros(1),
        one,
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        one[:, None],
        impl=impl,
    )
    return m["ratio_max"].item()


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_clip_boundaries(impl):
    """A ratio exactly at 1 + eps_high (or 1 - eps_low) is not clipped; a ratio just beyond it is."""
    up, down = 0.25, -0.25
    # 1 + (r - 1) == r exactly in fp32 for r in (0.5, 2), so these epsilons put the boundaries on the ratios
    clip_high, clip_low = implementation_ratio(up, impl) - 1.0, 1.0 - implementation_ratio(down, impl)
    beyond = 2.0**-12
    # tokens: at the upper boundary (A > 0), beyond it, at the lower boundary (A < 0), beyond it
    logp = torch.tensor([up, up + beyond, down, down - beyond]).requires_grad_()
    seq_adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    seq_id, step_id = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    loss, m = policy_loss(
        logp,
        torch.zeros(4),
        seq_adv,
        seq_id,
        step_id,
        torch.ones(4, 1),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None,
        agg="token-mean",
        impl=impl,
    )
    loss.backward()
    g = logp.grad
    assert g[0] == pytest.approx(-(1 + clip_high) / 4, rel=1e-6)  # boundary: gradient flows
    assert g[2] == pytest.approx((1 - clip_low) / 4, rel=1e-6)
    assert g[1] == 0 and g[3] == 0  # beyond: clipped
    assert m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_dual_clip_and_log_ratio_clamp(impl):
    # A < 0 with a huge ratio: the dual clip caps the loss at -3 A and stops the gradient
    logp = torch.tensor([2.0, 9.0, 0.1]).requires_grad_()
    old = torch.zeros(3)
    seq_adv = torch.tensor([-1.0, 1.0, 1.0])
    loss, m = policy_loss(
        logp,
        old,
        seq_adv,
        torch.arange(3),
        torch.zeros(3, dtype=torch.int64),
        torch.ones(3, 1),
        clip_high=10.0,
        log_ratio_clamp=math.log(1e3),
        agg="token-mean",
        impl=impl,
    )
    loss.backward()
    # token 0: dual clip -> 3; token 1: ratio clamped to 1e3 (inside clip_high? no: 1 + 10 = 11) -> clipped at 11
    # token 2: unclipped -> -exp(0.1)
    expected = (3.0 - 11.0 - math.exp(0.1)) / 3
    assert torch.allclose(loss, torch.tensor(expected), rtol=1e-6)
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert torch.allclose(logp.grad[2], torch.tensor(-math.exp(0.1) / 3), rtol=1e-6)
    assert m["dual_clip_frac"] == pytest.approx(1 / 3) and m["ratio_max"] == pytest.approx(1e3, rel=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_fully_masked_rollout_does_not_count(agg, impl):
    batch = make_batch(B=5, seed=4)
    batch["keep"][2] = 0.0  # rollout 2 entirely masked
    loss, grad, _ = loss_and_grad(policy_loss, batch, agg=agg, impl=impl)
    # the same batch without rollout 2's tokens, and rollout 2's advantage zeroed (it no longer appears)
    others = batch["seq_id"] != 2
    sub = {k: (v[others] if k not in ("seq_adv", "keep") else v) for k, v in batch.items()}
    sub_loss, sub_grad, _ = loss_and_grad(policy_loss, sub, agg=agg, impl=impl)
    assert torch.allclose(loss, sub_loss, rtol=1e-6, atol=1e-8)
    assert torch.all(grad[~others] == 0)
    assert torch.allclose(grad[others], sub_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_prompt_tokens_and_masked_segments_get_no_gradient(impl):
    batch = make_batch(seed=5, spread=0.5)
    _, grad, _ = loss_and_grad(policy_loss, batch, kl_coef=0.0, impl=impl)
    seq, step = batch["seq_id"], batch["step_id"]
    masked = (step < 0) | (batch["keep"][seq, step.clamp(min=0)] == 0)
    assert torch.all(grad[masked] == 0)
    # with a KL term, masked segments (but not prompt tokens) get its gradient
    _, grad_kl, _ = loss_and_grad(policy_loss, batch, kl_coef=0.5, impl=impl)
    assert torch.all(grad_kl[step < 0] == 0)
    assert torch.all(grad_kl[(step >= 0) & masked] != 0)


def test_soft_keep_scales_the_advantage():
    batch = make_batch(seed=6)
    batch["logp"] = batch["old_logp"].clone()
    batch["keep"] = torch.full_like(batch["keep"], 0.5)
    half, _, _ = loss_and_grad(triton_fn, batch)
    batch["keep"] = torch.ones_like(batch["keep"])
    full, _, _ = loss_and_grad(triton_fn, batch)
    assert torch.allclose(half, 0.5 * full, rtol=1e-6)


def test_single_token():
    batch = dict(
        logp=torch.tensor([-0.5]),
        old_logp=torch.tensor([-0.7]),
        seq_adv=torch.tensor([2.0]),
        seq_id=torch.tensor([0]),
        step_id=torch.tensor([0]),
        keep=torch.ones(1, 3),
    )
    loss, grad, _ = loss_and_grad(triton_fn, batch)
    ratio = math.exp(0.2)  # inside [0.8, 1.28]
    assert loss.item() == pytest.approx(-2.0 * ratio, rel=1e-6)
    assert grad.item() == pytest.approx(-2.0 * ratio, rel=1e-6)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_empty_and_no_response(impl):
    batch = make_batch(seed=7)
    batch["step_id"] = torch.full_like(batch["step_id"], -1)
    loss, grad, m = loss_and_grad(policy_loss, batch, kl_coef=0.1, impl=impl)
    assert loss == 0 and torch.all(grad == 0) and m["masked_frac"] == 0


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_out_of_range_step_gives_nan(impl):
    batch = make_batch(seed=8)
    idx = int((batch["step_id"] >= 0).nonzero()[0])
    batch["step_id"][idx] = batch["keep"].shape[1]  # S: out of range
    loss, _, _ = loss_and_grad(policy_loss, batch, impl=impl)
    assert torch.isnan(loss)


def test_int32_ids():
    batch = make_batch(seed=9)
    loss64, grad64, _ = loss_and_grad(triton_fn, batch)
    batch["seq_id"], batch["step_id"] = batch["seq_id"].int(), batch["step_id"].int()
    loss32, grad32, _ = loss_and_grad(triton_fn, batch)
    assert torch.equal(loss64, loss32) and torch.equal(grad64, grad32)


def test_end_to_end_through_token_logprobs():
    """policy_loss(token_logprobs(h, W, y)) vs the reference pipeline that materialises logits, both vs fp64."""
    g = torch.Generator().manual_seed(10)
    batch = make_batch(B=4, N=60, seed=10)
    n, D, V = batch["logp"].shape[0], 40, 150
    hidden = torch.randn(n, D, generator=g)
    weight = torch.randn(V, D, generator=g) * (2 / D**0.5)
    targets = torch.randint(0, V, (n,), generator=g)
    args = {k: v for k, v in batch.items() if k not in ("logp", "old_logp")}
    with torch.no_grad():
        current = token_logprobs(hidden, weight, targets, impl="ref")
    old = current + 0.1 * torch.randn(n, generator=g)
    args["ref_logp"] = current + 0.1 * torch.randn(n, generator=g)

    def pipeline(h, w, logprob_impl, loss_fn, old_logp):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp = token_logprobs(h, w, targets, impl=logprob_impl)
        loss, _ = loss_fn(logp, old_logp, **args, kl_coef=0.05)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ours = pipeline(hidden, weight, "triton", triton_fn, old)
    ref = pipeline(hidden, weight, "ref", policy_loss_ref, old)
    args = fp64_batch(args)
    gold = pipeline(hidden.double(), weight.double(), "ref", policy_loss_ref, old.double())
    for name, o, r, gd in zip(("loss", "d_hidden", "d_weight"), ours, ref, gold):
        assert_2x(name, o, r, gd, 1e-7)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (lambda b: dict(logp=b["logp"][:3]), ValueError, "old_logp must be"),
        (lambda b: dict(seq_adv=b["seq_adv"][:2]), ValueError, "seq_adv must be"),
        (lambda b: dict(keep=b["keep"].double()), TypeError, "keep must be float32"),
        (lambda b: dict(logp=b["logp"].half()), TypeError, "logp must be float32"),
        (lambda b: dict(step_id=b["step_id"].float()), TypeError, "step_id must be int32 or int64"),
        (lambda b: dict(keep=b["keep"][0]), ValueError, "keep must be"),
        (lambda b: dict(agg="mean"), ValueError, "agg must be"),
        (lambda b: dict(clip_low=1.5), ValueError, "clip_low"),
        (lambda b: dict(dual_clip=0.5), ValueError, "dual_clip"),
        (lambda b: dict(kl_coef=0.1, ref_logp=None), ValueError, "needs ref_logp"),
        (lambda b: dict(impl="fast"), ValueError, "impl must be"),
    ],
)
def test_bad_input_is_rejected(change, err, match):
    batch = make_batch(seed=11)
    batch.update(change(batch))
    with pytest.raises(err, match=match):
        policy_loss(**batch)


@requires_cuda
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gpu_matches_reference(agg):
    batch = make_batch(B=320, S=3, N=400_000, seed=12, spread=0.4, device="cuda")
    loss, grad, _ = loss_and_grad(triton_fn, batch, agg=agg, kl_coef=0.01)
    ref_loss, ref_grad, _ = loss_and_grad(policy_loss_ref, batch, agg=agg, kl_coef=0.01)
    gold_loss, gold_grad, _ = loss_and_grad(policy_loss_ref, fp64_batch(batch), agg=agg, kl_coef=0.01)
    assert_2x("loss", loss, ref_loss, gold_loss, 1e-6)
    assert_2x("dL/dlogp", grad, ref_grad, gold_grad, 1e-9)
