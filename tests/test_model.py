"""model/: presets, loading errors, the packed layout, KV-cache sampling and response log-probs."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from data.tokenizer import build_tokenizer
from model.hf import (
    ModelLoadError,
    build_preset,
    check_model,
    head_weight,
    load_model,
    load_tokenizer,
    num_parameters,
    prepare,
)
from model.sampling import generate, pad_left, pad_right, response_logprobs

CORPUS = ["Step 1: the query ramen has a precise need.\nStep 2: \\boxed{3} \\boxed{-1} the note is about sushi."]


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer(CORPUS)
    t.padding_side = "left"
    return t


def micro_model(tok, seed=0, layers=2):
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return prepare(Qwen2ForCausalLM(config), device="cpu", attention="sdpa").eval()


def test_presets_sized_to_tokenizer(tok):
    tiny = build_preset("tiny", tok, seed=0)
    assert tiny.config.vocab_size == len(tok)
    assert head_weight(tiny) is tiny.get_input_embeddings().weight  # tied: one parameter
    assert 0.5e6 < num_parameters(tiny) < 1.5e6
    again = build_preset("tiny", tok, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))
    state = torch.get_rng_state()
    build_preset("tiny", tok, seed=1)
    assert torch.equal(state, torch.get_rng_state()), "building a preset must not move the global RNG"
    with pytest.raises(ModelLoadError, match="unknown model preset"):
        build_preset("huge", tok)


def test_load_errors(tmp_path, tok):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelLoadError, match="cannot load a causal LM"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")
    model = micro_model(tok)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelLoadError, match="final_logit_softcapping"):
        check_model(model, where="x")


@pytest.mark.parametrize("damage", ["missing", "unexpected", "mismatched"])
def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, tok, damage):
    # transformers would fill a missing tensor with a fresh random one and go on: a load error instead
    from safetensors.torch import load_file, save_file

    micro_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    load_model(tmp_path)  # intact (tied head not stored): loads
    weights = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    if damage == "missing":
        del weights[key]
    elif damage == "unexpected":
        weights["model.layers.0.extra.weight"] = torch.zeros(3)
    else:
        weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="does not match|cannot load"):
        load_model(tmp_path)


def test_save_load_round_trip(tmp_path, tok):
    model = micro_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = load_model(tmp_path, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert load_tokenizer(tmp_path).padding_side == "left"


def test_response_logprobs_match_model_logits_with_left_padding(tok):
    model = micro_model(tok)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    completions = [[20, 21, 22], [23, 24, 25, 26], [27]]
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right(completions, tok.pad_token_id, "cpu")
    logp = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref")  # (B, T)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        # each sequence alone, unpadded, through the model's own logits
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[b, : len(c)], want, atol=1e-5, rtol=1e-5)
        assert (logp[b, len(c) :] == 0).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_group_shares_its_prompt_with_the_same_logprobs_and_gradients(tok, attention):
    """group=G (a GRPO batch, prompt-major): each prompt runs once and its keys and values serve its G completions.
    Log-probs and parameter gradients equal the plain path's, with left-padded prompts of different lengths,
    completions of different lengths (one of a single token) and a one-token batch; a layout whose groups hold
    different prompts is refused."""
    model = prepare(micro_model(tok, layers=2), device="cpu", attention=attention).train()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    completions = [[20, 21, 22], [23], [24, 25, 26, 27], [28, 29], [30, 31, 32, 33, 34], [35, 36]]
    p_ids, p_mask = pad_left([p for p in prompts for _ in range(2)], tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right(completions, tok.pad_token_id, "cpu")
    weights = torch.randn(c_ids.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for group in (1, 2):
        model.zero_grad()
        logp = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref", group=group)
        (logp * weights).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert (shared[~c_mask] == 0).all()
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    one = response_logprobs(model, p_ids, p_mask, c_ids[:, :1], c_mask[:, :1], impl="ref", group=2)
    torch.testing.assert_close(one, plain[:, :1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a group's prompts differ"):
        response_logprobs(model, p_ids[[0, 2, 1, 3, 4, 5]], p_mask, c_ids, c_mask, impl="ref", group=2)
    with pytest.raises(ValueError, match="divide the batch"):
        response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref", group=4)


def test_sampling_a_group_reads_its_prompt_once_with_the_same_samples(tok):
    """generate(group=G) prefills each prompt once and repeats its KV cache: the same seeded samples as reading
    every row, left-padded prompts of different lengths included; a layout that is not prompt-major is refused."""
    model = micro_model(tok)
    p_ids, p_mask = pad_left([p for p in ([5, 6, 7, 8, 9], [10, 11], [12, 13, 14]) for _ in range(4)], 0, "cpu")
    outs = []
    for group in (1, 4):
        gen = torch.Generator().manual_seed(3)
        outs.append(generate(model, p_ids, p_mask, max_new_tokens=12, eos_id=-1, pad_id=0, generator=gen, group=group))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert len({tuple(row) for row in outs[0][0].tolist()}) > 3  # the rows of a group differ: sampled, not copied
    with pytest.raises(ValueError, match="a group's prompts differ"):
        generate(model, p_ids, p_mask, max_new_tokens=2, eos_id=-1, pad_id=0, group=3)


def test_response_logprobs_send_only_response_rows(tok, monkeypatch):
    """The kernel gets exactly the response tokens (no post-EOS or completion padding rows), and the result and
    the gradients equal those of the full (B * T)-row call with the other rows ignored."""
    import model.sampling as sampling
    from grm_kernels import token_logprobs_ref
    from model.hf import head_weight

    model = micro_model(tok)
    p_ids, p_mask = pad_left([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right([[20, 21, 22], [23, 24, 25, 26, 27, 28], [29]], tok.pad_token_id, "cpu")
    sent = []

    def recording(hidden, weight, targets, **kw):
        sent.append(tuple(hidden.shape))
        return token_logprobs_ref(hidden, weight, targets, temperature=kw["temperature"])

    monkeypatch.setattr(sampling, "token_logprobs", recording)
    logp = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref")
    assert sent == [(10, model.config.hidden_size)] and int(c_mask.sum()) == 10  # of 3 x 6 = 18 positions
    (logp * torch.arange(1.0, 19.0).view(3, 6)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    hidden = sampling.response_hidden(model, p_ids, p_mask, c_ids, c_mask)
    full = token_logprobs_ref(hidden.reshape(18, -1), head_weight(model), c_ids.masked_fill(~c_mask, -100).view(-1))
    torch.testing.assert_close(logp, full.view(3, 6), atol=1e-6, rtol=1e-6)
    assert (logp[~c_mask] == 0).all()
    (full * torch.arange(1.0, 19.0)).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)  # fp32 matmuls of 10 vs 18 rows


def test_head_gradient_reaches_tied_embedding(tok):
    model = micro_model(tok).train()
    p_ids, p_mask = pad_left([[5, 6, 7]], tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right([[8, 9]], tok.pad_token_id, "cpu")
    response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref").sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad[8].abs().sum() > 0


def _greedy_no_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_and_left_padding_equals_one_by_one(tok):
    model = micro_model(tok)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id, "cpu")
    out, mask = generate(model, p_ids, p_mask, max_new_tokens=6, eos_id=-1, pad_id=tok.pad_token_id, temperature=0.0)
    assert out.shape == (3, 6) and mask.all()
    for b, p in enumerate(prompts):
        assert out[b].tolist() == _greedy_no_cache(model, p, 6)


def test_eos_is_kept_in_the_response_and_padding_follows(tok):
    model = micro_model(tok)
    p_ids, p_mask = pad_left([[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    free, _ = generate(model, p_ids, p_mask, max_new_tokens=5, eos_id=-1, pad_id=0, temperature=0.0)
    eos = int(free[0, 2])  # make row 0's third greedy token the EOS
    for pad in (tok.pad_token_id, eos):  # pad == eos must not drop the real EOS from the response
        out, mask = generate(model, p_ids, p_mask, max_new_tokens=5, eos_id=eos, pad_id=pad, temperature=0.0)
        first = out[0].tolist().index(eos)
        assert first <= 2
        assert mask[0].tolist() == [True] * (first + 1) + [False] * (out.shape[1] - first - 1)
        assert (out[0, first + 1 :] == pad).all()
        for row in range(2):  # the mask is always a prefix
            m = mask[row].tolist()
            assert m == sorted(m, reverse=True)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tok):
    model = micro_model(tok)
    p_ids, p_mask = pad_left([[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    kw = dict(max_new_tokens=8, eos_id=-1, pad_id=0)

    def sample(seed, **extra):
        g = torch.Generator().manual_seed(seed)
        return generate(model, p_ids, p_mask, temperature=1.0, generator=g, **kw, **extra)[0]

    assert torch.equal(sample(1), sample(1))
    greedy = generate(model, p_ids, p_mask, temperature=0.0, **kw)[0]
    assert torch.equal(sample(2, top_p=1e-6), greedy)
    limited = sample(3, vocab_size=10)
    assert (limited < 10).all()


def test_generate_rejects_bad_options(tok):
    model = micro_model(tok)
    p_ids, p_mask = pad_left([[5]], 0, "cpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, p_ids, p_mask, max_new_tokens=0, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, p_ids, p_mask, max_new_tokens=2, eos_id=1, pad_id=0, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        pad_left([[1], []], 0, "cpu")


def test_fused_and_reference_logprobs_agree_through_the_model(tok):
    model = micro_model(tok)
    p_ids, p_mask = pad_left([[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right([[10, 11, 12], [13]], tok.pad_token_id, "cpu")
    ref = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="ref")
    fused = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl="triton")
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_tokenizer_tokenizes_like_the_original(tmp_path, tok):
    # transformers would load a generic tokenizer saved beside a Qwen2 config as Qwen2Tokenizer (another
    # pre-tokenizer): the checkpoint must tokenize exactly as the tokenizer it was saved from
    model = micro_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text = CORPUS[0] + " ramen sushi"
    assert load_tokenizer(tmp_path)(text)["input_ids"] == tok(text)["input_ids"]


class _Evil:
    """Pickles as a call that creates a file: what a crafted pytorch_model.bin would run with a full unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_pickle_checkpoint_is_refused_in_one_line(tmp_path, tok):
    model = micro_model(tok)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, tmp_path / "pytorch_model.bin")
    load_model(tmp_path)  # the honest .bin loads
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    assert not marker.exists()
    message = str(info.value)
    assert "cannot load a causal LM" in message and "\n" not in message and len(message) < 600, message
