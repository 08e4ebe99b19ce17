"""grm_kernels/distill_kl.py: the Triton kernels (interpreter on CPU, compiled on GPU) against the PyTorch reference."""

import warnings
from functools import partial

import pytest
import torch

import grm_kernels._lmhead as lmhead
from grm_kernels.distill_kl import distill_kl, distill_kl_ref
from tests.numerics import assert_2x, dirty_allocations, record_chunks, requires_cuda

# (N, Ds, Dt, Vs, Vt). Interpreter tiles: BLOCK_N=16, BLOCK_V=64, BLOCK_D=32 (grm_kernels/_lmhead.py:lmhead_config).
SMALL = (20, 40, 24, 200, 200)
ODD = (37, 72, 40, 331, 331)  # nothing a power of two; V not a multiple of the block
STUDENT_WIDER = (21, 40, 24, 203, 190)  # padded heads of different sizes: the loss uses the first 190 rows
TEACHER_WIDER = (21, 40, 24, 190, 203)
KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def make_inputs(N, Ds, Dt, Vs, Vt, dtype=torch.float32, *, seed=0, scale=2.0, mask_frac=0.0, device="cpu"):
    """Student and teacher whose logits have standard deviation ~`scale`, a mask and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, Ds, generator=g)
    ws = torch.randn(Vs, Ds, generator=g) * (scale / Ds**0.5)
    ht = torch.randn(N, Dt, generator=g)
    wt = torch.randn(Vt, Dt, generator=g) * (scale / Dt**0.5)
    mask = torch.rand(N, generator=g) >= mask_frac
    upstream = torch.randn(N, generator=g)
    cast = dict(dtype=dtype, device=device)
    return hs.to(**cast), ws.to(**cast), ht.to(**cast), wt.to(**cast), mask.to(device), upstream.to(device)


def run(fn, hs, ws, ht, wt, mask, upstream, **kw):
    """Forward and backward with a random per-token upstream gradient: (loss, d_student_hidden, d_student_weight)."""
    h = hs.detach().clone().requires_grad_()
    w = ws.detach().clone().requires_grad_()
    loss = fn(h, w, ht, wt, mask=mask, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


def triton_fn(*args, **kw):
    return distill_kl(*args, impl="triton", **kw)


def check_against_gold(hs, ws, ht, wt, mask, upstream, **kw):
    out = run(triton_fn, hs, ws, ht, wt, mask, upstream, **kw)
    ref = run(distill_kl_ref, hs, ws, ht, wt, mask, upstream, **kw)
    gold = run(distill_kl_ref, hs.double(), ws.double(), ht.double(), wt.double(), mask, upstream, **kw)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == hs.dtype and out[2].dtype == ws.dtype
    for name, o, r, g in zip(("loss", "d_hidden", "d_weight"), out, ref, gold):
        assert_2x(name, o, r, g, FLOORS[hs.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,beta", KINDS, ids=[f"{k}-{b}" for k, b in KINDS])
def test_matches_fp64_reference(kind, beta, dtype):
    check_against_gold(*make_inputs(*SMALL, dtype, mask_frac=0.2), kind=kind, beta=beta)


@pytest.mark.parametrize("kind,beta", KINDS, ids=[f"{k}-{b}" for k, b in KINDS])
def test_odd_shapes_and_temperature(kind, beta):
    check_against_gold(*make_inputs(*ODD, seed=1), kind=kind, beta=beta, temperature=0.7)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_peaked_logits_are_stable(kind):
    # logits with std 25: the online maxima must keep exp() in range and the expectations must not cancel badly
    check_against_gold(*make_inputs(*SMALL, seed=13, scale=25.0), kind=kind)


@pytest.mark.parametrize("shape", [STUDENT_WIDER, TEACHER_WIDER], ids=["student-wider", "teacher-wider"])
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_vocab_mismatch_uses_shared_rows(monkeypatch, shape, kind):
    dirty_allocations(monkeypatch)  # the student head's rows past V must be zeroed, not just allocated
    hs, ws, ht, wt, mask, upstream = make_inputs(*shape, seed=2)
    V = min(ws.shape[0], wt.shape[0])
    with pytest.warns(UserWarning, match=f"shared first {V}"):
        loss, d_hidden, d_weight = check_against_gold(hs, ws, ht, wt, mask, upstream, kind=kind)
    # the same as distilling heads cut to V rows; the student's extra rows get exactly zero gradient
    cut = run(triton_fn, hs, ws[:V], ht, wt[:V], mask, upstream, kind=kind)
    assert torch.equal(loss, cut[0]) and torch.equal(d_hidden, cut[1])
    assert torch.equal(d_weight[:V], cut[2]) and torch.all(d_weight[V:] == 0)


def test_explicit_vocab_size(monkeypatch):
    dirty_allocations(monkeypatch)
    hs, ws, ht, wt, mask, upstream = make_inputs(*STUDENT_WIDER, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit vocab_size is not announced
        out = check_against_gold(hs, ws, ht, wt, mask, upstream, kind="rkl", vocab_size=150)
    cut = run(triton_fn, hs, ws[:150], ht, wt[:150], mask, upstream, kind="rkl")
    assert torch.equal(out[0], cut[0]) and torch.all(out[2][150:] == 0)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_jsd_end_points_are_the_two_kls(impl):
    """jsd is continuous in beta: beta 0 / 1 are fkl / rkl exactly, and it converges to them linearly in beta."""
    inputs = make_inputs(*SMALL, seed=4, scale=0.5)  # p/q ratios stay moderate, so beta = 1e-3 is "near"
    fn = triton_fn if impl == "triton" else distill_kl_ref
    out = {}
    for kind, beta in (
        ("fkl", 0.5),
        ("rkl", 0.5),
        ("jsd", 0.0),
        ("jsd", 1.0),
        ("jsd", 1e-2),
        ("jsd", 1e-3),
        ("jsd", 1 - 1e-2),
        ("jsd", 1 - 1e-3),
    ):
        out[kind, beta] = run(fn, *inputs, kind=kind, beta=beta)
    for end, kl in ((0.0, "fkl"), (1.0, "rkl")):
        assert all(torch.equal(x, y) for x, y in zip(out["jsd", end], out[kl, 0.5]))
    for far, near, kl in ((1e-2, 1e-3, "fkl"), (1 - 1e-2, 1 - 1e-3, "rkl")):
        for i, name in enumerate(("loss", "d_hidden", "d_weight")):
            gap_far = (out["jsd", far][i] - out[kl, 0.5][i]).abs().max()
            gap_near = (out["jsd", near][i] - out[kl, 0.5][i]).abs().max()
            scale = out[kl, 0.5][i].abs().max()
            assert gap_near < 0.2 * gap_far and gap_near < 0.02 * scale, (kl, name, gap_far, gap_near, scale)


def test_identical_models_give_zero():
    hs, ws, _, _, mask, upstream = make_inputs(*SMALL, seed=5)
    for kind in ("fkl", "rkl", "jsd"):
        loss, d_hidden, d_weight = run(triton_fn, hs, ws, hs, ws, mask, upstream, kind=kind)
        assert loss.abs().max() < 1e-5 and d_hidden.abs().max() < 1e-6 and d_weight.abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_masked_rows_give_zero_and_no_gradient(kind):
    hs, ws, ht, wt, _, upstream = make_inputs(*SMALL, seed=6)
    mask = torch.ones(SMALL[0], dtype=torch.bool)
    mask[[0, 7, 16, 19]] = False
    loss, d_hidden, d_weight = run(triton_fn, hs, ws, ht, wt, mask, upstream, kind=kind)
    assert torch.all(loss[~mask] == 0) and torch.all(d_hidden[~mask] == 0)
    assert torch.all(loss[mask] > 0) and torch.all(d_hidden[mask].abs().sum(1) > 0)
    # the kept rows are unaffected by the masked ones, and d_weight is the gradient of the kept rows alone
    kept = run(triton_fn, hs[mask], ws, ht[mask], wt, None, upstream[mask], kind=kind)
    assert torch.equal(loss[mask], kept[0])
    assert torch.allclose(d_weight, kept[2], atol=1e-6)


def test_all_rows_masked_and_empty_batch(monkeypatch):
    dirty_allocations(monkeypatch)  # without rows no chunk runs: d_weight must be zeroed, not just allocated
    hs, ws, ht, wt, mask, upstream = make_inputs(*SMALL, seed=7)
    for impl in ("triton", "ref"):
        fn = partial(distill_kl, impl=impl)
        out = run(fn, hs, ws, ht, wt, torch.zeros_like(mask), upstream)
        assert all(torch.all(t == 0) for t in out)
    h = torch.zeros(0, 40, requires_grad=True)
    w = torch.randn(200, 40, requires_grad=True)
    loss = distill_kl(h, w, torch.zeros(0, 24), torch.randn(200, 24), impl="triton")
    loss.sum().backward()
    assert loss.shape == (0,) and torch.all(w.grad == 0)


def test_multi_chunk_backward(monkeypatch):
    inputs = make_inputs(*ODD, seed=8)
    one = run(triton_fn, *inputs, kind="rkl")
    monkeypatch.setattr(lmhead, "SCRATCH_BYTES", 0)  # the chunk buffer at its floor, CHUNK_BYTES
    monkeypatch.setattr(lmhead, "CHUNK_BYTES", 37 * 4 * 256)  # chunks of 256 rows; the last one 75 wide
    widths = record_chunks(monkeypatch)
    chunked = check_against_gold(*inputs, kind="rkl")
    assert widths == [256, 75]
    assert torch.equal(one[0], chunked[0]) and torch.equal(one[2], chunked[2])
    assert torch.allclose(one[1], chunked[1], atol=1e-6)


def test_teacher_gets_no_gradient_and_may_differ_in_dtype():
    hs, ws, ht, wt, mask, upstream = make_inputs(*SMALL, seed=9)
    ht, wt = ht.bfloat16().requires_grad_(), wt.bfloat16().requires_grad_()
    out = check_against_gold(hs, ws, ht, wt, mask, upstream, kind="jsd")
    assert ht.grad is None and wt.grad is None and out[1].dtype == torch.float32


def test_nonnegative_and_batch_invariant():
    hs, ws, ht, wt, _, _ = make_inputs(*SMALL, torch.bfloat16, seed=10)
    base = distill_kl(hs[:5], ws, ht[:5], wt, kind="jsd", impl="triton")
    for n, offset in ((23, 7), (40, 14)):  # (40, 14) straddles a 16-row tile boundary
        g = torch.Generator().manual_seed(n)
        big_s = torch.randn(n, hs.shape[1], generator=g).bfloat16()
        big_t = torch.randn(n, ht.shape[1], generator=g).bfloat16()
        big_s[offset : offset + 5], big_t[offset : offset + 5] = hs[:5], ht[:5]
        loss = distill_kl(big_s, ws, big_t, wt, kind="jsd", impl="triton")
        assert torch.equal(loss[offset : offset + 5], base)
        assert torch.all(loss > -1e-6)


def test_auto_uses_reference_on_cpu():
    hs, ws, ht, wt, mask, _ = make_inputs(*SMALL, seed=11)
    assert torch.equal(distill_kl(hs, ws, ht, wt, mask=mask), distill_kl_ref(hs, ws, ht, wt, mask=mask))


def test_reference_gradcheck():
    hs, ws, ht, wt, mask, _ = make_inputs(4, 5, 3, 7, 8, torch.float64, seed=12)
    for kind in ("fkl", "rkl", "jsd"):
        assert torch.autograd.gradcheck(
            partial(
                distill_kl_ref, teacher_hidden=ht, teacher_weight=wt, kind=kind, beta=0.3, temperature=0.8, mask=mask
            ),
            (hs.requires_grad_(), ws.requires_grad_()),
        )


def _bad(**changes):
    args = dict(hs=torch.zeros(4, 8), ws=torch.zeros(10, 8), ht=torch.zeros(4, 6), wt=torch.zeros(10, 6), kw={})
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args,err,match",
    [
        (_bad(ws=torch.zeros(10, 7)), ValueError, "student hidden size"),
        (_bad(wt=torch.zeros(10, 7)), ValueError, "teacher hidden size"),
        (_bad(ht=torch.zeros(5, 6)), ValueError, "aligned"),
        (_bad(hs=torch.zeros(8)), ValueError, "student_hidden must be a 2-D"),
        (_bad(ws=torch.zeros(10, 8).bfloat16()), TypeError, "share a dtype"),
        (_bad(ws=torch.zeros(0, 8)), ValueError, "empty vocabulary"),
        (_bad(kw={"kind": "kl"}), ValueError, "kind must be"),
        (_bad(kw={"beta": 1.5}), ValueError, "beta"),
        (_bad(kw={"temperature": 0}), ValueError, "temperature"),
        (_bad(kw={"vocab_size": 11}), ValueError, "vocab_size"),
        (_bad(kw={"mask": torch.ones(4)}), ValueError, "mask must be a bool"),
        (_bad(kw={"mask": torch.ones(3, dtype=torch.bool)}), ValueError, "mask must be a bool"),
        (_bad(kw={"impl": "cuda"}), ValueError, "impl must be"),
    ],
)
def test_bad_input_is_rejected(args, err, match):
    with pytest.raises(err, match=match):
        distill_kl(args["hs"], args["ws"], args["ht"], args["wt"], **args["kw"])


# ----------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic shapes (skipped without CUDA)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("shape", [(1024, 896, 1536, 151936, 152064), (333, 1024, 1024, 32000, 32000)])
def test_gpu_matches_reference(shape, kind, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vocabulary-mismatch notice
        check_against_gold(*make_inputs(*shape, dtype, mask_frac=0.1, device="cuda"), kind=kind)


@requires_cuda
def test_gpu_memory_stays_linear_in_n():
    N, D, V = 4096, 1024, 151936
    hs, ws, ht, wt, _, _ = make_inputs(N, D, D, V, V, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = distill_kl(hs, ws, ht, wt, kind="fkl")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N): 5 fp32 statistics per row and vocabulary range between the split kernels, plus the per-row outputs
    import importlib

    from grm_kernels._common import vocab_ranges

    cfg = importlib.import_module("grm_kernels.distill_kl").distill_config(hs, ht)
    ranges, _ = vocab_ranges(V, cfg["BLOCK_V"], cfg["RANGES"])
    assert extra < N * (20 * ranges + 64), f"forward used {extra} extra bytes; one logit matrix would be {N * V * 2}"
    assert torch.equal(distill_kl(hs[100:200].contiguous(), ws, ht[100:200].contiguous(), wt), loss[100:200])


def test_strided_mask_matches_contiguous():
    hs, ws, ht, wt, mask, upstream = make_inputs(*SMALL, seed=12)
    mask[[1, 4, 9]] = False
    strided = torch.stack([mask, ~mask], dim=1)[:, 0]
    assert strided.stride() == (2,)
    out = run(triton_fn, hs, ws, ht, wt, strided, upstream, kind="fkl")
    ref = run(triton_fn, hs, ws, ht, wt, mask.clone(), upstream, kind="fkl")
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_tl_dot_path_in_fp32(monkeypatch, kind):
    import grm_kernels._common

    monkeypatch.setattr(grm_kernels._common, "INTERPRET_DOT", False)
    check_against_gold(*make_inputs(*ODD, seed=15), kind=kind)


@pytest.mark.parametrize("kind,beta", KINDS, ids=[f"{k}-{b}" for k, b in KINDS])
def test_merge_of_unequal_and_empty_ranges(monkeypatch, kind, beta):
    # V = 331 is 6 tiles of 64: 3 ranges of 2 tiles hold 128, 128 and 75 columns; two more ranges past V (all
    # padding: accepted by the kernels, never made by vocab_ranges) must be skipped by the merges of the statistics,
    # of fkl / rkl's expectation and of jsd's second sweep
    import importlib

    from grm_kernels._common import vocab_ranges

    distill_mod = importlib.import_module("grm_kernels.distill_kl")
    assert vocab_ranges(331, 64, 5) == (3, 128)
    split = []
    # five ranges of 128 columns: two past V
    monkeypatch.setattr(distill_mod, "vocab_ranges", lambda V, block, most: split.append(V) or (5, 128))
    check_against_gold(*make_inputs(*ODD, seed=30, mask_frac=0.2), kind=kind, beta=beta)
    assert split == [331]  # the forward took the five ranges


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_merge_when_the_maxima_sit_in_different_ranges(kind):
    # the student's mass in the first range, the teacher's in the last: the merged expectation rescales each range
    # by both models' shifts, which must not cancel badly
    hs, ws, ht, wt, mask, upstream = make_inputs(*ODD, seed=31)
    ws[3] = hs[:6].mean(0) / hs[:6].mean(0).norm() ** 2 * 30.0
    wt[320] = ht[:6].mean(0) / ht[:6].mean(0).norm() ** 2 * 30.0
    check_against_gold(hs, ws, ht, wt, mask, upstream, kind=kind)
