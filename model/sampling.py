"""Prompt packing, batched sampling with a KV cache, and response log-probs through the fused kernel.

Layout shared by sampling, SFT and RL (B sequences, P prompt columns, T completion columns):

    input_ids = [ left-padded prompt (B, P) | completion (B, T), padded after EOS ]

Left padding puts every prompt's last token in column P - 1, so the hidden state that predicts completion token
t is always column P - 1 + t: the response hidden states are one slice, `hidden[:, P-1:-1]`, with no gather and no
host sync. Position ids count real tokens only (`cumsum(mask) - 1`), so padding does not shift positions.

The response mask is positional: True from the first completion token up to and including the first EOS (or the
last generated token when the budget ran out). It never compares ids with the pad id, so a tokenizer whose pad
token is its EOS token still trains on the real EOS.
"""

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from grm_kernels import token_logprobs
from model.hf import head_weight


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P) int64, mask (B, P) bool) with every sequence right-aligned."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise ValueError("pad_left needs at least one sequence and no empty sequence")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[b, P - len(s) :] = True
    return ids.to(device), mask.to(device)


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) int64, mask (B, T) bool) with every sequence left-aligned."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B,) sampled ids from fp32 logits (B, V): greedy at temperature 0, else temperature + nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the top token always survives)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@functools.cache
def _cache_kwarg(base_class: type) -> str:
    """The name a decoder's forward takes its KV cache by: `cache` from transformers 5.25 (where `past_key_values`
    is deprecated, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base_class.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions for left-padded prompts (B, P); returns (completion ids (B, T), response mask (B, T)).

    T <= max_new_tokens: decoding stops once every sequence has produced EOS. `vocab_size` (the tokenizer's
    length) keeps padded head rows beyond the tokenizer from ever being sampled. Only the last position's logits
    are formed, (B, V) per step; the prompt's own logits are never computed. `group` > 1: the rows come in runs of
    `group` identical prompts; each prompt is read once and its KV cache repeated for its group.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    was_training = model.training
    model.eval()
    base, weight = model.base_model, head_weight(model)
    B = prompt_ids.shape[0]
    attn = prompt_mask.long()  # (B, P + t)
    pos = _positions(prompt_mask)[:, -1:]  # (B, 1)
    hidden, cache = _read_prompts(model, prompt_ids, prompt_mask, group)
    hidden = hidden[:, -1]  # (B, D)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive = [], []
    for step in range(max_new_tokens):
        logits = F.linear(hidden, weight).float()  # (B, V)
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        tok = _next_token(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        alive.append(~done)
        done = done | (tok == eos_id)
        if step + 1 == max_new_tokens or bool(done.all()):  # host sync: one per decode step, to stop early
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos + 1
        hidden = base(
            input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **cache
        ).last_hidden_state[:, -1]
    model.train(was_training)
    return torch.stack(tokens, dim=1), torch.stack(alive, dim=1)


def _check_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group: int) -> None:
    """Refuse a `group` that does not describe the rows: runs of `group` identical prompts, prompt-major."""
    B, P = prompt_ids.shape
    if group < 1 or B % group:
        raise ValueError(f"group must be >= 1 and divide the batch's {B} rows, got {group}")
    ids_g, mask_g = prompt_ids.reshape(B // group, group, P), prompt_mask.reshape(B // group, group, P)
    same = torch.equal(ids_g, ids_g[:, :1].expand_as(ids_g)) and torch.equal(mask_g, mask_g[:, :1].expand_as(mask_g))
    if not same:
        raise ValueError(f"group={group}: a group's prompts differ (rows must be prompt-major, {group} per prompt)")


def _read_prompts(model, prompt_ids, prompt_mask, group: int) -> tuple[torch.Tensor, dict]:
    """Run the prompts (B, P) through the decoder with a KV cache, each of a group's `group` identical prompts once
    (`group` = 1: every row): the last position's final hidden state (B, 1, D) and the cache, as the decoder's
    keyword argument, both repeated to the B rows."""
    _check_groups(prompt_ids, prompt_mask, group)
    base = model.base_model
    cache = {_cache_kwarg(type(base)): DynamicCache(config=model.config)}
    u_mask = prompt_mask[::group]
    last = base(
        input_ids=prompt_ids[::group],
        attention_mask=u_mask.long(),
        position_ids=_positions(u_mask),
        use_cache=True,
        **cache,
    ).last_hidden_state[:, -1:]
    if next(iter(cache.values())).get_seq_length() == 0:  # a forward that swallowed the argument: no cache, wrong text
        raise RuntimeError(f"{type(base).__name__}.forward did not fill the KV cache passed as {next(iter(cache))}=")
    if group > 1:
        next(iter(cache.values())).batch_repeat_interleave(group)
        last = last.repeat_interleave(group, dim=0)
    return last, cache


def response_hidden(model, prompt_ids, prompt_mask, completion_ids, response_mask, *, group: int = 1) -> torch.Tensor:
    """Final hidden states (B, T, D) that predict each completion token (after the model's final norm).

    group > 1: the rows come in runs of `group` identical prompts (a GRPO batch, prompt-major). Each prompt then
    runs once, and its keys and values are repeated for the completions of its group, which attend to them as to
    a KV cache: the same hidden states up to rounding, with the prompt's cost divided by `group` (gradients reach
    the prompt's positions through the repeated keys and values)."""
    B, P = prompt_ids.shape
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    if group == 1:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask.long(), position_ids=_positions(mask))
        return hidden.last_hidden_state[:, P - 1 : -1]  # (B, T, D)
    first, cache = _read_prompts(model, prompt_ids, prompt_mask, group)  # (B, 1, D): predicts the first token
    if completion_ids.shape[1] == 1:
        return first
    rest = model.base_model(
        input_ids=completion_ids[:, :-1],
        attention_mask=mask[:, :-1].long(),
        position_ids=_positions(mask)[:, P:-1],
        use_cache=True,
        **cache,
    ).last_hidden_state  # (B, T - 1, D)
    return torch.cat([first, rest], dim=1)


def response_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) int64 of the True positions of `mask` (B, T), in row-major order: the rows of a (B * T, ...)
    view that the LM-head kernels take. The positions after EOS (and the completion padding of shorter rows) would
    be rows the kernel computes in full and the loss then drops. `scatter_rows` puts per-row results back."""
    return mask.reshape(-1).nonzero().squeeze(1)  # host sync: the number of response tokens sizes the kernels' inputs


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `x` (B, T, ...) seen as (B * T, ...); differentiable w.r.t. `x`."""
    return x.flatten(0, 1).index_select(0, index)


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) tensor holding `values` (N,) at the True positions of `mask` (B, T), in row-major order, 0 elsewhere;
    differentiable w.r.t. `values`."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def response_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
    group: int = 1,
) -> torch.Tensor:
    """Log-probs (B, T) fp32 of the completion tokens under `model` (0 outside the response), through
    `grm_kernels.token_logprobs` on the response rows only: the (B, T, V) logits are never formed, and the positions
    outside the response never reach the kernel. `group`: as in `response_hidden` (each prompt run once)."""
    hidden = response_hidden(model, prompt_ids, prompt_mask, completion_ids, response_mask, group=group)  # (B, T, D)
    rows = response_rows(response_mask)  # (N,)
    logp = token_logprobs(
        take_rows(hidden, rows), head_weight(model), take_rows(completion_ids, rows), temperature=temperature, impl=impl
    )
    return scatter_rows(logp, response_mask)
