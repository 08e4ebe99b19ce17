"""Pieces of a hand-written training loop shared by train.py and distill.py: the run folder and --resume, the
device settings, learning-rate schedule and optimizer, a data order that is a pure function of the step (so
resuming needs no saved iterator), micro-batching, the non-finite loss guard, and the metrics log."""

import fcntl
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from data.schema import write_text_atomic
from grm_kernels import INTERPRET
from model.hf import default_dtype
from runtime.checkpoint import load_trainer_state, recover
from runtime.config import ConfigError, from_dict, to_json
from runtime.parallel import Dist

# flags a resumed run may change: they do not alter what it computes
RESUME_FREE = {"resume", "halt_after", "progress", "name", "out_dir"}
# the run folder's lock file (an OS lock on it is held while a process works in the folder)
LOCK_FILE = ".lock"
_HELD: dict[str, object] = {}  # run folder -> open lock file of this process
# what a run leaves besides its checkpoints: a folder holding one of these has results worth keeping
RESULT_FILES = ("results.json", "report.json")


def lock_run_dir(run_dir: Path) -> None:
    """Take an exclusive OS lock on `run_dir` (created if needed) for this process, or raise ConfigError when another
    process holds it. The lock lives as long as the open lock file: `release_run_dir`, process exit or a crash
    release it, so a killed run never leaves the folder locked."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 (held open on purpose: the lock is the handle)
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot create the run folder or its lock file: {exc.strerror}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"{run_dir} is in use by another running process (it holds {LOCK_FILE}); wait for it to end "
            "or choose another --name"
        ) from None
    _HELD[key] = (handle, run_dir, created)


def release_run_dir(run_dir: Path) -> None:
    """Give up this process's lock on `run_dir` (a no-op when it holds none). A folder this process created and left
    holding nothing but the lock file (an invocation refused before it wrote anything) is removed, still under the
    lock, so a refused run leaves nothing behind."""
    held = _HELD.pop(str(Path(run_dir).resolve()), None)
    if held is None:
        return
    handle, folder, created = held
    try:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()
    except OSError:
        pass  # best effort: an empty run folder left behind is harmless
    finally:
        handle.close()


def setup_run_dir(cfg, given: set[str], folders: tuple[str, ...], dist: Dist | None = None):
    """(config, trainer state or None) for runs/<name>: a fresh run needs an empty folder; --resume takes the saved
    config (flags given explicitly must agree with it) and the state in ckpt/, which must come from the same number
    of ranks; the flags of RESUME_FREE (the folder's name and parent among them) are this command line's. Interrupted
    checkpoint swaps of `folders` are recovered first (by rank 0, while the others wait). `cfg` has the fields of
    RESUME_FREE."""
    dist = dist or Dist()
    run_dir = Path(cfg.out_dir) / cfg.name
    ckpt = run_dir / "ckpt"
    if dist.main:
        lock_run_dir(run_dir)  # before anything in the folder is touched: a second invocation stops here
        for name in folders:
            recover(run_dir / name)
    dist.barrier()
    if not cfg.resume:
        kept = [name for name in folders if (run_dir / name).exists()]
        kept += [f.name for f in sorted(run_dir.glob("eval_*.json"))]
        kept += [name for name in RESULT_FILES if (run_dir / name).exists()]
        if kept:
            raise ConfigError(
                f"{run_dir} already holds a run ({', '.join(kept)}); continue it with --resume or choose another --name"
            )
        stale = (run_dir / "metrics.jsonl").exists()
        dist.barrier()  # every rank has looked before rank 0 removes anything
        if stale and dist.main:
            # interrupted before its first checkpoint: nothing to resume, nothing to lose but the log of those steps
            print(f"{run_dir} holds a run interrupted before its first checkpoint; starting it afresh", flush=True)
            (run_dir / "metrics.jsonl").unlink()
        return cfg, None
    if not (run_dir / "config.json").exists() or not ckpt.exists():
        raise ConfigError(
            f"--resume: no resumable checkpoint in {ckpt} (a run interrupted before its first checkpoint "
            "starts afresh without --resume)"
        )
    saved = from_dict(type(cfg), json.loads((run_dir / "config.json").read_text()), where=str(run_dir / "config.json"))
    differ = sorted(f for f in given - RESUME_FREE if getattr(cfg, f) != getattr(saved, f))
    if differ:
        raise ConfigError(
            f"--resume: {', '.join('--' + f.replace('_', '-') for f in differ)} differ from the saved "
            f"run {run_dir}; a resumed run keeps its settings"
        )
    state = load_trainer_state(ckpt)
    if state.get("world_size", 1) != dist.world:
        raise ConfigError(
            f"--resume: {ckpt} was written by {state.get('world_size', 1)} process(es) and this run has "
            f"{dist.world}; an exact resume needs the same world size (torchrun --nnodes x "
            "--nproc-per-node)"
        )
    # the folder is the one named on this command line, not the saved one: a copied or renamed run folder
    # resumes in place and never writes into the folder it was copied from
    moved = {name: getattr(cfg, name) for name in ("name", "out_dir") if getattr(cfg, name) != getattr(saved, name)}
    if moved and dist.main:  # config.json describes the folder it is in
        write_text_atomic(run_dir / "config.json", to_json(replace(saved, **moved)))
    free = {name: getattr(cfg, name) for name in RESUME_FREE}
    return replace(saved, **free), state


def device_settings(cfg, dist: Dist | None = None) -> tuple[torch.device, torch.dtype, str | None]:
    """(device, dtype, attention implementation or None for the default) from the --device, --dtype, --attention
    flags, checked against the machine, including whether --impl triton can run here. Under torchrun each rank
    takes the GPU of its local rank."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", (dist or Dist()).local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but CUDA is not available")
    if cfg.impl == "triton" and device.type != "cuda" and not INTERPRET:
        raise ConfigError(
            "--impl triton needs a CUDA device (or TRITON_INTERPRET=1 set before the run, to use the "
            "slow CPU interpreter)"
        )
    dtype = {"auto": default_dtype(device), "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    return device, dtype, None if cfg.attention == "auto" else cfg.attention


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss or update: the step is not applied and the last checkpoint stays as it was. The loop adds
    where to restart from (`restart_advice`) before it reaches the user."""


def lr_lambda(total: int, warmup: int, kind: str):
    """Multiplier of the peak LR at optimizer step s: linear warm-up, then constant / linear / cosine to 10%."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return 0.1 + 0.9 * decay

    return f


def make_optimizer(model, lr: float, total: int, warmup: int, *, weight_decay: float, schedule: str):
    """AdamW (betas 0.9 / 0.95) with a LambdaLR schedule from `lr_lambda`."""
    # no weight decay on norms and biases (1-D parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, schedule))
    return opt, sched


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of batch `step` in a stream of per-epoch permutations of range(n): the data position is the step
    alone, so resuming needs no saved iterator."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def micro_slices(B: int, micro: int) -> list[slice]:
    return [slice(lo, min(B, lo + micro)) for lo in range(0, B, micro)]


def shard_check(dist: Dist, **batches: int) -> None:
    """Every rank takes an equal share of each batch: the world size must divide them (flag name -> size)."""
    for flag, size in batches.items():
        if size % dist.world:
            raise ConfigError(
                f"--{flag.replace('_', '-')} {size} is not divisible by the world size {dist.world}: "
                "each rank takes an equal share"
            )


def restart_advice(
    named: str | None, *, init_flag: str = "--init", extra: str = "", checked: bool = True, none_why: str = ""
) -> str:
    """What to do after a non-finite stop. `named`: a checkpoint folder a new run can start from (checked by the
    caller with a forward and backward pass of the failing batch, or `checked=False` when that check could not run),
    or None (`none_why` says why, when it is not that every candidate failed the check). --resume keeps a run's
    settings, so a lower learning rate means a new run (`init_flag`, empty when the script has none; `extra`: flags
    the new run also needs, such as --stages rl)."""
    if not init_flag:
        return (
            "Check the data, or start a new run (another --name) with a lower learning rate (--resume keeps the "
            "run's settings; this script starts its models fresh, so no checkpoint is a starting point)."
        )
    if named is None:
        why = none_why or (
            "no checkpoint of this run passes the check a restart needs (a finite forward and backward pass of "
            "the failing batch)"
        )
        return (
            f"{why}. Check the data, or start a new run (another --name) from the beginning with a lower "
            "learning rate (--resume keeps the run's settings)."
        )
    how = (
        "a forward and backward pass of the failing batch from it is finite"
        if checked
        else "not checked: a second copy of the model for the check did not load or fit"
    )
    return (
        f"restart from {named} ({how}). Check the data, or start a new run from it with {init_flag} {named}{extra} "
        "--name <new name> and a lower learning rate (--resume keeps the run's settings)."
    )


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raise NonFiniteLoss for a NaN / inf loss, before the update is applied."""
    if not bool(torch.isfinite(loss)):  # host sync: once per micro-batch, to stop before a bad update
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at {where}: the update was not applied")


def check_update(params, grad_norm: float | torch.Tensor, where: str, dist: Dist | None = None) -> None:
    """Raise NonFiniteLoss when an optimizer step left a non-finite gradient norm or parameter: a finite loss does not
    make a finite update (a huge learning rate with weight decay sends weights to inf). Call it after each step and
    before anything is saved; one host sync, and every rank stops together (sharded parameters are checked where
    they live and the verdict summed over ranks)."""
    with torch.no_grad():
        # each rank's own shard of an FSDP2 parameter (DTensor); inf / nan anywhere makes the sum non-finite
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        total = torch.stack([p.detach().float().sum() for p in local]).sum()
        norm = float(grad_norm)  # the wrappers' clip_grad_norm returns a number (its host sync is theirs)
        bad = (~torch.isfinite(total)).float() + float(not math.isfinite(norm))
        bad = (dist or Dist()).sum(bad)
    if bool(bad > 0):  # host sync: once per optimizer step
        raise NonFiniteLoss(
            f"non-finite update at {where} (gradient norm {norm:.4g}, or a parameter became inf / "
            "nan): stopped before it reached a checkpoint"
        )


class Logger:
    """metrics.jsonl (one line per step) and optional TensorBoard; on rank 0 only (elsewhere it does nothing)."""

    def __init__(self, run: Path, tensorboard: bool, enabled: bool = True):
        self.path = run / "metrics.jsonl"
        self.tb = None
        self.enabled = enabled
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tb"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only", flush=True)

    def truncate(self, keep: Callable[[dict], bool]) -> None:
        """On resume, drop the lines written after the checkpoint (they will be written again): keep(row) says
        which rows the checkpoint already covers."""
        if not self.enabled or not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines, kept = text.splitlines(), []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) and not text.endswith("\n"):
                    break  # the process was killed while writing this line: it is after the checkpoint anyway
                raise ConfigError(
                    f"{self.path}:{i}: not a JSON line; the log is damaged (restore it or start a new run)"
                ) from None
            try:
                if keep(row):
                    kept.append(line)
            except (KeyError, TypeError, ValueError, AttributeError):  # valid JSON, but not a row this loop wrote
                raise ConfigError(
                    f"{self.path}:{i}: not a row of this run's log ({line[:60]!r}); the log is damaged "
                    "(restore it or start a new run)"
                ) from None
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def resume(self, keep: Callable[[dict], bool], dist: Dist) -> None:
        """`truncate` on rank 0, with its verdict shared: a damaged log is a ConfigError on every rank (collective),
        so that no rank goes on alone into a step that would wait for the others forever."""
        error = ""
        try:
            self.truncate(keep)
        except ConfigError as exc:
            error = str(exc)
        except OSError as exc:  # unreadable, or the rewrite failed (disk full, permissions)
            error = f"{self.path}: cannot rewrite the log for the resume: {exc.strerror or exc}"
        error = next((e for e in dist.gather(error) if e), "")
        if error:
            raise ConfigError(error)

    def close(self) -> None:
        """Flush and close TensorBoard's writer (metrics.jsonl is closed after every line)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(f"{row['stage']}/{key}", value, row["step"])


def scalars(metrics: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v) for k, v in metrics.items()}
