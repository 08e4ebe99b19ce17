"""Run folders and atomic checkpoints that resume exactly.

A checkpoint is a folder: the model in Hugging Face format (safetensors + config + tokenizer, loadable by
`model.hf.load_model` or any transformers code) plus `trainer_state.pt` (optimizer, LR scheduler, every RNG state,
stage, step and data position). It is written into `<name>.tmp`, then swapped in by renames: the old folder moves
to `<name>.old`, the new one takes its name, the old one is deleted. A crash at any point leaves either the old or
the new checkpoint complete, and `recover` puts back `<name>.old` when the swap was cut between its two renames.
"""

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data.schema import file_mode, write_text_atomic
from model.hf import ModelLoadError, save_pretrained
from runtime.config import ConfigError
from sam.prompt import FORMATS, check_rules

STATE_FILE = "trainer_state.pt"
PROMPT_FILE = "prompt.json"  # how the model in a checkpoint folder is prompted; eval.py, --init and distill read it


@dataclass(frozen=True)
class PromptSettings:
    """The prompt a checkpoint's model was trained on: reasoning format, instruction text on or off, business rules
    (None: the built-in ones). Saved beside every checkpoint so that evaluating or continuing it prompts it alike."""

    fmt: str = "criteria"
    with_instruction: bool = True
    rules: dict | None = None


def read_prompt_settings(folder: str | Path) -> PromptSettings | None:
    """The folder's saved prompt settings, or None when it has none (a model from elsewhere)."""
    path = Path(folder) / PROMPT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings = PromptSettings(**data)
    except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, not an object, unknown keys
        raise ModelLoadError(f"{path}: not readable prompt settings ({exc})") from None
    # each value's type: a string "no" must not read as a true with_instruction, nor "x" pass for the rules
    if settings.fmt not in FORMATS:
        raise ModelLoadError(f"{path}: 'fmt' must be one of {FORMATS}, got {settings.fmt!r}")
    if not isinstance(settings.with_instruction, bool):
        raise ModelLoadError(f"{path}: 'with_instruction' must be true or false, got {settings.with_instruction!r}")
    if settings.rules is not None:
        try:
            check_rules(settings.rules, f"{path}: 'rules'")
        except ValueError as exc:
            raise ModelLoadError(f"{exc} (or null for the built-in rules)") from None
    return settings


def write_prompt_settings(folder: str | Path, settings: PromptSettings) -> None:
    write_text_atomic(Path(folder) / PROMPT_FILE, json.dumps(asdict(settings), indent=2) + "\n")


def recover(path: Path) -> None:
    """Undo a swap interrupted between its renames; drop a half-written `.tmp`."""
    old, tmp = path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp")
    if not path.exists() and old.exists():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a fresh `<path>.tmp` to fill; on success it replaces `path` by the rename swap above."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    mode = file_mode()
    for file in tmp.rglob("*"):  # some writers (safetensors via transformers) create files private (0600)
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)
    _swap_in(tmp, path)


def write_model(folder: Path, model, tokenizer, state_dict=None, prompt: PromptSettings | None = None) -> None:
    """The model in Hugging Face format (`state_dict`: full weights gathered from sharded ranks) and its prompt
    settings, into `folder` (part of a checkpoint being written: not atomic by itself)."""
    save_pretrained(model, tokenizer, folder, state_dict)
    if prompt is not None:
        write_prompt_settings(folder, prompt)


def save_checkpoint(
    path: Path,
    model,
    tokenizer,
    trainer_state: dict | None = None,
    state_dict=None,
    prompt: PromptSettings | None = None,
) -> None:
    """Write the model (`write_model`) and optionally the trainer state to `path`, atomically."""
    with atomic_folder(path) as tmp:
        write_model(tmp, model, tokenizer, state_dict, prompt)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a resumable checkpoint, loaded with `weights_only=True`: tensors, numbers, strings and
    containers only, so a crafted state file cannot run code. Anything else (a pickled object, a truncated or
    corrupt file) is a ConfigError naming the file."""
    file = Path(path) / STATE_FILE
    if not file.exists():
        raise ConfigError(f"{path}: no {STATE_FILE}; not a resumable checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{file}: refused: it holds objects other than tensors, numbers, strings and containers, and "
            "loading them could run code (or it was written by an older version that stored numpy "
            "objects)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ConfigError(
            f"{file}: not a readable trainer state (truncated or corrupt: {type(exc).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{file}: the trainer state must be a dict, got {type(state).__name__}")
    return state


def rng_states(generator: torch.Generator | None = None) -> dict:
    """Every random state a training step draws from, as tensors, numbers and tuples only (numpy's key array is
    stored as a tensor), so the trainer state loads with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_states(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # weights_only loads may hand back lists
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def rank_rng_states(dist, generator: torch.Generator | None = None) -> dict:
    """Trainer-state entries for every rank's random state (collective): `rng` (rank 0's, as a one-process run
    saves it), `rng_ranks` (all ranks') and `world_size`."""
    states = dist.gather(rng_states(generator))
    return {"rng": states[0], "rng_ranks": states, "world_size": dist.world}


def set_rank_rng_states(state: dict, dist, generator: torch.Generator | None = None) -> None:
    set_rng_states(state["rng_ranks"][dist.rank] if "rng_ranks" in state else state["rng"], generator)
