"""Evaluate a checkpoint on one or more JSONL splits.

    python eval.py --checkpoint runs/default/best                          # test_random + test_longtail, greedy
    python eval.py --checkpoint DIR --splits val,my.jsonl --temperature 0.6 --seed 1   # sampled, as the authors
    python eval.py --checkpoint DIR --data-dir DIR --limit 200 --out results.json
    python eval.py --checkpoint runs/default/sft --splits rl --limit 200 --temperature 1 --samples 8   # pre-RL gate

Reports 5-class accuracy, macro-F1 and per-class F1, binary accuracy / F1 (relevant iff label >= 1), the confusion
matrix, the malformed rate, per-step agreement with gold (criteria format, records with gold values), accuracy per
query type (when records carry `gold.query_type`) and throughput. The prompt settings (format, instruction, rules)
default to the ones saved with the checkpoint by train.py (`prompt.json`, runtime/checkpoint.py). Writes JSON
(atomically) and prints a table. A malformed completion counts as a wrong answer (sam/metrics.py).
"""

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from data.schema import RecordError, write_text_atomic
from model.hf import ModelLoadError, load_model, load_tokenizer
from runtime.checkpoint import PromptSettings, read_prompt_settings
from runtime.config import ConfigError, parse_config
from runtime.data import BUILTIN_DIR, DataError, encode_prompts, load_split
from runtime.evaluate import evaluate, format_compact
from sam.prompt import FORMATS, load_rules


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
    samples: int = 1  # answers per record (with --temperature > 0): metrics averaged, pass@K, informative groups
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
                raise ConfigError(
                    f"--device {self.device}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
                )
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
        saved = read_prompt_settings(ckpt) or PromptSettings()
        fmt = cfg.fmt or saved.fmt
        with_instruction = (cfg.instruction or ("full" if saved.with_instruction else "none")) == "full"
        rules = load_rules(cfg.rules) if cfg.rules else saved.rules
        out = Path(cfg.out) if cfg.out else ckpt / "eval.json"
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        model = load_model(ckpt, device=device)  # before the tokenizer: a folder that is not a model says so
        check_writable(out)
        tokenizer = load_tokenizer(ckpt)
        results = {}
        for split in [s.strip() for s in cfg.splits.split(",") if s.strip()]:
            records = load_split(cfg.data_dir, split)
            records = records[: cfg.limit] if cfg.limit else records
            enc = encode_prompts(
                records,
                tokenizer,
                fmt=fmt,
                with_instruction=with_instruction,
                rules=rules,
                max_prompt_tokens=cfg.max_prompt_tokens,
                long_prompts=cfg.long_prompts,
                split=split,
            )
            if not enc.records:
                raise DataError(f"split {split!r}: every prompt was skipped as too long")
            results[Path(split).stem], _ = evaluate(
                model,
                tokenizer,
                enc,
                samples=cfg.samples,
                seed=cfg.seed,
                fmt=fmt,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                device=device,
            )
    except (ModelLoadError, RecordError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = {
        "checkpoint": str(ckpt),
        "fmt": fmt,
        "with_instruction": with_instruction,
        "temperature": cfg.temperature,
        "results": results,
    }
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
