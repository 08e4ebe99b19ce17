"""The reader: a small LM pretrained on the built-in world's text before any trace or label (pretrain.py builds it).

A model trained from random weights on the warm-up traces never learned to compare the note with the query
(docs/LOG.md, 2026-12-02 and 2026-12-06): it must count how many of the note's sentences name the query's subject,
and find a query's word among the note's, from one supervised token per step. A pretrained LLM brings those skills
to the paper's warm-up; the reader brings them to the `tiny` preset, learned from the world's text alone:

- the corpus is the prompt text of fresh records of the world (note, then query, exactly as prompts show them)
  from a stream of its own (`grm-sam/v<VERSION>/<seed>/pretrain`), disjoint from every split's; it holds no label,
  no rubric or initial score, no business-rule case and no trace;
- three objectives on every token: next-token prediction, and two histogram targets read by a linear probe head
  that is dropped on saving: how many times the token at this position occurred before it in the text, and how
  many times in the note's content (capped). Counting is what reading this world needs: the coverage counts the
  sentences that name the query's subject (a title mention does not count), and a rule's case or a keyword hit
  is whether a query word occurs in the note. "Counting in Small Transformers" (Behrens, Biggio and Zdeborova,
  ICML 2025) shows small softmax transformers learn such histograms with a constant first token as the attention
  sink (every prompt starts with "Note"). The targets are counts of words, never a coverage level, a score or a
  rule's case: turning them into the trace's values is the warm-up's job.

`reader.json` in the folder records the recipe, seed, world version, generator fingerprint and vocabulary hash.
`check_reader` refuses a reader made for another world version or another vocabulary in one line.
"""

import hashlib
import json
import random
from pathlib import Path

import torch

from data.synthetic import DRAWS, VERSION, make_record
from model.hf import ModelLoadError, load_tokenizer
from sam.prompt import render_prompt

READER_FILE = "reader.json"
# the shipped readers, relative to the working directory like data/builtin (the scripts run from the repository root)
DEFAULT_READER = "models/reader"  # train.py's default model (tiny preset)
DEFAULT_STUDENT = "models/reader-nano"  # distill.py's default student (nano preset)


def corpus_stream(seed: int, name: str = "pretrain"):
    """An endless stream of (world text, character span of the note's content in it): prompts without instruction
    text, deterministic in (`seed`, `name`). The benchmark's splits are drawn from streams named after them
    (data/synthetic.py `generate`); these are named `pretrain` and `pretrain-heldout`, so a text repeats a split's
    only by chance of the closed vocabulary."""
    rng = random.Random(f"grm-sam/v{DRAWS}/{seed}/{name}")
    index = 0
    while True:
        record = make_record(rng, name, index, "random")
        text = render_prompt(record, with_instruction=False)
        start = text.index("\nNote content: ") + len("\nNote content: ")
        assert text[start:].startswith(record.note["content"]), "the prompt layout changed (sam/prompt.py)"
        yield text, (start, start + len(record.note["content"]))
        index += 1


def earlier_counts(ids: torch.Tensor, where: torch.Tensor, cap: int) -> torch.Tensor:
    """(B, L) int64: at each position i, how many positions j < i with `where[b, j]` hold the same token as i,
    capped at `cap`. `where` (B, L) bool picks the positions counted (all tokens, or the note's content)."""
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, L, L): same[b, i, j] = token i equals token j
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)  # j < i
    return (same & earlier & where.unsqueeze(1)).sum(-1).clamp(max=cap)


def vocabulary_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id): a reader's embeddings mean nothing under another."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]


def read_reader_info(folder: str | Path) -> dict | None:
    """The folder's reader.json, or None when the folder is not a reader."""
    path = Path(folder) / READER_FILE
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("world_version"), int):
            raise ValueError("no integer world_version")
        return info
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable reader record ({exc})") from None


def check_reader(folder: str | Path, data_dir: str | Path) -> None:
    """Refuse a reader pretrained on another world version, or with another vocabulary than the benchmark's in
    `data_dir` (its tokenizer/): its weights would read words it never saw. A folder without reader.json (a
    trained checkpoint, a model from elsewhere) is not checked."""
    info = read_reader_info(folder)
    if info is None:
        return
    rebuild = "rebuild it with `python pretrain.py`, or train from random weights with --model tiny"
    if info["world_version"] != VERSION:
        raise ModelLoadError(
            f"{folder}: a reader pretrained on world version {info['world_version']}, but this code's built-in "
            f"world is version {VERSION}; {rebuild}"
        )
    tokenizer_dir = Path(data_dir) / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists() and info.get("vocabulary") != vocabulary_hash(
        load_tokenizer(tokenizer_dir)
    ):
        raise ModelLoadError(f"{folder}: the reader's vocabulary is not the one of {tokenizer_dir}; {rebuild}")
