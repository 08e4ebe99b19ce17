"""Loading the JSONL splits and turning records into token ids, with every check done before training starts.

Prompts longer than `max_prompt_tokens`: policy "error" (the default) stops with the count and the first ids;
policy "skip" leaves them out, prints how many per split and records the count in the run's results. Neither ever
truncates a prompt (a truncated note would be judged on text the label was not given for).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data.schema import Record, read_jsonl
from sam.prompt import render_gold_reasoning, render_prompt

BUILTIN_DIR = "data/builtin"


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the file or split and the reason."""


def ensure_builtin(data_dir: str | Path, seed: int = 0) -> bool:
    """Generate the built-in benchmark into `data_dir` when it is missing, or was written by another version of the
    generator (stats.json, written last, holds the version and a fingerprint of data/synthetic.py and
    sam/prompt.py); True if it was generated."""
    from data.synthetic import VERSION, fingerprint, write_benchmark

    data_dir = Path(data_dir)
    try:
        stats = json.loads((data_dir / "stats.json").read_text())
        found = (stats.get("version", 1), stats.get("generator")) if isinstance(stats, dict) else None
    except (OSError, ValueError):
        found = None  # missing or unreadable: generate
    if (
        found == (VERSION, fingerprint())
        and (data_dir / "rl.jsonl").exists()
        and (data_dir / "tokenizer" / "tokenizer.json").exists()
    ):
        return False
    was = "" if found is None else f" (it held version {found[0]}, generator {found[1]})"
    print(f"generating the built-in benchmark version {VERSION} into {data_dir}{was}, seed {seed} ...", flush=True)
    write_benchmark(data_dir, seed)
    return True


def split_path(data_dir: str | Path, name: str) -> Path:
    """`data_dir/name.jsonl`, or `name` itself when it is a path to a .jsonl file."""
    return Path(name) if name.endswith(".jsonl") else Path(data_dir) / f"{name}.jsonl"


def file_fingerprint(path: str | Path) -> dict:
    """What identifies a data file's contents: size in bytes, line count and SHA-256 (read in 1 MiB pieces)."""
    digest, size, lines = hashlib.sha256(), 0, 0
    with Path(path).open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
            size += len(piece)
            lines += piece.count(b"\n")
    return {"bytes": size, "lines": lines, "sha256": digest.hexdigest()}


def check_same_data(saved: dict | None, current: dict, where: str) -> None:
    """--resume: the splits must be the ones the run started on (split name -> `file_fingerprint`). A changed split
    would silently change the step count, the LR schedule and what every later step sees. A checkpoint written
    before fingerprints were recorded (`saved` None) is let through with a note."""
    if saved is None:
        print(f"note: {where} records no data fingerprint (an older version wrote it); the data is not checked")
        return

    def show(f: dict | None) -> str:
        return "not read" if f is None else f"{f['lines']} lines, {f['bytes']} bytes, sha256 {f['sha256'][:12]}"

    changed = [
        f"{split!r} was {show(saved.get(split))}, now {show(current.get(split))}"
        for split in sorted(set(saved) | set(current))
        if saved.get(split) != current.get(split)
    ]
    if changed:
        raise DataError(
            f"--resume: the data changed since {where} was written ({'; '.join(changed)}); a resumed run "
            "must read the same data: restore it, or start a new run under another --name"
        )


def load_split(data_dir: str | Path, name: str, fingerprints: dict | None = None) -> list[Record]:
    """Records of `data_dir/name.jsonl` (or `name` itself when it is a path to a .jsonl file). `fingerprints`, when
    given, receives the file's `file_fingerprint` under `name` (what --resume checks)."""
    path = split_path(data_dir, name)
    if not path.exists():
        raise DataError(f"{path}: split {name!r} not found")
    records = read_jsonl(path)  # raises RecordError listing file:line: reason
    if fingerprints is not None:
        fingerprints[name] = file_fingerprint(path)
    if not records:
        raise DataError(f"{path}: split {name!r} has no records")
    return records


@dataclass
class Encoded:
    records: list[Record]  # the records kept
    prompts: list[list[int]]  # their prompt ids
    skipped: int  # prompts longer than the limit, left out under policy "skip"


def encode_prompts(records, tokenizer, *, fmt, with_instruction, rules, max_prompt_tokens, long_prompts, split):
    """Prompt ids per record, after the length policy."""
    texts = [
        render_prompt(r, fmt, tokenizer=tokenizer, rules=rules, with_instruction=with_instruction) for r in records
    ]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = [r.id for r, p in zip(records, ids) if len(p) > max_prompt_tokens]
    if long and long_prompts == "error":
        raise DataError(
            f"split {split!r}: {len(long)} prompt(s) longer than --max-prompt-tokens {max_prompt_tokens} "
            f"(first: {long[:3]}); raise the limit or pass --long-prompts skip to leave them out"
        )
    keep = [i for i, p in enumerate(ids) if len(p) <= max_prompt_tokens]
    if long:
        print(f"split {split!r}: skipped {len(long)} prompt(s) longer than {max_prompt_tokens} tokens", flush=True)
    return Encoded([records[i] for i in keep], [ids[i] for i in keep], len(long))


def sft_target(record: Record, fmt: str) -> str:
    """The warm-up target: the record's own trace for the criteria format, else one rendered from gold values."""
    if fmt == "criteria" and record.reasoning:
        return record.reasoning
    try:
        return render_gold_reasoning(record, fmt)
    except ValueError as exc:
        raise DataError(f"record {record.id}: no reasoning trace for format {fmt!r} ({exc})") from None
