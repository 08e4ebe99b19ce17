"""grm_kernels/logprob.py: the Triton kernel (interpreter on CPU, compiled on GPU) against its PyTorch reference."""

import pytest
import torch

import grm_kernels._lmhead as lmhead
import grm_kernels.logprob as logprob_mod
from grm_kernels._common import vocab_ranges
from grm_kernels.logprob import token_logprobs, token_logprobs_ref
from tests.numerics import assert_2x, dirty_allocations, record_chunks, requires_cuda

IGNORE = -100

# (N, D, V). The interpreter's tiles are BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, with up to 3 vocabulary ranges and groups
# of 2 row blocks (grm_kernels/_lmhead.py:lmhead_config): V = 1271 splits into ranges of 448, 448 and 375 columns.
SHAPES = [
    pytest.param(48, 128, 640, id="small"),
    pytest.param(37, 72, 1271, id="odd"),  # nothing a power of two; V not a multiple of any block size
    pytest.param(1, 40, 300, id="n1"),
    pytest.param(20, 48, 65, id="v-block-plus-one"),
]
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def make_inputs(N, D, V, dtype, *, seed=0, scale=2.0, ignore_frac=0.2, device="cpu"):
    """Hidden states and head weight whose logits have standard deviation ~`scale`; some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * (scale / D**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    grad_logp = torch.randn(N, generator=g)
    grad_entropy = torch.randn(N, generator=g)
    to = dict(device=device)
    return (
        hidden.to(dtype=dtype, **to),
        weight.to(dtype=dtype, **to),
        targets.to(**to),
        grad_logp.to(**to),
        grad_entropy.to(**to),
    )


def run(fn, hidden, weight, targets, grad_logp, grad_entropy, **kw):
    """Forward with entropy, backward with random upstream gradients for both outputs; returns 4 tensors."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, entropy = fn(h, w, targets, return_entropy=True, **kw)
    (logp * grad_logp.to(logp.dtype) + entropy * grad_entropy.to(entropy.dtype)).sum().backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def check_against_gold(hidden, weight, targets, grad_logp, grad_entropy, temperature=1.0):
    kw = dict(temperature=temperature, ignore_index=IGNORE)
    out = run(
        lambda *a, **k: token_logprobs(*a, impl="triton", **k), hidden, weight, targets, grad_logp, grad_entropy, **kw
    )
    ref = run(token_logprobs_ref, hidden, weight, targets, grad_logp, grad_entropy, **kw)
    gold = run(token_logprobs_ref, hidden.double(), weight.double(), targets, grad_logp, grad_entropy, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == hidden.dtype and out[3].dtype == weight.dtype
    floor = FLOORS[hidden.dtype]
    for name, o, r, g in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref, gold):
        assert_2x(name, o, r, g, floor)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,D,V", SHAPES)
def test_matches_fp64_reference(N, D, V, dtype):
    check_against_gold(*make_inputs(N, D, V, dtype))


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature):
    check_against_gold(*make_inputs(37, 72, 1271, torch.float32, seed=1), temperature=temperature)


def test_peaked_logits_are_stable():
    # logits with std 30: the online max must keep exp() from overflowing, and entropy must not cancel badly
    check_against_gold(*make_inputs(37, 72, 1271, torch.float32, seed=2, scale=30.0))


def test_fp16():
    check_against_gold(*make_inputs(37, 72, 1271, torch.float16, seed=3))


def test_strided_inputs():
    hidden, weight, targets, g1, g2 = make_inputs(37, 72, 300, torch.float32, seed=4)
    wide = torch.zeros(37, 144)
    wide[:, ::2] = hidden
    hidden_view = wide[:, ::2]  # stride (144, 2)
    weight_view = weight.T.contiguous().T  # column-major (V, D)
    assert not hidden_view.is_contiguous() and not weight_view.is_contiguous()
    check_against_gold(hidden_view, weight_view, targets, g1, g2)


def test_multi_chunk_backward(monkeypatch):
    """The backward's vocabulary chunking (several chunks, a ragged last one) gives the same gradients."""
    inputs = make_inputs(37, 72, 1271, torch.float32, seed=5)
    one_chunk = check_against_gold(*inputs)
    # 37 rows x 4 bytes x 256 columns: chunks of 256 vocabulary rows, the last one 247 wide
    monkeypatch.setattr(lmhead, "SCRATCH_BYTES", 0)  # the chunk buffer at its floor, CHUNK_BYTES
    monkeypatch.setattr(lmhead, "CHUNK_BYTES", 37 * 4 * 256)
    widths = record_chunks(monkeypatch)
    chunked = check_against_gold(*inputs)
    assert widths == [256, 256, 256, 256, 247]
    # d_weight of a chunk is one complete reduction over all rows either way: bitwise equal
    assert torch.equal(one_chunk[3], chunked[3])


def test_ignored_rows_get_zero_and_no_gradient():
    hidden, weight, targets, g1, g2 = make_inputs(37, 72, 300, torch.float32, seed=6, ignore_frac=0.0)
    targets[[0, 5, 16, 36]] = IGNORE
    logp, entropy, d_hidden, _ = run(
        lambda *a, **k: token_logprobs(*a, impl="triton", **k), hidden, weight, targets, g1, g2
    )
    ignored = targets == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(d_hidden[ignored] == 0)
    assert torch.all(logp[~ignored] < 0) and torch.all(d_hidden[~ignored].abs().sum(1) > 0)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_all_rows_ignored(impl):
    hidden, weight, targets, g1, g2 = make_inputs(20, 48, 130, torch.float32, seed=7)
    targets.fill_(IGNORE)
    logp, entropy, d_hidden, d_weight = run(
        lambda *a, **k: token_logprobs(*a, impl=impl, **k), hidden, weight, targets, g1, g2
    )
    for t in (logp, entropy, d_hidden, d_weight):
        assert torch.all(t == 0)


def test_custom_ignore_index():
    hidden, weight, targets, _, _ = make_inputs(20, 48, 130, torch.float32, seed=8, ignore_frac=0.0)
    targets[3] = -1
    for impl in ("triton", "ref"):
        logp = token_logprobs(hidden, weight, targets, ignore_index=-1, impl=impl)
        assert logp[3] == 0 and torch.all(logp[torch.arange(20) != 3] < 0)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_out_of_range_target_gives_nan(impl):
    hidden, weight, targets, _, _ = make_inputs(20, 48, 130, torch.float32, seed=9, ignore_frac=0.0)
    targets[2], targets[7] = 130, -5
    logp = token_logprobs(hidden, weight, targets, impl=impl)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[2, 7]] = True
    assert torch.isnan(logp[bad]).all() and torch.isfinite(logp[~bad]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariance(dtype):
    """The same rows give bitwise-equal logp and entropy whatever the batch size and their position in it."""
    D, V = 72, 300
    g = torch.Generator().manual_seed(10)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    rows = torch.randn(5, D, generator=g).to(dtype)
    row_targets = torch.randint(0, V, (5,), generator=g)
    base_logp, base_ent = token_logprobs(rows, weight, row_targets, return_entropy=True, impl="triton")
    for n, offset in ((23, 7), (40, 14), (40, 35)):  # (40, 14) straddles a 16-row tile boundary
        hidden = torch.randn(n, D, generator=g).to(dtype)
        targets = torch.randint(0, V, (n,), generator=g)
        hidden[offset : offset + 5] = rows
        targets[offset : offset + 5] = row_targets
        logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
        assert torch.equal(logp[offset : offset + 5], base_logp), f"logp differs at N={n}, offset={offset}"
        assert torch.equal(ent[offset : offset + 5], base_ent), f"entropy differs at N={n}, offset={offset}"


def test_on_policy_ratio_is_exactly_one():
    hidden, weight, targets, _, _ = make_inputs(37, 72, 300, torch.bfloat16, seed=11)
    with torch.no_grad():
        old = token_logprobs(hidden, weight, targets, impl="triton")
    new = token_logprobs(hidden.clone().requires_grad_(), weight, targets, impl="triton")
    assert torch.equal(torch.exp(new.detach() - old), torch.ones_like(old))


def test_empty_batch(monkeypatch):
    dirty_allocations(monkeypatch)  # d_weight must be zeroed, not just allocated
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    logp = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.int64), impl="triton")
    logp.sum().backward()
    assert logp.shape == (0,) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("trainable", ["weight", "hidden"])
def test_only_requested_gradients(trainable):
    """A frozen input gets no gradient; the other one is still right (the backward skips the unneeded GEMM)."""
    hidden, weight, targets, g1, _ = make_inputs(20, 48, 130, torch.float32, seed=12)

    def grad_of(fn, h, w):
        h, w = h.clone().requires_grad_(trainable == "hidden"), w.clone().requires_grad_(trainable == "weight")
        (fn(h, w, targets) * g1.to(h.dtype)).sum().backward()
        assert (h.grad is None) == (trainable == "weight") and (w.grad is None) == (trainable == "hidden")
        return h.grad if trainable == "hidden" else w.grad

    out = grad_of(lambda h, w, t: token_logprobs(h, w, t, impl="triton"), hidden, weight)
    ref = grad_of(token_logprobs_ref, hidden, weight)
    gold = grad_of(token_logprobs_ref, hidden.double(), weight.double())
    assert_2x(f"d_{trainable}", out, ref, gold, 1e-5)


def test_auto_uses_reference_on_cpu():
    hidden, weight, targets, _, _ = make_inputs(20, 48, 130, torch.float32, seed=13)
    assert torch.equal(token_logprobs(hidden, weight, targets), token_logprobs_ref(hidden, weight, targets))


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, IGNORE, 3, 3])

    def fn(h, w):
        return token_logprobs_ref(h, w, targets, temperature=0.8, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize(
    "hidden,weight,targets,kw,err,match",
    [
        (torch.zeros(4, 8), torch.zeros(10, 6), torch.zeros(4, dtype=torch.int64), {}, ValueError, "hidden size"),
        (torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(3, dtype=torch.int64), {}, ValueError, "targets must be"),
        (torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.int32), {}, TypeError, "int64"),
        (torch.zeros(4, 8), torch.zeros(10, 8).bfloat16(), torch.zeros(4, dtype=torch.int64), {}, TypeError, "dtype"),
        (
            torch.zeros(4, 8),
            torch.zeros(10, 8),
            torch.zeros(4, dtype=torch.int64),
            {"temperature": 0.0},
            ValueError,
            "temperature",
        ),
        (
            torch.zeros(4, 8),
            torch.zeros(10, 8),
            torch.zeros(4, dtype=torch.int64),
            {"impl": "cuda"},
            ValueError,
            "impl must be",
        ),
        (torch.zeros(8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.int64), {}, ValueError, r"\(N, D\)"),
        (torch.zeros(4, 8), torch.zeros(0, 8), torch.zeros(4, dtype=torch.int64), {}, ValueError, "empty vocabulary"),
    ],
)
def test_bad_input_is_rejected(hidden, weight, targets, kw, err, match):
    with pytest.raises(err, match=match):
        token_logprobs(hidden, weight, targets, **kw)


# ----------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic shapes (skipped without CUDA)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,D,V", [(2048, 1024, 32000), (333, 896, 151936), (1, 4096, 151937)])
def test_gpu_matches_reference(N, D, V, dtype):
    check_against_gold(*make_inputs(N, D, V, dtype, device="cuda"))


@requires_cuda
def test_gpu_batch_invariance_and_memory():
    N, D, V = 4096, 1024, 151936
    hidden, weight, targets, _, _ = make_inputs(N, D, V, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp = token_logprobs(hidden, weight, targets, return_entropy=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N) statistics: 4 fp32 per row and vocabulary range between the split kernels, plus the per-row outputs
    cfg = lmhead.lmhead_config(hidden.device, hidden.dtype)
    ranges, _ = vocab_ranges(V, cfg["BLOCK_V"], cfg["RANGES"])
    assert extra < N * (16 * ranges + 64), f"forward used {extra} extra bytes; logits would be {N * V * 2}"
    part = token_logprobs(hidden[1000:1100].contiguous(), weight, targets[1000:1100])
    assert torch.equal(part, logp[1000:1100])


def test_strided_targets_match_contiguous():
    # a stride-2 view of the targets (e.g. one column of a (N, 2) tensor) must be read as the logical vector
    hidden, weight, targets, grad_logp, grad_entropy = make_inputs(37, 72, 1271, torch.float32, seed=11)
    strided = torch.stack([targets, torch.full_like(targets, 5)], dim=1)[:, 0]
    assert strided.stride() == (2,)
    out = run(lambda *a, **k: token_logprobs(*a, impl="triton", **k), hidden, weight, strided, grad_logp, grad_entropy)
    ref = run(token_logprobs_ref, hidden, weight, targets.clone(), grad_logp, grad_entropy)
    for name, o, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref):
        assert torch.allclose(o, r, atol=1e-5, rtol=1e-5), (name, (o - r).abs().max())


def test_fp16_gradients_do_not_underflow_at_a_realistic_vocabulary():
    # an upstream gradient of a token mean over many tokens (~1e-4) times softmax probabilities ~1/V is below
    # fp16's smallest subnormal (6e-8): a dz buffer in fp16 would zero most of the softmax part of the gradient
    N, D, V = 8, 64, 8192
    hidden, weight, targets, grad_logp, _ = make_inputs(N, D, V, torch.float16, seed=13, ignore_frac=0.0)
    grad_logp = grad_logp * 1e-4
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    token_logprobs(h, w, targets, impl="triton").mul(grad_logp).sum().backward()
    hg, wg = hidden.double().requires_grad_(), weight.double().requires_grad_()
    token_logprobs_ref(hg, wg, targets).mul(grad_logp.double()).sum().backward()
    # d_hidden accumulates in fp32 and is rounded once: with dz kept wide it is as good as fp16 storage allows (the
    # fp16 reference, whose logits gradient is fp16, is 2.7% off here); d_weight is itself stored in fp16, where
    # entries below 6e-8 vanish whatever the kernel does, so it is held to its storage's limit
    for name, got, gold, tol in (("d_hidden", h.grad, hg.grad, 2e-3), ("d_weight", w.grad, wg.grad, 1e-2)):
        rel = (got.double() - gold).norm() / gold.norm()
        assert rel < tol, (name, float(rel))


@pytest.mark.parametrize("shape", [(48, 128, 640), (37, 72, 1271)], ids=["small", "odd"])
def test_tl_dot_path_in_fp32(monkeypatch, shape):
    # the kernels' tl.dot branch (what the GPU runs), not the interpreter's broadcast multiply: the interpreter's
    # tl.dot is exact enough for fp32 inputs (it is wrong for bf16, grm_kernels/_common.py dot_acc)
    import grm_kernels._common

    monkeypatch.setattr(grm_kernels._common, "INTERPRET_DOT", False)
    check_against_gold(*make_inputs(*shape, torch.float32, seed=14))


# ----------------------------------------------------------------------------------------------------------------
# The split forward: vocabulary ranges and their merge


@pytest.mark.parametrize(
    "V,block,max_ranges",
    [(1, 64, 3), (65, 64, 3), (300, 64, 4), (1271, 64, 3), (151936, 128, 32), (151937, 128, 32), (32000, 64, 32)],
)
def test_vocab_ranges_cover_the_vocabulary_once(V, block, max_ranges):
    n, per = vocab_ranges(V, block, max_ranges)
    assert 1 <= n <= max_ranges and per % block == 0
    widths = [max(0, min((r + 1) * per, V) - r * per) for r in range(n)]  # real columns of each range
    # the ranges tile [0, V) in order: every one full except a shorter last one, none empty
    assert sum(widths) == V and all(w == per for w in widths[:-1]) and 0 < widths[-1] <= per


def with_ranges(monkeypatch, module, ranges):
    """Make `module`'s launch configuration (interpreter tiles) use up to `ranges` vocabulary ranges; returns the
    list of configurations handed out, so a test can check that the launchers asked for them."""
    config, given = lmhead.lmhead_config, []

    def patched(device, dtype):
        given.append({**config(device, dtype), "RANGES": ranges})
        return given[-1]

    monkeypatch.setattr(module, "lmhead_config", patched)  # the name the module's launchers look up
    return given


def test_merge_of_unequal_and_empty_ranges(monkeypatch):
    # V = 300 is 5 tiles of 64: 3 ranges of 2 tiles hold 128, 128 and 44 columns; a fourth range past V (all
    # padding: the kernels accept one, though vocab_ranges never makes it) must add nothing in the merge
    assert vocab_ranges(300, 64, 4) == (3, 128)
    split = []
    monkeypatch.setattr(logprob_mod, "vocab_ranges", lambda V, block, most: split.append(V) or (4, 128))
    hidden, weight, targets, g1, g2 = make_inputs(37, 72, 300, torch.float32, seed=20)
    targets[:4] = torch.tensor([0, 127, 128, 299])  # targets at the edges of the ranges
    check_against_gold(hidden, weight, targets, g1, g2)
    check_against_gold(*make_inputs(37, 72, 300, torch.bfloat16, seed=21))
    assert split == [300, 300]  # both forwards took the four ranges


@pytest.mark.parametrize("column", [5, 700, 1270], ids=["first-range", "middle-range", "last-range"])
def test_merge_when_one_range_dominates(column):
    # a row whose mass sits in one range: the other ranges' sums are ~e^-40 of it after the merge's rescaling, and
    # the entropy's shift terms (m_r - m) s_r must not swamp it
    hidden, weight, targets, g1, g2 = make_inputs(37, 72, 1271, torch.float32, seed=22)
    u = hidden[:8].mean(0)
    weight[column] = u / u.norm() ** 2 * 40.0  # a logit of about 40 in that column for the first 8 rows
    targets[:2] = column
    check_against_gold(hidden, weight, targets, g1, g2)


def test_split_batch_invariance_across_ranges_and_groups(monkeypatch):
    """With several ranges and row groups (short last group), a row's logp and entropy are bitwise the same
    whatever N and its position, and the one-range kernel agrees with the split one to fp32 rounding."""
    D, V = 40, 1271
    g = torch.Generator().manual_seed(23)
    weight = (torch.randn(V, D, generator=g) / D**0.5).bfloat16()
    rows = torch.randn(3, D, generator=g).bfloat16()
    row_targets = torch.randint(0, V, (3,), generator=g)
    base = token_logprobs(rows, weight, row_targets, return_entropy=True, impl="triton")
    for n, offset in ((1 + 3, 1), (70, 31), (81, 78)):  # 5 and 6 row blocks of 16: groups of 2, a short last one
        hidden = torch.randn(n, D, generator=g).bfloat16()
        targets = torch.randint(0, V, (n,), generator=g)
        hidden[offset : offset + 3], targets[offset : offset + 3] = rows, row_targets
        logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
        assert torch.equal(logp[offset : offset + 3], base[0]) and torch.equal(ent[offset : offset + 3], base[1])
    given = with_ranges(monkeypatch, logprob_mod, 1)
    single = token_logprobs(rows, weight, row_targets, return_entropy=True, impl="triton")
    assert given and all(cfg["RANGES"] == 1 for cfg in given)
    for a, b in zip(base, single):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,P,K", [(150, 130, 70), (37, 72, 1271)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_grouped_order(M, P, K, accumulate):
    # 3 row blocks of 64 in groups of 2 (a short last group), ragged edges everywhere
    g = torch.Generator().manual_seed(24)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, P, generator=g)
    out = torch.randn(M, P, generator=g)
    expected = a.double() @ b.double() + (out.double() if accumulate else 0)
    lmhead.matmul(a, b, out, accumulate=accumulate)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_chunk_width_keeps_the_scratch_budget():
    # shape A (N = 16384, D = 4096, bf16): a 256 MiB accumulator leaves 192 MiB of buffer, 6144 columns, 25 chunks
    acc = 16384 * 4096 * 4
    width = lmhead.chunk_width(16384, 151936, 2, 256, acc)
    assert width == 6144 and acc + 16384 * width * 2 <= lmhead.SCRATCH_BYTES
    # a small batch gets wide chunks (a whole vocabulary at most); a huge accumulator keeps the floor
    assert lmhead.chunk_width(64, 151936, 2, 256, 64 * 4096 * 4) == 151936 // 256 * 256 + 256
    assert 65536 * lmhead.chunk_width(65536, 151936, 2, 256, 65536 * 8192 * 4) * 2 <= lmhead.CHUNK_BYTES
