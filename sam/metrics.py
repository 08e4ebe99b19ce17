"""Evaluation metrics for relevance labels (PAPER.md, "Baselines"): 5-class accuracy, macro-F1 and per-class F1,
binary accuracy / F1 (relevant iff label >= 1), confusion matrix, malformed rate, per-step agreement with gold,
and accuracy per query type; paired bootstrap intervals for the difference of two models on the same examples.

A malformed completion (no readable label) is a wrong answer everywhere: it counts against accuracy, is a false
negative for its gold class (and, in the binary view, a false negative when the gold is relevant), and is never a
false positive for any class. The confusion matrix has a sixth column, "malformed", for it.
"""

from collections import defaultdict

import numpy as np

from sam.prompt import LABELS


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def relevance_metrics(
    predicted: list[int | None],
    labels: list[int],
    *,
    groups: list[str | None] | None = None,
    step_correct: list[list[bool | None]] | None = None,
) -> dict:
    """Metrics for predicted labels (None = malformed) against gold labels.

    groups: a query type per example (None = unknown) for per-type accuracy. step_correct: per example, one verdict
    per reasoning step (None = unknown) for per-step agreement with gold.
    """
    if len(predicted) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (> 0); got {len(predicted)} and {len(labels)}")
    n = len(labels)
    confusion = {gold: {str(p): 0 for p in LABELS} | {"malformed": 0} for gold in LABELS}
    for p, gold in zip(predicted, labels):
        confusion[gold]["malformed" if p is None else str(p)] += 1
    correct = sum(p == gold for p, gold in zip(predicted, labels))
    per_class = {}
    for c in LABELS:
        tp = confusion[c][str(c)]
        fp = sum(confusion[g][str(c)] for g in LABELS if g != c)
        fn = sum(confusion[c].values()) - tp
        per_class[str(c)] = _f1(tp, fp, fn)
    present = [c for c in LABELS if sum(confusion[c].values())]  # macro-F1 over the classes present in the gold
    b_tp = sum(p is not None and p >= 1 and g >= 1 for p, g in zip(predicted, labels))
    b_fp = sum(p is not None and p >= 1 and g < 1 for p, g in zip(predicted, labels))
    b_fn = sum((p is None or p < 1) and g >= 1 for p, g in zip(predicted, labels))
    b_correct = sum(p is not None and (p >= 1) == (g >= 1) for p, g in zip(predicted, labels))
    out = {
        "n": n,
        "accuracy": correct / n,
        "macro_f1": sum(per_class[str(c)] for c in present) / len(present),
        "per_class_f1": per_class,
        "binary_accuracy": b_correct / n,
        "binary_f1": _f1(b_tp, b_fp, b_fn),
        "malformed_rate": sum(p is None for p in predicted) / n,
        "confusion": {str(g): row for g, row in confusion.items()},
    }
    if groups is not None:
        tally = defaultdict(lambda: [0, 0])
        for p, gold, g in zip(predicted, labels, groups):
            if g is not None:
                tally[g][0] += p == gold
                tally[g][1] += 1
        out["accuracy_by_type"] = {g: {"accuracy": c / t, "n": t} for g, (c, t) in sorted(tally.items())}
    if step_correct is not None and step_correct:
        steps = len(step_correct[0])
        agree = []
        for k in range(steps):
            known = [v[k] for v in step_correct if v[k] is not None]
            agree.append(sum(known) / len(known) if known else None)
        out["step_agreement"] = agree
    return out


def metric_on(gold: np.ndarray, pred: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """Accuracy or macro-F1 (sam/metrics.py's definitions: malformed is wrong, macro over the gold classes
    present) of each resample: idx (R, n) indices into the examples -> (R,)."""
    g, p = gold[idx], pred[idx]
    if metric == "accuracy":
        return (g == p).mean(axis=1)
    f1_sum, present = np.zeros(len(idx)), np.zeros(len(idx))
    for c in np.unique(gold):
        tp = ((p == c) & (g == c)).sum(1)
        gp = (g == c).sum(1)
        denom = (p == c).sum(1) + gp
        f1_sum += np.where(tp > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        present += gp > 0
    return f1_sum / present


def paired_bootstrap(arm: list, base: list, metric: str, resamples: int, seed: int = 0) -> dict:
    """arm, base: per seed (gold, pred) on the same examples. Mean over seeds of (arm - base) with a two-level
    (seeds, then examples) bootstrap 95% interval, and the per-seed differences."""
    rng = np.random.default_rng(seed)
    k, n = len(arm), len(arm[0][0])
    full = np.arange(n)[None]
    per_seed = [float(metric_on(*a, full, metric)[0] - metric_on(*b, full, metric)[0]) for a, b in zip(arm, base)]
    idx = rng.integers(0, n, size=(resamples, n))
    diffs = np.stack([metric_on(*a, idx, metric) - metric_on(*b, idx, metric) for a, b in zip(arm, base)])  # (k, R)
    picks = rng.integers(0, k, size=(resamples, k))
    boot = diffs[picks, np.arange(resamples)[:, None]].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "diff": float(np.mean(per_seed)),
        "lo": float(lo),
        "hi": float(hi),
        "per_seed": per_seed,
        "p_le_0": float((boot <= 0).mean()),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same examples (a, b: (n,) per-example scores, e.g. 1 for a correct answer, or the
    fraction of correct samples) with a percentile bootstrap 95% interval over examples, and the counts of
    examples where a alone or b alone is better."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_difference needs two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return {
        "diff": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "n": len(d),
        "a_better": int((d > 0).sum()),
        "b_better": int((d < 0).sum()),
    }
