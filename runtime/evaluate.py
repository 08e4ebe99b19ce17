"""Evaluation of a model on encoded prompts, shared by eval.py, train.py and distill.py: generate (greedy or sampled,
batched by prompt length, spread over the ranks), parse, score (sam/metrics.py), and the compact table."""

import time

import torch

from model.sampling import generate, pad_left
from runtime.parallel import Dist, as_sharded
from sam.metrics import relevance_metrics
from sam.parse import parse_scores
from sam.verdict import gold_verdicts


@torch.no_grad()
def evaluate_split(
    model,
    tokenizer,
    encoded,
    *,
    fmt,
    temperature=0.0,
    top_p=1.0,
    max_new_tokens=160,
    batch_size=64,
    seed=0,
    device="cpu",
    progress=None,
    dist=None,
) -> tuple[dict, list[dict]]:
    """(metrics, per-example predictions) for the encoded prompts of one split. Prompts are batched by length
    (less padding); results come back in the split's order.

    `model` is a model or a `runtime.parallel.Sharded`. Batch k samples with its own generator, seeded by (seed, k),
    so the result does not depend on how batches are spread: under `dist` (several ranks) rank r generates batches
    r, r + K, ... and every rank gets the whole split's metrics and predictions."""
    model, dist = as_sharded(model), dist or Dist()
    order = sorted(range(len(encoded.prompts)), key=lambda i: len(encoded.prompts[i]))
    batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    texts, gen_tokens = {}, 0
    start = time.perf_counter()
    with model.gathered():
        for k in range(dist.rank, len(batches), dist.world):
            idx = batches[k]
            ids, mask = pad_left([encoded.prompts[i] for i in idx], tokenizer.pad_token_id, device)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)
            completion, response = model(
                generate,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                temperature=temperature,
                top_p=top_p,
                vocab_size=len(tokenizer),
                generator=generator,
            )
            gen_tokens += int(response.sum())
            for row, i in enumerate(idx):
                n = int(response[row].sum())
                texts[i] = tokenizer.decode(completion[row, :n].tolist(), skip_special_tokens=True)
            if progress is not None:
                progress(len(idx) * dist.world)
    parts = dist.gather((texts, gen_tokens, time.perf_counter() - start))
    merged = {i: t for part in parts for i, t in part[0].items()}
    texts = [merged[i] for i in range(len(order))]
    gen_tokens = sum(part[1] for part in parts)
    seconds = max(part[2] for part in parts)
    parses = [parse_scores(t, fmt) for t in texts]
    records = encoded.records
    predicted = [p.label if p.ok else None for p in parses]
    labels = [r.label for r in records]
    groups = [(r.gold or {}).get("query_type") for r in records]
    step_correct, verdicts = None, [None] * len(records)
    if fmt == "criteria" and any(r.gold for r in records):
        v = gold_verdicts(texts, parses, [r.gold for r in records])
        step_correct = [
            [bool(c) if k else None for c, k in zip(cr, kr)] for cr, kr in zip(v.correct.tolist(), v.known.tolist())
        ]
        verdicts = [verdict_string(steps, parse, label) for steps, parse, label in zip(step_correct, parses, labels)]
    metrics = relevance_metrics(predicted, labels, groups=groups if any(groups) else None, step_correct=step_correct)
    metrics.update(
        seconds=seconds,
        examples_per_s=len(texts) / seconds,
        generated_tokens_per_s=gen_tokens / seconds,
        mean_completion_tokens=gen_tokens / len(texts),
        skipped_long_prompts=encoded.skipped,
    )
    preds = [
        {"id": r.id, "label": r.label, "predicted": p, "status": q.status, "completion": t, "verdicts": v}
        for r, p, q, t, v in zip(records, predicted, parses, texts, verdicts)
    ]
    return metrics, preds


# one character per verdict in `verdict_string`: right, wrong, unknown
VERDICT_CHARS = {True: "1", False: "0", None: "."}


def verdict_string(step_correct: list[bool | None], parse, label: int) -> str:
    """A completion's verdicts as 9 characters (1 right, 0 wrong, . unknown): the 7 criteria steps against their
    gold values (sam.verdict.gold_verdicts), then boxes 1 and 2 against the label (the verdicts SAM masks on, source
    "box"). train.py logs them at each validation, so a sweep can count how often a verdict flips during RL."""
    boxes = [s == label for s in parse.scores[:2]] if parse.ok and len(parse.scores) == 3 else [None, None]
    return "".join(VERDICT_CHARS[v] for v in [*step_correct, *boxes])


def merge_samples(runs: list[tuple[dict, list[dict]]]) -> dict:
    """One split's metrics from K sampled passes over the same records: top-level numeric metrics averaged over the
    passes (nested ones: per-class F1, confusion, step agreement, per-type accuracy, come from the first pass),
    and, for K > 1, pass@K (some answer right), informative_frac (some but not every answer right: the records
    whose GRPO group has a learning signal) and unanimous_wrong_frac (no answer right). These are the pre-RL
    gate figures of docs/benchmark.md."""
    metrics = dict(runs[0][0])
    if len(runs) == 1:
        return metrics
    for key, value in runs[0][0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = sum(m[key] for m, _ in runs) / len(runs)
    right = [sum(p["predicted"] == p["label"] for p in column) for column in zip(*(preds for _, preds in runs))]
    n, k = len(right), len(runs)
    metrics.update(
        samples=k,
        pass_at_k=sum(r > 0 for r in right) / n,
        informative_frac=sum(0 < r < k for r in right) / n,
        unanimous_wrong_frac=sum(r == 0 for r in right) / n,
    )
    return metrics


def format_compact(rows: dict[str, dict[str, dict]]) -> str:
    """One line per (row, split): accuracy, macro-F1, binary F1, malformed rate, step agreement."""
    lines = [f"{'model':<12} {'split':<16} {'acc':>7} {'macroF1':>8} {'binF1':>7} {'malformed':>10} {'steps ok':>9}"]
    for name, by_split in rows.items():
        for split, m in by_split.items():
            steps = [a for a in m.get("step_agreement") or [] if a is not None]
            step = f"{sum(steps) / len(steps):>9.3f}" if steps else f"{'-':>9}"
            lines.append(
                f"{name:<12} {split:<16} {m['accuracy']:>7.3f} {m['macro_f1']:>8.3f} {m['binary_f1']:>7.3f} "
                f"{m['malformed_rate']:>10.3f} {step}"
            )
    return "\n".join(lines)


def evaluate(model, tokenizer, encoded, *, samples: int = 1, seed: int = 0, **kwargs) -> tuple[dict, list[dict]]:
    """(metrics, predictions) of `samples` passes over one split (pass k seeded seed + k): one pass is
    `evaluate_split`; for K > 1 the metrics are `merge_samples` of the passes and each prediction carries its pass
    index as `sample`. `kwargs` go to `evaluate_split`."""
    runs = [evaluate_split(model, tokenizer, encoded, seed=seed + k, **kwargs) for k in range(samples)]
    metrics, preds = merge_samples(runs), runs[0][1]
    if len(runs) > 1:
        preds = [dict(p, sample=k) for k, (_, ps) in enumerate(runs) for p in ps]
    return metrics, preds
