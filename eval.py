"""Evaluate a checkpoint on one or more JSONL splits.

    python eval.py --checkpoint runs/default/best                          # test_random + test_longtail, greedy
    python eval.py --checkpoint DIR --splits val,my.jsonl --temperature 0.6 --seed 1   # sampled, as the authors
    python eval.py --checkpoint DIR --data-dir DIR --limit 200 --out results.json
    python eval.py --checkpoint runs/default/sft --splits rl --limit 200 --temperature 1 --samples 8   # pre-RL gate

Reports 5-class accuracy, macro-F1 and per-class F1, binary accuracy / F1 (relevant iff label >= 1), the confusion
matrix, the malformed rate, per-step agreement with gold (criteria format, records with gold values), accuracy per
query type (when records carry `gold.query_type`) and throughput. The prompt settings (format, instruction, rules)
default to the ones saved with the checkpoint by train.py (`prompt.json`). Writes JSON (atomically) and prints a
table. A malformed completion counts as a wrong answer (sam/metrics.py).
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from data.schema import RecordError, write_text_atomic
from model.hf import ModelLoadError, load_model, load_tokenizer
from model.sampling import generate, pad_left
from runtime.config import ConfigError, parse_config
from runtime.data import BUILTIN_DIR, DataError, encode_prompts, load_split
from runtime.parallel import Dist, as_sharded
from sam.metrics import relevance_metrics
from sam.parse import parse_scores
from sam.prompt import FORMATS, load_rules
from sam.verdict import gold_verdicts

PROMPT_FILE = "prompt.json"  # prompt settings saved beside every checkpoint


@torch.no_grad()
def evaluate_split(model, tokenizer, encoded, *, fmt, temperature=0.0, top_p=1.0, max_new_tokens=160, batch_size=64,
                   seed=0, device="cpu", progress=None, dist=None) -> tuple[dict, list[dict]]:  # fmt: skip
    """(metrics, per-example predictions) for the encoded prompts of one split. Prompts are batched by length
    (less padding); results come back in the split's order.

    `model` is a model or a `runtime.parallel.Sharded`. Batch k samples with its own generator, seeded by (seed, k),
    so the result does not depend on how batches are spread: under `dist` (several ranks) rank r generates batches
    r, r + K, ... and every rank gets the whole split's metrics and predictions."""
    policy, dist = as_sharded(model), dist or Dist()
    order = sorted(range(len(encoded.prompts)), key=lambda i: len(encoded.prompts[i]))
    batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    texts, gen_tokens = {}, 0
    start = time.perf_counter()
    with policy.gathered():
        for k in range(dist.rank, len(batches), dist.world):
            idx = batches[k]
            ids, mask = pad_left([encoded.prompts[i] for i in idx], tokenizer.pad_token_id, device)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)
            completion, response = policy(
                generate, ids, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, vocab_size=len(tokenizer),
                generator=generator,
            )  # fmt: skip
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
    step_correct = None
    if fmt == "criteria" and any(r.gold for r in records):
        v = gold_verdicts(texts, parses, [r.gold for r in records])
        step_correct = [[bool(c) if k else None for c, k in zip(cr, kr)] for cr, kr in
                        zip(v.correct.tolist(), v.known.tolist())]  # fmt: skip
    metrics = relevance_metrics(predicted, labels, groups=groups if any(groups) else None, step_correct=step_correct)
    metrics.update(
        seconds=seconds,
        examples_per_s=len(texts) / seconds,
        generated_tokens_per_s=gen_tokens / seconds,
        mean_completion_tokens=gen_tokens / len(texts),
        skipped_long_prompts=encoded.skipped,
    )
    preds = [{"id": r.id, "label": r.label, "predicted": p, "status": q.status, "completion": t}
             for r, p, q, t in zip(records, predicted, parses, texts)]  # fmt: skip
    return metrics, preds


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
    metrics.update(samples=k, pass_at_k=sum(r > 0 for r in right) / n,
                   informative_frac=sum(0 < r < k for r in right) / n,
                   unanimous_wrong_frac=sum(r == 0 for r in right) / n)  # fmt: skip
    return metrics


def format_compact(rows: dict[str, dict[str, dict]]) -> str:
    """One line per (row, split): accuracy, macro-F1, binary F1, malformed rate, step agreement."""
    lines = [f"{'model':<12} {'split':<16} {'acc':>7} {'macroF1':>8} {'binF1':>7} {'malformed':>10} {'steps ok':>9}"]
    for name, by_split in rows.items():
        for split, m in by_split.items():
            steps = [a for a in m.get("step_agreement") or [] if a is not None]
            step = f"{sum(steps) / len(steps):>9.3f}" if steps else f"{'-':>9}"
            lines.append(f"{name:<12} {split:<16} {m['accuracy']:>7.3f} {m['macro_f1']:>8.3f} {m['binary_f1']:>7.3f} "
                         f"{m['malformed_rate']:>10.3f} {step}")  # fmt: skip
    return "\n".join(lines)


@dataclass
class EvalConfig:
    checkpoint: str = ""  # checkpoint folder (Hugging Face format), e.g. runs/default/best
    data_dir: str = BUILTIN_DIR  # folder of the splits
    splits: str = "test_random,test_longtail"  # comma list of split names or .jsonl paths
    limit: int = 0  # evaluate the first N records of each split (0 = all)
    fmt: str = ""  # prompt format; default: the checkpoint's prompt.json, else criteria
    instruction: str = ""  # full | none; default: the checkpoint's prompt.json, else full
    rules: str = ""  # business rules JSON; default: the checkpoint's
    temperature: float = 0.0  # 0 = greedy; the authors validate at 0.6
    samples: int = (
        1  # answers per record (with --temperature > 0): metrics averaged, plus pass@K and informative groups
    )
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 160  # completion budget
    max_prompt_tokens: int = 512  # longer prompts follow --long-prompts
    long_prompts: str = "error"  # error | skip
    batch_size: int = 64  # prompts per generation batch
    seed: int = 0  # sampling seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    out: str = ""  # JSON output (default: <checkpoint>/eval.json)

    def __post_init__(self):
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required")
        if self.fmt and self.fmt not in FORMATS:
            raise ConfigError(f"--fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.instruction not in ("", "full", "none"):
            raise ConfigError(f"--instruction must be full or none, got {self.instruction!r}")
        if self.long_prompts not in ("error", "skip"):
            raise ConfigError(f"--long-prompts must be error or skip, got {self.long_prompts!r}")
        if (
            not 0 <= self.temperature < float("inf")
            or not 0 < self.top_p <= 1
            or self.batch_size < 1
            or (self.max_new_tokens < 1)
        ):  # written so that nan fails every comparison
            raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1, --batch-size >= 1, --max-new-tokens >= 1")
        if self.samples < 1 or (self.samples > 1 and self.temperature == 0):
            raise ConfigError("--samples must be >= 1, and > 1 only with --temperature > 0 (greedy answers repeat)")
        if self.limit < 0 or self.max_prompt_tokens < 1:
            raise ConfigError("need --limit >= 0 (0 = every record) and --max-prompt-tokens >= 1")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            if device is None or device.type not in ("cpu", "cuda", "mps"):
                raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
            if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
                raise ConfigError(f"--device {self.device}, but this machine has {torch.cuda.device_count()} CUDA "
                                  "device(s)")  # fmt: skip
            if device.type == "mps" and not torch.backends.mps.is_available():
                raise ConfigError("--device mps, but MPS is not available on this machine")


def check_writable(path: Path) -> None:
    """Fail now, not after the whole evaluation, when `path` cannot be written (a folder, no permission)."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    folder = path.parent.absolute()
    while not folder.exists():  # the folders write_text_atomic will create: their first existing ancestor decides
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        tempfile.TemporaryFile(dir=folder).close()  # the one sure test of permission; leaves nothing behind
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def main(argv=None) -> int:
    hf_logging.disable_progress_bar()  # the per-file bars of save/load would break the progress bar's line
    cfg, _ = parse_config(EvalConfig, argv, __doc__)
    try:
        ckpt = Path(cfg.checkpoint)
        saved = json.loads((ckpt / PROMPT_FILE).read_text()) if (ckpt / PROMPT_FILE).exists() else {}
        fmt = cfg.fmt or saved.get("fmt", "criteria")
        with_instruction = (cfg.instruction or ("full" if saved.get("with_instruction", True) else "none")) == "full"
        rules = load_rules(cfg.rules) if cfg.rules else saved.get("rules")
        out = Path(cfg.out) if cfg.out else ckpt / "eval.json"
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        model = load_model(ckpt, device=device)  # before the tokenizer: a folder that is not a model says so
        check_writable(out)
        tokenizer = load_tokenizer(ckpt)
        results = {}
        for split in [s.strip() for s in cfg.splits.split(",") if s.strip()]:
            records = load_split(cfg.data_dir, split)
            records = records[: cfg.limit] if cfg.limit else records
            enc = encode_prompts(records, tokenizer, fmt=fmt, with_instruction=with_instruction, rules=rules,
                                 max_prompt_tokens=cfg.max_prompt_tokens, long_prompts=cfg.long_prompts,
                                 split=split)  # fmt: skip
            if not enc.records:
                raise DataError(f"split {split!r}: every prompt was skipped as too long")
            runs = [evaluate_split(model, tokenizer, enc, fmt=fmt, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed + k,
                                   device=device) for k in range(cfg.samples)]  # fmt: skip
            results[Path(split).stem] = merge_samples(runs)
    except (ModelLoadError, RecordError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = {"checkpoint": str(ckpt), "fmt": fmt, "with_instruction": with_instruction,
               "temperature": cfg.temperature, "results": results}  # fmt: skip
    try:
        write_text_atomic(out, json.dumps(payload, indent=2) + "\n")
    except OSError as exc:  # checked before the evaluation; something changed since
        print(f"error: --out {out}: cannot write the results ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(format_compact({ckpt.name: results}))
    for split, m in results.items():
        print(f"{split} confusion (rows gold, columns predicted): {m['confusion']}")
        if cfg.samples > 1:
            print(
                f"{split}: {cfg.samples} samples per record at T={cfg.temperature}: pass@1 {m['accuracy']:.3f}, "
                f"pass@{cfg.samples} {m['pass_at_k']:.3f}, informative groups {m['informative_frac']:.3f}"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
