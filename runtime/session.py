"""What a training script is besides its loop: train.py and distill.py are each a `Session` subclass (their data and
models) plus a loop; this module owns the rest.

- `run_script(config_class, argv, doc, job)`: parse the flags, join the ranks (torchrun) and run `job(cfg, given, dist,
  started)`; bad input of any kind (flags, data, models, a damaged log) becomes one line on stderr and exit code 2,
  a non-finite loss exit code 3, and the run folder's lock is released on the way out.
- `start(cfg, given, dist, folders)`: the run folder (fresh, or the saved config and trainer state for --resume)
  and the global seed.
- `Session`: device and precision, the parallel strategy, the built-in benchmark, splits encoded for a prompt
  format (their fingerprints checked on --resume), models built from a preset or loaded from a folder and wrapped
  for the ranks, checkpoints written with their prompt settings, evaluation, the metrics log, and the messages
  every run prints.
"""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from data.schema import RecordError, write_text_atomic
from model.hf import (
    PRESETS,
    ModelLoadError,
    build_preset,
    head_weight,
    is_preset,
    load_model,
    prepare,
)
from model.sampling import generate, pad_left
from runtime.checkpoint import (
    STATE_FILE,
    PromptSettings,
    atomic_folder,
    rank_rng_states,
    set_rank_rng_states,
    write_model,
)
from runtime.config import ConfigError, parse_config, to_json
from runtime.data import BUILTIN_DIR, DataError, Encoded, check_same_data, encode_prompts, ensure_builtin, load_split
from runtime.evaluate import evaluate
from runtime.loop import Logger, NonFiniteLoss, device_settings, release_run_dir, setup_run_dir
from runtime.parallel import Dist, Sharded, process_group, resolve_strategy
from runtime.reader import DEFAULT_READER, DEFAULT_STUDENT, check_reader

# bad input found before or during a run: one line and exit code 2
INPUT_ERRORS = (ConfigError, ModelLoadError, RecordError, DataError)


def run_script(config_class, argv, doc: str, job: Callable[..., int]) -> int:
    """A script's main: runs `job(cfg, given, dist, started)`; see the module docstring."""
    hf_logging.disable_progress_bar()  # the per-file bars of save/load would break the progress bar's line
    started = time.perf_counter()
    cfg, given = parse_config(config_class, argv, doc)
    try:
        with process_group(cfg.device) as dist:
            rank = f" (rank {dist.rank})" if dist.world > 1 else ""
            try:
                return job(cfg, given, dist, started)
            except INPUT_ERRORS as exc:
                print(f"error{rank}: {exc}", file=sys.stderr)
                return 2
            except NonFiniteLoss as exc:
                print(f"error{rank}: {exc}", file=sys.stderr)
                return 3
            finally:
                release_run_dir(Path(cfg.out_dir) / cfg.name)  # the folder lock setup_run_dir took
    except ConfigError as exc:  # joining the ranks failed
        print(f"error: {exc}", file=sys.stderr)
        return 2


def start(cfg, given: set[str], dist: Dist, folders: tuple[str, ...]):
    """(config, trainer state or None): the run folder checked and locked (runtime.loop.setup_run_dir; --resume
    takes the saved config), then the global seed set."""
    cfg, state = setup_run_dir(cfg, given, folders, dist)
    torch.manual_seed(cfg.seed)
    return cfg, state


class Session:
    """One run's resolved settings and shared machinery; a script's `Run` subclasses it and loads its own data and
    models in its `__init__` (after this one). `tokenizer`, `with_instruction` and `rules` are the subclass's to
    set before it encodes splits or saves models."""

    tokenizer = None
    with_instruction: bool = True
    rules: dict | None = None

    def __init__(self, cfg, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist = dist or Dist()
        self.strategy = resolve_strategy(cfg.parallel, dist.world)
        self.dir = Path(cfg.out_dir) / cfg.name
        self.ckpt = self.dir / "ckpt"
        self.device, self.dtype, self.attention = device_settings(cfg, dist)
        self.data: dict[str, dict] = {}  # split -> fingerprint of the file read (saved with every checkpoint)
        self.say = print if dist.main else lambda *a, **k: None  # rank 0 speaks for the run

    # data ---------------------------------------------------------------------------------------------------

    def ensure_data(self) -> None:
        """Generate the built-in benchmark when it is the data folder and missing (rank 0; the others wait)."""
        if self.cfg.data_dir == BUILTIN_DIR:
            if self.dist.main:
                ensure_builtin(self.cfg.data_dir)
            self.dist.barrier()  # the others read what rank 0 wrote

    def encode(self, split: str, fmt: str, limit: int = 0) -> Encoded:
        """The split's records (the first `limit`; 0 = all) with their prompts in format `fmt`."""
        records = load_split(self.cfg.data_dir, split, self.data)  # its fingerprint is checked on --resume
        records = records[:limit] if limit else records
        enc = encode_prompts(
            records,
            self.tokenizer,
            fmt=fmt,
            with_instruction=self.with_instruction,
            rules=self.rules,
            max_prompt_tokens=self.cfg.max_prompt_tokens,
            long_prompts=self.cfg.long_prompts,
            split=split,
        )
        if not enc.records:
            raise DataError(f"split {split!r}: every prompt is longer than --max-prompt-tokens")
        return enc

    def check_same_data(self, state: dict | None) -> None:
        """On --resume: every split read must be the file the checkpoint was trained on."""
        if state is not None:
            check_same_data(state.get("data"), self.data, str(self.ckpt))

    # models -------------------------------------------------------------------------------------------------

    def load(self, path) -> torch.nn.Module:
        return load_model(
            path,
            device=self.device,
            dtype=self.dtype,
            attention=self.attention,
            trust_remote_code=self.cfg.trust_remote_code,
        )

    def build(self, spec: str, seed: int) -> torch.nn.Module:
        """A fresh model: a preset with random weights (seeded), or the model in a local folder."""
        if is_preset(spec):
            model = build_preset(
                spec, self.tokenizer, seed=seed, max_positions=self.cfg.max_prompt_tokens + self.cfg.max_new_tokens
            )
            return prepare(model, device=self.device, dtype=self.dtype, attention=self.attention)
        return self.load(spec)

    def check_folder(self, spec: str, what: str = "model") -> None:
        """A model spec is a preset or an existing folder."""
        if not is_preset(spec) and not Path(spec).is_dir():
            hint = {
                DEFAULT_READER: " (the shipped reader: run from the repository root, or rebuild it with "
                "`python pretrain.py`)",
                DEFAULT_STUDENT: " (the shipped student reader: run from the repository root, or rebuild it with "
                "`python pretrain.py --preset nano --out models/reader-nano`)",
            }.get(spec, "")
            raise ModelLoadError(f"{spec}: {what} directory not found{hint} (and not a preset: {', '.join(PRESETS)})")

    def check_reader(self, spec: str) -> None:
        """A model folder that is a reader (pretrain.py) was made for this world version and the data's vocabulary
        (after ensure_data: the built-in tokenizer exists by then)."""
        if not is_preset(spec):
            check_reader(spec, self.cfg.data_dir)

    def check_head(self, model, source, what: str = "the LM head") -> None:
        """The model's head covers the tokenizer's vocabulary (a model and tokenizer that do not belong together)."""
        rows = head_weight(model).shape[0]
        if rows < len(self.tokenizer):
            raise ModelLoadError(
                f"{source}: {what} has {rows} rows but the tokenizer has {len(self.tokenizer)} "
                "tokens; they do not belong together"
            )

    def wrap(self, model, trainable: bool = True) -> Sharded:
        return Sharded(model, self.dist, self.strategy, trainable=trainable)

    # checkpoints --------------------------------------------------------------------------------------------

    def prompt(self, fmt: str) -> PromptSettings:
        return PromptSettings(fmt, self.with_instruction, self.rules)

    def save(self, path: Path, models: dict[str, tuple[Sharded, str]], trainer_state: dict | None = None) -> None:
        """A checkpoint folder, atomically: each model (subfolder name -> (model, prompt format); "" = the folder
        itself) in Hugging Face format with its prompt settings, and the trainer state when given. Collective: the
        full weights are gathered, rank 0 writes, the others wait until the folder is complete."""
        full = {name: model.full_state_dict() for name, (model, _) in models.items()}
        if self.dist.main:
            with atomic_folder(path) as tmp:
                for name, (model, fmt) in models.items():
                    write_model(tmp / name if name else tmp, model.module, self.tokenizer, full[name], self.prompt(fmt))
                if trainer_state is not None:
                    torch.save(trainer_state, tmp / STATE_FILE)
        self.dist.barrier()

    def trainer_state(self, state: dict, generator=None, **optimizers) -> dict:
        """The loop's `state` with what an exact resume needs besides: the optimizers' entries, the data
        fingerprints and every rank's random states."""
        return dict(state, **optimizers, data=self.data, **rank_rng_states(self.dist, generator))

    def restore_rng(self, state: dict, generator=None) -> None:
        set_rank_rng_states(state, self.dist, generator)

    # sampling -------------------------------------------------------------------------------------------------

    def sample(self, model: Sharded, prompts: list[list[int]], *, temperature: float, generator=None, group: int = 1):
        """(prompt ids, prompt mask, completion, response mask) of one sample per prompt (a prompt repeated G times
        gives a group; `group` = G reads each such prompt once), at `temperature` with --top-p, up to
        --max-new-tokens; None without prompts. Collective (under FSDP the weights are gathered for it), so every
        rank calls it, with or without prompts."""
        tok = self.tokenizer
        with model.gathered():  # ranks stop sampling at different lengths: no communication inside
            if not prompts:
                return None
            p_ids, p_mask = pad_left(prompts, tok.pad_token_id, self.device)
            completion, response = model(
                generate,
                p_ids,
                p_mask,
                max_new_tokens=self.cfg.max_new_tokens,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                temperature=temperature,
                top_p=self.cfg.top_p,
                vocab_size=len(tok),
                generator=generator,
                group=group,
            )
        return p_ids, p_mask, completion, response

    # evaluation and reporting -------------------------------------------------------------------------------

    def evaluate(self, model: Sharded, enc: Encoded, fmt: str, *, samples: int = 1, progress=None):
        """(metrics, predictions) of one encoded split at --eval-temperature; the ranks share the work."""
        cfg = self.cfg
        return evaluate(
            model,
            self.tokenizer,
            enc,
            samples=samples,
            seed=cfg.seed,
            fmt=fmt,
            temperature=cfg.eval_temperature,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            device=self.device,
            progress=progress,
            dist=self.dist,
        )

    def announce(self, fresh: bool, summary: str) -> None:
        """Rank 0 creates the run folder, saves config.json for a fresh run and prints the config and `summary`."""
        if self.dist.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                write_text_atomic(self.dir / "config.json", to_json(self.cfg))
            print(to_json(self.cfg), end="")
            print(summary, flush=True)
        self.dist.barrier()

    def parallel_summary(self) -> str:
        backend = f" ({self.dist.backend})" if self.dist.world > 1 else ""
        return f"parallel {self.strategy} over {self.dist.world} process(es){backend}"

    def logger(self, keep: Callable[[dict], bool]) -> Logger:
        """metrics.jsonl (rank 0), cut back to the rows the checkpoint covers (`keep`) on a resume."""
        logger = Logger(self.dir, self.cfg.tensorboard, enabled=self.dist.main)
        try:
            logger.resume(keep, self.dist)
        except ConfigError:
            logger.close()
            raise
        return logger

    def halted(self) -> int:
        self.say(f"halted after {self.cfg.halt_after} steps; continue with --resume", flush=True)
        return 0
