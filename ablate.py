"""Masking-granularity ablation: arms x seeds of train.py runs -> ablation.csv, ablation.md and plots.

    python ablate.py                                    # the `fair` preset, seeds 0-4 (docs/ablation.md)
    python ablate.py --arms outcome,sam --seeds 0,1     # a subset of the preset's arms
    python ablate.py --arms-file my_arms.json --name my-sweep --base "--rl-lr 1e-4"
    python ablate.py --dry-run                          # print the plan (every train.py command line) and stop
    python ablate.py --report-only                      # tables and plots from the runs finished so far
    python ablate.py --preset fair-smol --tune-lr 3e-6,1e-5,3e-5 --gpus 0,1,2,3,4,5,6,7   # the study on GPU nodes
    python ablate.py --preset fair-smol --tune-lr 3e-6,1e-5,3e-5 --smoke                  # ... checked, one step each

An arm is a named pair of train.py flag lists: `warmup` (the warm-up SFT; also passed to the RL run, so `--fmt`
belongs here) and `rl` (the RL stage; null for an arm that is its warm-up alone). An arm of kind `more-sft`
continues SFT from its warm-up for as many optimizer steps as an RL run takes instead (the control "does RL beat
more SFT?"), and `seeds` N limits an arm to the first N seeds. Arms that share warm-up flags
share one warm-up run per seed, so they start RL from the same checkpoint; every RL arm gets the same base flags,
hence the same RL budget. An arms file is JSON: {"name": {"warmup": [...], "rl": [...] or null, "about": "..."}}
(a flag list may also be one string). The flags that place a run (--name, --out-dir, --seed, --stages, --init,
--resume, --halt-after) belong to this script and are refused in arms and in --base.

Runs go to <out_dir>/<name>/runs/<run>/ (train.py's layout), their logs to <out_dir>/<name>/logs/. Sweeps are
resumable: a finished run (results.json and its evaluation files present) is skipped, an interrupted one continues
with train.py --resume, and plan.json remembers every run's command line so a rerun with different settings for
an existing run is refused instead of mixing results. A sweep survives SIGKILL at any moment: the runs hold the
sweep folder's lock (.ablate.lock) with the ablate.py that started them, so a rerun while a run of a killed
ablate.py still works is refused, not started beside it. Up to --jobs runs go in parallel, each limited to
--threads threads; with --gpus, one run per listed GPU (CUDA_VISIBLE_DEVICES). Each run's wall-clock interval is
recorded as it ends (intervals.json), so a sweep done in several sittings reports the time it took.

--tune-lr A,B,...: the protocol's tuning of the shared RL learning rate, on the baseline arm and on validation.
After the warm-ups (and the gate), the baseline arm runs from its first seed's warm-up once per rate, reading no
test split; the rate with the highest validation accuracy at the last step (tune.json) is given to every RL run.
--smoke checks a recipe: the baseline arm's first seed and any tuning, every stage cut to one step on a few
records, in <name>-smoke.

The gate (--gate, on by default): the warm-ups run first, and the runs that start from them only when every
finished warm-up beats the majority label on validation by the margin (gate.json records the verdict). From a
warm-up that answers a near-constant label every arm answers alike, and the sweep could not come out either way;
then the script reports the warm-ups and exits with code 4.

The report compares each arm with --baseline, paired: the same test examples and the same seeds (so the same
warm-up). The interval is a two-level bootstrap: resample seeds, then test examples, and take the mean over the
resampled seeds of (arm - baseline); 95% of the resampled differences fall inside it. With 3 seeds the seed level
is coarse; the per-seed differences are printed beside it.
"""

import csv
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np

from data.schema import write_text_atomic
from runtime.config import ConfigError, check_run_name, parse_config, parse_flags
from runtime.configs import TrainConfig
from runtime.data import BUILTIN_DIR, DataError, ensure_builtin, load_split
from sam.metrics import paired_bootstrap

ROOT = Path(__file__).resolve().parent
PLACEMENT = {"name", "out_dir", "seed", "stages", "init", "resume", "halt_after"}  # flags this script sets
HEADLINE = ("accuracy", "macro_f1", "binary_accuracy", "binary_f1", "malformed_rate", "step_agreement")
# learning-curve panels (metrics.jsonl keys of RL rows); masked_frac counts tokens whose weight is 0, so the soft
# policy's half weights show only in adv_mass_removed, the share of |advantage| x tokens the mask takes away
CURVES = ("val/accuracy", "reward", "pl/masked_frac", "sam/adv_mass_removed")
# per-step RL diagnostics kept in curves.csv and averaged in the report (rollout accuracy and malformed rate are
# sampled at the rollout temperature)
DIAGNOSTICS = (*CURVES, "accuracy", "malformed_rate")
BOOTSTRAP_METRICS = ("accuracy", "macro_f1")
# the verdicts train.py logs at each validation (`val/verdicts`, runtime.evaluate.verdict_string), in order: the 7
# criteria steps against their gold values, then boxes 1 and 2 against the label (what SAM's "box" source judges)
VERDICTS = ("need", "coverage", "category", "keywords", "initial", "calibrated", "final", "box1~label", "box2~label")


ARM_KINDS = ("rl", "more-sft")


@dataclass(frozen=True)
class Arm:
    warmup: tuple[str, ...] = ()  # train.py flags of the warm-up (and of the RL run)
    rl: tuple[str, ...] | None = ()  # train.py flags of the RL stage; None: the arm is its warm-up alone
    about: str = ""
    # rl: an RL stage from the warm-up; more-sft: the control "more SFT instead of RL", SFT continued from the
    # warm-up for as many optimizer steps as an RL run takes (--rl-steps x --mu of the base flags)
    kind: str = "rl"
    seeds: int = 0  # run the first N seeds of --seeds only (0 = all)


# The study on the fair world (issues 23 and 29, protocol and its dated amendments in docs/ablation.md): 5 seeds for
# the arms the conclusions rest on (outcome, sam, random, gold-box), 3 for the others; RL budget and evaluation as
# the amended protocol fixes them (100 RL steps at train.py's default lr and rollouts; validation on 200 records
# every 5 steps for the sample-efficiency curves and the verdict flips; every test record). The correlated-errors
# control is the same preset on another world: --arms outcome,sam,random --base=--data-dir=DIR (a benchmark written
# with --teacher-errors correlated).
FAIR_BASE = ("--rl-steps", "100", "--eval-every", "5", "--val-limit", "200", "--test-limit", "0")
FAIR_ARMS = {
    "sft-label": Arm(("--fmt", "label"), None, "warm-up SFT on the label alone, no reasoning", seeds=3),
    "sft-reasoning": Arm((), None, "warm-up SFT on the teacher's 7-step traces (every RL arm's start)", seeds=3),
    "more-sft": Arm((), (), "SFT continued on the teacher traces, as many steps as RL", kind="more-sft", seeds=3),
    "outcome": Arm((), ("--policy", "none"), "GRPO on the outcome, no masking (OutcomeRL)"),
    "sam": Arm((), ("--policy", "sam"), "GRPO + SAM, the paper's rule on the 3 box segments"),
    "random": Arm((), ("--policy", "random"), "control: SAM's masked fraction, segments drawn at random"),
    "gold-box": Arm((), ("--policy", "sam", "--verdicts", "gold-box"), "oracle: boxes judged by gold values"),
    "sam-noexc": Arm((), ("--policy", "sam", "--no-exception"), "SAM without the exception", seeds=3),
    "sam-soft": Arm((), ("--policy", "soft", "--alpha", "0.5"), "SAM, masked segments keep half", seeds=3),
    "sequence": Arm((), ("--policy", "sequence"), "the whole rollout when SAM masks a segment", seeds=3),
    "token": Arm((), ("--policy", "token", "--segmenter", "box_tokens"), "SAM on the box tokens", seeds=3),
    "steps-gold": Arm(
        (),
        ("--policy", "sam", "--segmenter", "steps", "--verdicts", "gold"),
        "SAM on the 7 steps, each judged against its gold value",
        seeds=3,
    ),
    "generic": Arm(("--fmt", "generic"), ("--policy", "none"), "generic 3-step prompt, outcome GRPO", seeds=3),
}


PRESETS = {
    "fair": (FAIR_BASE, FAIR_ARMS),
    # The same study on GPU nodes with the pretrained SmolLM2-135M-Instruct (docs/ablation.md, "On GPU nodes"): the
    # warm-up docs/LOG.md found to pass the gate on the CPU (150 SFT steps of 8 traces at lr 1e-4, prompts without
    # the instruction), the fair preset's arms, seeds and RL budget. Its RL learning rate is not known: run it with
    # --tune-lr (tuned on the baseline arm, on validation). --base=--model=DIR points at another copy of the model.
    "fair-smol": (
        (
            *FAIR_BASE,
            *("--model", "models/smollm2-135m", "--instruction", "none", "--sft-steps", "150"),
            *("--sft-batch-size", "8", "--sft-lr", "1e-4", "--sft-warmup", "20", "--eval-batch-size", "64"),
        ),
        FAIR_ARMS,
    ),
    # The first full ablation (issue 8). Base flags: train.py's defaults, with an RL budget cut to fit the sweep
    # into about an hour on a 2-core CPU (docs/ablation.md has the measured runtime): 15 RL steps of 16 prompts x 8
    # samples, validation (200 records) every 5 steps for the learning curves, and the first 500 records of each
    # test split.
    "granularity": (
        ("--rl-steps", "15", "--eval-every", "5", "--test-limit", "500"),
        {
            "sft-label": Arm(("--fmt", "label"), None, "warm-up SFT on the label alone, no reasoning"),
            "sft-reasoning": Arm((), None, "warm-up SFT on the 7-step criteria traces (the RL arms' start)"),
            "outcome": Arm((), ("--policy", "none"), "GRPO on the outcome, no masking (OutcomeRL)"),
            "sam": Arm((), ("--policy", "sam"), "GRPO + SAM, the paper's rule on the 3 box segments"),
            "sam-noexc": Arm((), ("--policy", "sam", "--no-exception"), "SAM without the calibration exception"),
            "sam-soft": Arm((), ("--policy", "soft", "--alpha", "0.5"), "SAM, masked segments keep half"),
            "sequence": Arm((), ("--policy", "sequence"), "drop the whole rollout when SAM would mask a segment"),
            "token": Arm((), ("--policy", "token", "--segmenter", "box_tokens"), "SAM on the box tokens alone"),
            "steps-gold": Arm(
                (),
                ("--policy", "sam", "--segmenter", "steps", "--verdicts", "gold"),
                "SAM on the 7 steps, each judged against its gold value",
            ),
            "generic": Arm(
                ("--fmt", "generic"),
                ("--policy", "none"),
                "generic 3-step prompt (one box: nothing for SAM to mask), outcome GRPO",
            ),
        },
    ),
}


@dataclass
class AblateConfig:
    name: str = "ablation"  # sweep name: everything is written under <out_dir>/<name>/
    out_dir: str = "runs"  # parent folder of the sweep
    preset: str = "fair"  # named arms and base flags (fair, granularity), or none (with --arms-file)
    arms_file: str = ""  # JSON file of arms, used instead of the preset's arms
    arms: str = ""  # comma list: run only these arms (default: all)
    seeds: str = "0,1,2,3,4"  # comma list of seeds; each seed has its own warm-up runs
    base: str = ""  # extra train.py flags for every run, after the preset's (later ones win); one flag: --base=--flag
    baseline: str = "outcome"  # arm the others are compared with (paired, bootstrap)
    jobs: int = 2  # runs in parallel (0 = CPU cores / --threads)
    threads: int = 1  # torch threads per run (OMP_NUM_THREADS)
    bootstrap: int = 2000  # bootstrap resamples for the paired intervals
    gate: float = 0.05  # RL arms run only from warm-ups beating the majority label on validation by this (-1 = off)
    tune_lr: str = ""  # comma list of RL learning rates: tune on the baseline arm (first seed, validation) first
    gpus: str = ""  # comma list of GPU ids: one run per GPU at a time (CUDA_VISIBLE_DEVICES), instead of --jobs
    smoke: bool = (
        False  # check the recipe: the baseline arm's first seed (and any tuning), one step each, a few records
    )
    report_only: bool = False  # do not run anything: report the runs finished so far
    dry_run: bool = False  # print the plan and stop
    progress: bool = True  # print a line as each run starts and ends

    def __post_init__(self):
        if self.preset not in (*PRESETS, "none"):
            raise ConfigError(f"--preset must be one of {(*PRESETS, 'none')}, got {self.preset!r}")
        if self.preset == "none" and not self.arms_file:
            raise ConfigError("--preset none needs --arms-file")
        if self.jobs < 0 or self.threads < 1 or self.bootstrap < 100:
            raise ConfigError("need --jobs >= 0, --threads >= 1 and --bootstrap >= 100")
        if not (self.gate == -1 or 0 <= self.gate < 1):
            raise ConfigError(f"--gate must be a margin in [0, 1), or -1 to turn the gate off, got {self.gate}")
        try:
            seeds = self.seed_list
        except ValueError:
            raise ConfigError(f"--seeds must be a comma list of integers, got {self.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds must list distinct integers, got {self.seeds!r}")
        try:
            lrs = [float(x) for x in self.lr_list]
        except ValueError:
            raise ConfigError(f"--tune-lr must be a comma list of learning rates, got {self.tune_lr!r}") from None
        if len(set(lrs)) != len(lrs) or not all(0 < x < 1 for x in lrs):
            raise ConfigError(f"--tune-lr must list distinct learning rates in (0, 1), got {self.tune_lr!r}")
        ids = [g.strip() for g in self.gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids) or (self.gpus.strip() and not ids):
            raise ConfigError(f"--gpus must be a comma list of distinct GPU ids (0,1,...), got {self.gpus!r}")
        check_run_name(self.name)

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]

    @property
    def lr_list(self) -> list[str]:
        return [x.strip() for x in self.tune_lr.split(",") if x.strip()]

    @property
    def gpu_list(self) -> list[str]:
        return [g.strip() for g in self.gpus.split(",") if g.strip()]

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------------------------------------------
# Arms and the plan


def _flags(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of flag strings or one string, got {value!r}")


def load_arms_file(path: str) -> dict[str, Arm]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--arms-file {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--arms-file {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--arms-file {path}: expected a non-empty object {{arm name: {{warmup, rl}}}}")
    arms = {}
    for name, spec in data.items():
        where = f"--arms-file {path}, arm {name!r}"
        if not isinstance(spec, dict) or set(spec) - {"warmup", "rl", "about", "kind", "seeds"}:
            raise ConfigError(f"{where}: expected an object with keys warmup, rl, about, kind, seeds")
        rl, kind, seeds = spec.get("rl", []), spec.get("kind", "rl"), spec.get("seeds", 0)
        if kind not in ARM_KINDS or (kind == "more-sft" and rl is None):
            raise ConfigError(f"{where}: kind must be one of {ARM_KINDS} (more-sft with an rl flag list), got {kind!r}")
        if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 0:
            raise ConfigError(f"{where}: seeds must be an integer >= 0 (0 = every seed), got {seeds!r}")
        arms[name] = Arm(
            _flags(spec.get("warmup", []), where + " warmup"),
            None if rl is None else _flags(rl, where + " rl"),
            str(spec.get("about", "")),
            kind,
            seeds,
        )
    return arms


def select_arms(cfg: AblateConfig) -> tuple[tuple[str, ...], dict[str, Arm]]:
    """(base flags, arms) of the sweep, checked: names are folder-safe, the baseline is among them."""
    base, arms = PRESETS[cfg.preset] if cfg.preset != "none" else ((), {})
    base = tuple(base) + tuple(shlex.split(cfg.base))
    if cfg.arms_file:
        arms = load_arms_file(cfg.arms_file)
    if cfg.arms:
        wanted = [a.strip() for a in cfg.arms.split(",") if a.strip()]
        if not wanted:
            raise ConfigError(f"--arms {cfg.arms!r} names no arm; give a comma list of {', '.join(arms)}")
        unknown = [a for a in wanted if a not in arms]
        if unknown:
            raise ConfigError(f"--arms: unknown arm(s) {unknown}; known: {', '.join(arms)}")
        arms = {a: arms[a] for a in wanted}
    for name in arms:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise ConfigError(f"arm name {name!r}: use letters, digits, '-', '_' and '.' only")
    if cfg.baseline not in arms:
        raise ConfigError(f"--baseline {cfg.baseline!r} is not among the arms ({', '.join(arms)})")
    return base, arms


@dataclass
class Job:
    name: str  # run folder name under <sweep>/runs/
    argv: list[str]  # train.py flags
    stage: str  # the stage whose evaluation this run ends with: sft (a warm-up) or rl
    deps: list[str] = field(default_factory=list)


def _slug(flags: tuple[str, ...]) -> str:
    """A readable folder-safe name for a warm-up's flags."""
    if not flags:
        return "base"
    text = "-".join(f.lstrip("-") for f in flags)
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return text if len(text) <= 40 else f"{text[:31]}-{hashlib.sha1(' '.join(flags).encode()).hexdigest()[:8]}"


def rl_budget(base: tuple[str, ...], arm: Arm, name: str) -> int:
    """Optimizer steps of an RL run (--rl-steps x --mu) under the base and the arm's flags: a more-sft arm's SFT
    steps. Its own fresh optimizer and the same data order restart with it (every example was seen in warm-up)."""
    try:
        cfg, _ = parse_flags(TrainConfig, [*base, *arm.warmup, *arm.rl])
    except ConfigError as exc:
        raise ConfigError(f"arm {name!r}: bad train.py flags: {exc}") from None
    if cfg.rl_steps * cfg.mu < 1:
        raise ConfigError(f"arm {name!r}: more-sft takes an RL run's optimizer steps, and --rl-steps is 0")
    return cfg.rl_steps * cfg.mu


def arm_seeds(cfg: AblateConfig, arm: Arm) -> list[int]:
    return cfg.seed_list[: arm.seeds] if arm.seeds else cfg.seed_list


def plan(
    cfg: AblateConfig, base: tuple[str, ...], arms: dict[str, Arm], rl_extra: tuple[str, ...] = ()
) -> tuple[dict[str, Job], dict]:
    """(jobs by name, {(arm, seed): job name that holds the arm's result}). Warm-ups come first. `rl_extra`: flags
    of every RL run's RL stage (the tuned learning rate), before the arm's own."""
    runs_dir = str(cfg.sweep_dir / "runs")
    warmups, rls, result_of = {}, {}, {}
    for seed in cfg.seed_list:
        for arm_name, arm in arms.items():
            if seed not in arm_seeds(cfg, arm):
                continue
            placement = ["--seed", str(seed), "--out-dir", runs_dir]
            warm = f"warmup-{_slug(arm.warmup)}-s{seed}"
            warmups.setdefault(
                warm, Job(warm, [*base, *arm.warmup, *placement, "--name", warm, "--stages", "sft"], "sft")
            )
            if arm.rl is None:
                result_of[arm_name, seed] = warm
                continue
            name = f"{arm_name}-s{seed}"
            init = str(Path(runs_dir) / warm / "sft")
            if arm.kind == "more-sft":
                stage, extra = "sft", ["--sft-steps", str(rl_budget(base, arm, arm_name))]
            else:
                stage, extra = "rl", []
            flags = [*arm.warmup, *(rl_extra if stage == "rl" else ()), *arm.rl, *extra]
            argv = [*base, *flags, *placement, "--name", name, "--stages", stage, "--init", init]
            rls[name] = Job(name, argv, stage, [warm])
            result_of[arm_name, seed] = name
    # warm-ups that unlock the most RL runs first: the sweep's critical path
    users = {w: sum(w in j.deps for j in rls.values()) for w in warmups}
    order = sorted(warmups, key=lambda w: -users[w])
    return {**{w: warmups[w] for w in order}, **rls}, result_of


def tuning_jobs(cfg: AblateConfig, base: tuple[str, ...], arms: dict[str, Arm]) -> dict[str, Job]:
    """--tune-lr: the baseline arm from its first seed's warm-up, once per learning rate, validation only (no test
    split is read): the protocol's "shared hyper-parameters tuned on the baseline arm, on validation"."""
    if not cfg.lr_list:
        return {}
    arm = arms[cfg.baseline]
    if arm.rl is None or arm.kind != "rl":
        raise ConfigError(f"--tune-lr tunes the baseline arm's RL stage, and {cfg.baseline!r} has none")
    if "--rl-lr" in (*base, *arm.warmup, *arm.rl) or any(f.startswith("--rl-lr=") for f in (*base, *arm.rl)):
        raise ConfigError("--tune-lr chooses --rl-lr; leave --rl-lr out of --base and of the baseline arm")
    seed = arm_seeds(cfg, arm)[0]
    warm = f"warmup-{_slug(arm.warmup)}-s{seed}"
    init = str(cfg.sweep_dir / "runs" / warm / "sft")
    jobs = {}
    for lr in cfg.lr_list:
        name = f"tune-{cfg.baseline}-lr{lr}-s{seed}"
        flags = [*arm.warmup, "--rl-lr", lr, *arm.rl, "--test-splits", ""]
        placement = ["--seed", str(seed), "--out-dir", str(cfg.sweep_dir / "runs"), "--name", name]
        jobs[name] = Job(name, [*base, *flags, *placement, "--stages", "rl", "--init", init], "rl", [warm])
    return jobs


def last_val_accuracy(run_dir: Path, stage: str = "rl") -> float:
    """The validation accuracy a run's stage logged last (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/accuracy"] for r in rows if r["stage"] == stage and "val/accuracy" in r][-1]


def tuned_lr(cfg: AblateConfig, tune: dict[str, Job]) -> str | None:
    """The learning rate chosen by an earlier tuning of this sweep (tune.json), or None before one finished. A
    tuning of another grid is refused: the sweep's RL runs would mix learning rates chosen two ways."""
    path = cfg.sweep_dir / "tune.json"
    if not tune or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        grid, chosen = saved["grid"], saved["chosen"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path}: not a tuning record written by ablate.py; restore it or choose another --name"
        ) from None
    if grid != cfg.lr_list:
        raise ConfigError(f"{path}: this sweep was tuned over --tune-lr {','.join(grid)}; choose another --name")
    return chosen


def choose_lr(cfg: AblateConfig, tune: dict[str, Job], failed=()) -> str | None:
    """The learning rate whose tuning run ends with the highest validation accuracy (the first of the grid on a
    tie), among the runs that finished (a rate whose run failed, e.g. diverged, is out; None when none finished);
    tune.json records every run's figure, the failures and the choice."""
    scores = {
        lr: last_val_accuracy(cfg.sweep_dir / "runs" / name)
        for lr, name in zip(cfg.lr_list, tune)
        if name not in failed
    }
    if not scores:
        return None
    chosen = max(scores, key=lambda lr: scores[lr])
    out = [lr for lr, name in zip(cfg.lr_list, tune) if name in failed]
    record = {"grid": cfg.lr_list, "val_accuracy": scores, "failed": out, "chosen": chosen, "arm": cfg.baseline}
    write_text_atomic(cfg.sweep_dir / "tune.json", json.dumps(record, indent=1) + "\n")
    return chosen


def check_plan(base, arms: dict[str, Arm], jobs: dict[str, Job]) -> str:
    """Every run's flags are valid train.py flags; placement flags are refused. Returns the data folder."""
    for where, flags in [("--base", base)] + [
        (f"arm {a!r}", (*arm.warmup, *(arm.rl or ()))) for a, arm in arms.items()
    ]:
        try:
            _, given = parse_flags(TrainConfig, list(flags))
        except ConfigError as exc:
            raise ConfigError(f"{where}: bad train.py flags {' '.join(flags)!r}: {exc}") from None
        if given & PLACEMENT:
            names = ", ".join("--" + f.replace("_", "-") for f in sorted(given & PLACEMENT))
            raise ConfigError(f"{where}: ablate.py sets the placement flags of each run; leave out {names}")
    data_dirs = set()
    for job in jobs.values():
        try:
            run_cfg, _ = parse_flags(TrainConfig, job.argv)
        except ConfigError as exc:
            raise ConfigError(f"run {job.name}: bad train.py flags: {exc}") from None
        data_dirs.add(run_cfg.data_dir)
    if len(data_dirs) != 1:
        raise ConfigError(
            f"all runs must use one --data-dir (paired comparisons need the same test records); got {sorted(data_dirs)}"
        )
    return data_dirs.pop()


def merge_plan(sweep_dir: Path, jobs: dict[str, Job], pending=()) -> None:
    """Refuse a rerun that would change an existing run's command line; remember the new ones (plan.json).
    `pending`: runs whose command line is not known yet (the RL runs waiting for the tuned rate); one that the plan
    already holds was planned another way (without --tune-lr), and is refused before any tuning run is spent."""
    path = sweep_dir / "plan.json"
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        saved = json.loads(path.read_text()) if path.exists() else {}
    except OSError as exc:  # --out-dir or <out-dir>/<name> is a file, or the folder cannot be made or read
        raise ConfigError(f"{sweep_dir}: cannot create or read the sweep folder: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigError(
            f"{path}: not a JSON plan; the sweep folder is damaged (restore it or choose another --name)"
        ) from None
    if not isinstance(saved, dict) or not all(isinstance(v, list) for v in saved.values()):
        raise ConfigError(f"{path}: not a plan written by ablate.py (a JSON object of run name -> flags)")
    early = [n for n in pending if n in saved]
    if early:
        raise ConfigError(
            f"{sweep_dir}: run {early[0]} (and {len(early) - 1} more) is planned already with {saved[early[0]]!r}, "
            "not at a rate --tune-lr will choose; choose another --name"
        )
    changed = [n for n, job in jobs.items() if n in saved and saved[n] != job.argv]
    if changed:
        n = changed[0]
        was, now = " ".join(saved[n]), " ".join(jobs[n].argv)
        raise ConfigError(
            f"{sweep_dir}: run {n} (and {len(changed) - 1} more) already exists with other flags: "
            f"{was!r} vs now {now!r}; choose another --name"
        )
    saved.update({n: job.argv for n, job in jobs.items()})
    write_text_atomic(path, json.dumps(saved, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Running


LOCK = ".ablate.lock"


def lock_sweep(sweep_dir: Path) -> int:
    """Take the sweep folder's lock for this process and the runs it starts (they inherit it), or raise ConfigError
    when another holds it. A train.py run outlives an ablate.py killed with SIGKILL, and a second ablate.py on the
    same folder would start that run again beside it (or delete its folder): the lock is released only when the last
    process holding it ends. Returns the file descriptor (kept open for the process's life)."""
    path = sweep_dir / LOCK
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # --out-dir or <out-dir>/<name> is a file, or the folder cannot be made
        raise ConfigError(f"{sweep_dir}: cannot create or read the sweep folder: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(
            f"{sweep_dir} is in use: another ablate.py, or a train.py run one started (runs outlive an ablate.py "
            f"killed with SIGKILL), holds {path}; wait for it to end or stop it, then run this again"
        ) from None
    return fd


def finished(run_dir: Path, stage: str) -> bool:
    return all((run_dir / f).exists() for f in ("results.json", f"eval_{stage}.json", f"predictions_{stage}.jsonl"))


def record_time(sweep_dir: Path, name: str, start: float, seconds: float) -> None:
    """As each run ends, its seconds in timings.json (the invocation that ended it) and its [start, end] wall-clock
    interval appended in intervals.json, so a sweep done in several sittings, or killed, keeps what it measured."""
    times_path, spans_path = sweep_dir / "timings.json", sweep_dir / "intervals.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    spans = json.loads(spans_path.read_text()) if spans_path.exists() else {}
    spans.setdefault(name, []).append([round(start, 1), round(start + seconds, 1)])
    write_text_atomic(times_path, json.dumps({**times, name: seconds}, indent=1) + "\n")
    write_text_atomic(spans_path, json.dumps(spans, indent=1) + "\n")


def busy_seconds(spans: list[list[float]]) -> float:
    """The length of the union of [start, end] intervals: the wall time during which some run was working."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _fmt_s(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def execute(
    cfg: AblateConfig, jobs: dict[str, Job], failed_before=(), lock: int | None = None
) -> tuple[list[str], dict[str, float]]:
    """Run the unfinished jobs, dependencies first, up to --jobs at a time. (failed job names, seconds per job).
    `failed_before`: jobs that failed earlier in this invocation; they are not run again (their dependents skip).
    `lock`: the sweep lock's file descriptor (lock_sweep), which every run inherits."""
    runs_dir, logs = cfg.sweep_dir / "runs", cfg.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done = {n for n, j in jobs.items() if finished(runs_dir / n, j.stage)}
    pending = [j for n, j in jobs.items() if n not in done and n not in failed_before]
    free_gpus = list(cfg.gpu_list)  # with --gpus: one run per GPU, the GPU given back when the run ends
    width = len(free_gpus) or cfg.jobs or max(1, (os.cpu_count() or 1) // cfg.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"{len(jobs)} runs: {len(done)} finished before, {len(pending)} to run, {width} at a time", flush=True)
    running, failed, seconds, total = {}, list(failed_before), {}, len(pending)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= width:
                    break
                if any(d in failed for d in job.deps):
                    pending.remove(job)
                    failed.append(job.name)
                    say(f"skip  {job.name}: its warm-up failed", flush=True)
                elif all(d in done for d in job.deps):
                    pending.remove(job)
                    run_dir = runs_dir / job.name
                    argv = list(job.argv)
                    if (run_dir / "ckpt").exists():
                        argv.append("--resume")
                    elif run_dir.exists():  # started but never checkpointed: nothing to keep
                        shutil.rmtree(run_dir)
                    log = open(logs / f"{job.name}.log", "a")
                    cmd = [sys.executable, str(ROOT / "train.py"), *argv, "--no-progress"]
                    gpu = free_gpus.pop(0) if free_gpus else None
                    job_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu)
                    log.write(f"$ {'' if gpu is None else f'CUDA_VISIBLE_DEVICES={gpu} '}{shlex.join(cmd)}\n")
                    log.flush()
                    proc = subprocess.Popen(
                        cmd,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=job_env,
                        cwd=os.getcwd(),
                        pass_fds=() if lock is None else (lock,),
                    )
                    running[job.name] = (proc, log, time.time(), gpu)
                    started = total - len(pending)
                    say(f"start {job.name} ({started}/{total}){' (resumed)' if '--resume' in argv else ''}", flush=True)
            time.sleep(0.2)
            for name, (proc, log, t0, gpu) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if gpu is not None:
                    free_gpus.append(gpu)
                seconds[name] = time.time() - t0
                record_time(cfg.sweep_dir, name, t0, seconds[name])
                if proc.returncode == 0 and finished(runs_dir / name, jobs[name].stage):
                    done.add(name)
                    say(f"done  {name} in {_fmt_s(seconds[name])}", flush=True)
                else:
                    failed.append(name)
                    tail = (logs / f"{name}.log").read_text().strip().splitlines()[-3:]
                    print(
                        f"FAILED {name} (exit {proc.returncode}); {logs / (name + '.log')} ends with:\n  "
                        + "\n  ".join(tail),
                        file=sys.stderr,
                        flush=True,
                    )
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.terminate()
        for proc, log, *_ in running.values():
            proc.wait()
            log.close()
        raise
    return failed, seconds


# --------------------------------------------------------------------------------------------------------------
# The gate: RL arms only from warm-ups that learned something


def majority_rate(data_dir: str, majority_split: str, split: str, limit: int) -> tuple[int, float]:
    """(the most common label of `majority_split`, its rate among the first `limit` records of `split`)."""
    labels = [r.label for r in load_split(data_dir, majority_split)]
    majority = Counter(labels).most_common(1)[0][0]
    records = load_split(data_dir, split)
    records = records[:limit] if limit else records
    return majority, sum(r.label == majority for r in records) / len(records)


def gate_failures(cfg: AblateConfig, jobs: dict[str, Job]) -> list[str]:
    """One line per finished warm-up whose final validation accuracy does not beat the majority label (of the RL
    split, on the same validation records) by --gate. From such a warm-up every RL arm answers what it answers
    (a near-constant label), so the arms cannot differ and the sweep would measure nothing."""
    out = []
    started_from = {d for job in jobs.values() for d in job.deps}
    for job in jobs.values():
        run_dir = cfg.sweep_dir / "runs" / job.name
        if job.name not in started_from or not finished(run_dir, "sft"):
            continue  # a warm-up no run starts from (an arm of its own), or one that failed (its runs skip)
        try:
            run = json.loads((run_dir / "config.json").read_text())
            acc = last_val_accuracy(run_dir, "sft")
            label, base = majority_rate(run["data_dir"], run["rl_split"], run["val_split"], run["val_limit"])
        except (OSError, ValueError, KeyError, IndexError) as exc:  # DataError and RecordError are ValueErrors
            out.append(f"{job.name}: cannot check it ({type(exc).__name__}: {exc})")
            continue
        if acc < base + cfg.gate:
            out.append(
                f"{job.name}: validation accuracy {acc:.3f}, the majority label ({label}) scores {base:.3f}; "
                f"the gate needs {base + cfg.gate:.3f}"
            )
    return out


# --------------------------------------------------------------------------------------------------------------
# Collecting and statistics


def load_predictions(path: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """{split: (ids, gold labels, predicted labels with 99 for malformed)} from a predictions_<stage>.jsonl."""
    by_split = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        ids, gold, pred = by_split.setdefault(row["split"], ([], [], []))
        ids.append(row["id"])
        gold.append(row["label"])
        pred.append(99 if row["predicted"] is None else row["predicted"])
    return {s: (ids, np.array(g), np.array(p)) for s, (ids, g, p) in by_split.items()}


def verdict_flips(rows: list[dict], where: str) -> list[dict]:
    """How the logged verdicts of one run's validation records changed between consecutive validations: per verdict
    (VERDICTS), over the records whose verdict is known at both, how many flipped, how many of those to right and to
    wrong. One dict per (later step, verdict)."""
    evals = sorted((r["step"], r["val/verdicts"]) for r in rows if r.get("val/verdicts"))
    out = []
    for (_, before), (step, after) in zip(evals, evals[1:]):
        if len(before) != len(after):
            raise DataError(f"{where}: validations of {len(before)} and {len(after)} records; flips need the same ones")
        for k, name in enumerate(VERDICTS):
            pairs = [(a[k], b[k]) for a, b in zip(before, after) if len(a) > k and len(b) > k]
            known = [(a, b) for a, b in pairs if a in "01" and b in "01"]
            out.append(
                {
                    "step": step,
                    "verdict": name,
                    "records": len(after),
                    "known": len(known),
                    "flips": sum(a != b for a, b in known),
                    "to_right": sum(a == "0" and b == "1" for a, b in known),
                    "to_wrong": sum(a == "1" and b == "0" for a, b in known),
                }
            )
    return out


@dataclass
class Results:
    rows: list[dict]  # arm, seed, split, metric, value
    curves: list[dict]  # arm, seed, step, metric, value
    preds: dict  # (arm, seed) -> {split: (ids, gold, pred)}
    missing: list[tuple[str, int]]
    flips: list[dict] = field(default_factory=list)  # arm, seed and verdict_flips' fields


def collect(cfg: AblateConfig, arms: dict[str, Arm], result_of: dict, jobs: dict[str, Job]) -> Results:
    runs_dir = cfg.sweep_dir / "runs"
    rows, curves, preds, missing, flips = [], [], {}, [], []
    for arm in arms:
        for seed in arm_seeds(cfg, arms[arm]):
            job = jobs[result_of[arm, seed]]
            run_dir = runs_dir / job.name
            if not finished(run_dir, job.stage):
                missing.append((arm, seed))
                continue
            evals = json.loads((run_dir / f"eval_{job.stage}.json").read_text())
            for split, m in evals.items():
                steps = [a for a in m.get("step_agreement") or [] if a is not None]
                values = {k: m[k] for k in HEADLINE if k in m and k != "step_agreement"}
                if steps:
                    values["step_agreement"] = sum(steps) / len(steps)
                    values.update({f"step_agreement_{i + 1}": a for i, a in enumerate(m["step_agreement"])})
                rows += [
                    {"arm": arm, "seed": seed, "split": split, "metric": k, "value": v}
                    for k, v in values.items()
                    if v is not None
                ]
            preds[arm, seed] = load_predictions(run_dir / f"predictions_{job.stage}.jsonl")
            if job.deps:  # a run from a warm-up: its learning curves and the flips of its validation verdicts
                logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                logged = [r for r in logged if r["stage"] == job.stage]
                for r in logged:
                    curves += [
                        {"arm": arm, "seed": seed, "step": r["step"], "metric": k, "value": r[k]}
                        for k in DIAGNOSTICS
                        if k in r
                    ]
                where = str(run_dir / "metrics.jsonl")
                flips += [{"arm": arm, "seed": seed, **f} for f in verdict_flips(logged, where)]
    return Results(rows, curves, preds, missing, flips)


def summarize(res: Results) -> dict:
    """{(arm, split, metric): values over seeds}."""
    out = {}
    for r in res.rows:
        out.setdefault((r["arm"], r["split"], r["metric"]), []).append(r["value"])
    return out


def comparisons(cfg: AblateConfig, arms, res: Results) -> list[dict]:
    out = []
    for arm in arms:
        if arm == cfg.baseline:
            continue
        seeds = [s for s in cfg.seed_list if (arm, s) in res.preds and (cfg.baseline, s) in res.preds]
        if not seeds:
            continue
        for split in res.preds[arm, seeds[0]]:
            a = [res.preds[arm, s].get(split) for s in seeds]
            b = [res.preds[cfg.baseline, s].get(split) for s in seeds]
            if any(x is None or y is None or x[0] != y[0] for x, y in zip(a, b)):
                raise DataError(
                    f"arm {arm} and baseline {cfg.baseline} were evaluated on different {split} "
                    f"records; a paired comparison needs the same ones"
                )
            for metric in BOOTSTRAP_METRICS:
                cmp = paired_bootstrap([x[1:] for x in a], [y[1:] for y in b], metric, cfg.bootstrap)
                out.append({"arm": arm, "split": split, "metric": metric, "seeds": len(seeds), **cmp})
    return out


# --------------------------------------------------------------------------------------------------------------
# Writing the report


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.array(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if len(a) > 1 else f"{a.mean():.3f}"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(cfg, argv, base, arms, res: Results, cmps, seconds: dict, wall: float | None, jobs=()) -> str:
    summary = summarize(res)
    splits = sorted({r["split"] for r in res.rows})
    lines = [
        f"# Ablation `{cfg.name}`",
        "",
        f"Command: `python ablate.py {shlex.join(argv)}`  ",
        f"Commit: {_commit()}, written {date.today()}  ",
        f"Seeds: {cfg.seed_list}; base train.py flags: `{shlex.join(base) or '(none)'}`  ",
    ]
    tuned = cfg.sweep_dir / "tune.json"
    if tuned.exists():
        t = json.loads(tuned.read_text())
        runs = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in t["val_accuracy"].items())
        lines.append(
            f"RL learning rate tuned on `{t['arm']}` (first seed, validation accuracy at the last step): {runs}; "
            f"every RL arm runs at **{t['chosen']}**  "
        )
    if seconds:
        lines.append(
            f"Runtime this invocation: {_fmt_s(wall or 0)} wall, {len(seconds)} runs, "
            f"{_fmt_s(sum(seconds.values()))} summed over runs, "
            f"{len(cfg.gpu_list) or cfg.jobs or 'auto'}{' GPUs' if cfg.gpu_list else ''} at a time  "
        )
    timings = cfg.sweep_dir / "timings.json"
    recorded = json.loads(timings.read_text()) if timings.exists() else {}
    recorded = [t for n, t in recorded.items() if n in jobs]
    if recorded:
        lines.append(
            f"Recorded run times (timings.json, every invocation): {_fmt_s(sum(recorded))} summed over "
            f"{len(recorded)} runs  "
        )
    spans_path = cfg.sweep_dir / "intervals.json"
    spans = json.loads(spans_path.read_text()) if spans_path.exists() else {}
    spans = [span for n, s in spans.items() if n in jobs for span in s]
    if spans:
        lines.append(
            f"Busy wall time (intervals.json: the union of the runs' wall-clock intervals over every sitting; the "
            f"time a run killed with its ablate.py had run is not counted): {_fmt_s(busy_seconds(spans))}  "
        )
    if res.missing:
        lines.append(f"Missing (not finished): {', '.join(f'{a} seed {s}' for a, s in res.missing)}")
    lines += ["", "| arm | warm-up flags | RL flags | about |", "|---|---|---|---|"]
    for name, arm in arms.items():
        warm = f"`{shlex.join(arm.warmup)}`" if arm.warmup else "(base)"
        rl = "(no RL)" if arm.rl is None else f"`{shlex.join(arm.rl)}`" if arm.rl else "(base)"
        lines.append(f"| {name} | {warm} | {rl} | {arm.about} |")
    for split in splits:
        lines += [
            "",
            f"## {split}: mean ± std over seeds",
            "",
            "| arm | seeds | accuracy | macro-F1 | binary acc | binary F1 | malformed | step agreement |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm in arms:
            n = len(summary.get((arm, split, "accuracy"), []))
            cells = [_mean_std(summary.get((arm, split, m), [])) for m in HEADLINE]
            lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    if cmps:
        lines += [
            "",
            f"## Paired comparison with `{cfg.baseline}`",
            "",
            f"Mean over seeds of (arm - {cfg.baseline}) on the same test records; [95% interval] of a "
            f"{cfg.bootstrap}-resample two-level bootstrap (seeds, then examples); * when the interval excludes "
            "0. Per-seed differences in parentheses.",
            "",
            "| arm | split | metric | difference [95% interval] | per seed |",
            "|---|---|---|---|---|",
        ]
        for c in cmps:
            star = " *" if c["lo"] > 0 or c["hi"] < 0 else ""
            seeds = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
            lines.append(
                f"| {c['arm']} | {c['split']} | {c['metric']} | {c['diff']:+.3f} [{c['lo']:+.3f}, "
                f"{c['hi']:+.3f}]{star} | ({seeds}) |"
            )
    agreement = [(split, arm) for split in splits for arm in arms if (arm, split, "step_agreement_1") in summary]
    if agreement:
        lines += [
            "",
            "## Per-step agreement with the gold values (mean over seeds)",
            "",
            "The share of test records whose step says what the gold trace says, among the records whose step "
            "can be read (a malformed completion or an unreadable claim is left out, so a high malformed rate "
            "flatters it).",
            "",
            "| split | arm | " + " | ".join(f"{i + 1} {VERDICTS[i]}" for i in range(7)) + " |",
            "|---|---|" + "---|" * 7,
        ]
        for split, arm in agreement:
            cells = [summary.get((arm, split, f"step_agreement_{i + 1}"), []) for i in range(7)]
            lines.append(f"| {split} | {arm} | " + " | ".join(f"{np.mean(c):.3f}" if c else "-" for c in cells) + " |")
    val = {}
    for r in res.curves:
        if r["metric"] == "val/accuracy":
            val.setdefault(r["arm"], {}).setdefault(r["step"], []).append(r["value"])
    if val:
        steps = sorted({s for by in val.values() for s in by})
        header = "| arm | " + " | ".join(f"step {s}" for s in steps) + " |"
        lines += [
            "",
            "## Sample efficiency: validation accuracy by RL step (mean over seeds)",
            "",
            header,
            "|---|" + "---|" * len(steps),
        ]
        for arm, by in val.items():
            lines.append(f"| {arm} | " + " | ".join(f"{np.mean(by[s]):.3f}" if s in by else "-" for s in steps) + " |")
        last = last_validation(res)
        if last:
            best = max((a for a in last if arms[a].kind == "rl"), key=lambda a: np.mean(last[a]), default="-")
            lines += [
                "",
                "Validation accuracy at each run's last step, mean ± std over seeds: "
                + "; ".join(f"{a} {_mean_std(v)}" for a, v in last.items())
                + f". Highest of the RL arms: **{best}** (the arm a distillation starts from; oracle arms, which "
                "judge verdicts by gold values, are eligible).",
            ]
    if res.flips:
        lines += flips_tables(res.flips)
    diag = {}
    for r in res.curves:
        if r["step"] > 0 and r["metric"] != "val/accuracy":
            diag.setdefault((r["arm"], r["metric"]), []).append(r["value"])
    if diag:
        keys = [k for k in DIAGNOSTICS if k != "val/accuracy"]
        lines += [
            "",
            "## RL diagnostics: mean over RL steps and seeds",
            "",
            "| arm | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for arm in dict.fromkeys(a for a, _ in diag):
            cells = [f"{np.mean(diag[arm, k]):.3f}" if (arm, k) in diag else "-" for k in keys]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plots: [accuracy.png](accuracy.png) (test accuracy per arm, error bars one std over seeds, dots "
        "single seeds), [efficiency.png](efficiency.png) (validation accuracy by RL step, mean over seeds with "
        "the range of the seeds shaded, the baseline in every panel), [curves.png](curves.png) (validation "
        "accuracy, rollout reward, masked-token fraction and advantage mass removed by RL step, mean over seeds). "
        "Raw numbers: ablation.csv, curves.csv, flips.csv, comparisons.json.",
        "",
    ]
    return "\n".join(lines)


def last_validation(res: Results) -> dict[str, list[float]]:
    """{arm: validation accuracy at the last logged step of each seed's run} for the runs with a learning curve."""
    last = {}
    for r in res.curves:
        if r["metric"] == "val/accuracy":
            key = (r["arm"], r["seed"])
            if r["step"] >= last.get(key, (-1, 0.0))[0]:
                last[key] = (r["step"], r["value"])
    out = {}
    for (arm, _), (_, value) in last.items():
        out.setdefault(arm, []).append(value)
    return out


def flip_summary(flips: list[dict]) -> dict:
    """{(arm, verdict): (flip share, net share)}: flips per known record and interval, pooled over a run's
    intervals, then the mean over seeds; net: (to right - to wrong) summed over the run's intervals per validation
    record, mean over seeds. The net counts only changes between two readable verdicts: a record that goes from
    malformed to right (or right to malformed) is not in it, so it is not the change in agreement."""
    runs = {}
    for f in flips:
        t = runs.setdefault((f["arm"], f["verdict"], f["seed"]), [0, 0, 0, 0])
        t[0] += f["known"]
        t[1] += f["flips"]
        t[2] += f["to_right"] - f["to_wrong"]
        t[3] = max(t[3], f["records"])
    by = {}
    for (arm, verdict, _), (known, n, net, most) in runs.items():
        share = by.setdefault((arm, verdict), ([], []))
        share[0].append(n / known if known else float("nan"))
        share[1].append(net / most if most else float("nan"))
    return {k: (float(np.mean(a)), float(np.mean(b))) for k, (a, b) in by.items()}


def flips_tables(flips: list[dict]) -> list[str]:
    summary = flip_summary(flips)
    arms = list(dict.fromkeys(f["arm"] for f in flips))
    every = sorted({f["step"] for f in flips})
    gap = every[1] - every[0] if len(every) > 1 else every[0] if every else 0
    header = "| arm | " + " | ".join(VERDICTS) + " |"
    lines = [
        "",
        "## Verdict flips during RL",
        "",
        f"How often a validation record's verdict changes between two validations ({gap} RL steps apart): the "
        "share of records whose verdict is known at both that flipped, pooled over the run, mean over seeds (%). "
        "Verdicts 1-7 are the criteria steps against their gold values; the last two are boxes 1 and 2 against "
        "the label (the verdicts SAM masks on). Per interval: flips.csv. Validation is greedy by default; at "
        "--eval-temperature > 0 the flips include sampling noise (and with --eval-samples > 1 the first pass is "
        "logged).",
        "",
        header,
        "|---|" + "---|" * len(VERDICTS),
    ]
    for arm in arms:
        cells = [summary.get((arm, v), (float("nan"),))[0] for v in VERDICTS]
        lines.append(f"| {arm} | " + " | ".join(_pct(c) for c in cells) + " |")
    lines += [
        "",
        "Net flips over the run, (to right - to wrong) per 100 validation records, mean over seeds (changes "
        "between two readable verdicts only, so not the change in agreement):",
        "",
        header,
        "|---|" + "---|" * len(VERDICTS),
    ]
    for arm in arms:
        cells = [summary.get((arm, v), (0, float("nan")))[1] for v in VERDICTS]
        lines.append(f"| {arm} | " + " | ".join(_pct(c, "+") for c in cells) + " |")
    return lines


def _pct(share: float, sign: str = "") -> str:
    """A share as a percentage with one decimal, or '-' where no verdict was known (nan)."""
    return "-" if np.isnan(share) else f"{100 * share:{sign}.1f}"


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def efficiency_plot(plt, path: Path, arms: list[str], baseline: str, res: Results) -> Path:
    """Validation accuracy by RL step, one line per arm (mean over seeds) with the seeds' range shaded; the arms
    three to a panel, each panel with the baseline, so that the bands stay readable."""
    others = [a for a in arms if a != baseline]
    panels = [others[i : i + 3] for i in range(0, len(others), 3)] or [[]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], panels):
        for arm in ([baseline] if baseline in arms else []) + group:
            by_step = {}
            for r in res.curves:
                if r["arm"] == arm and r["metric"] == "val/accuracy":
                    by_step.setdefault(r["step"], []).append(r["value"])
            steps = sorted(by_step)
            mean = [np.mean(by_step[s]) for s in steps]
            (line,) = ax.plot(steps, mean, marker=".", label=f"{arm} ({max(len(v) for v in by_step.values())} seeds)")
            lo, hi = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("RL step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy")
    fig.suptitle("Sample efficiency: mean over seeds, shaded: the seeds' range", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plots(sweep_dir: Path, arms, res: Results, baseline: str = "") -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[plot]')", file=sys.stderr)
        return []
    summary = summarize(res)
    splits = sorted({r["split"] for r in res.rows})
    names = list(arms)
    out = []
    if not splits:
        return out
    fig, axes = plt.subplots(1, len(splits), figsize=(max(6, 0.7 * len(names)) * len(splits) / 1.4, 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        vals = [summary.get((a, split, "accuracy"), []) for a in names]
        means = [np.mean(v) if v else np.nan for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#8fb3d9")
        for i, v in enumerate(vals):
            ax.scatter([i] * len(v), v, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        finite = [x for v in vals for x in v]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05))
        ax.set_title(f"{split} accuracy")
    fig.tight_layout()
    _save_fig(fig, sweep_dir / "accuracy.png")
    plt.close(fig)
    out.append(sweep_dir / "accuracy.png")
    curve_arms = [a for a in names if any(r["arm"] == a and r["metric"] == "val/accuracy" for r in res.curves)]
    if curve_arms:
        out.append(efficiency_plot(plt, sweep_dir / "efficiency.png", curve_arms, baseline, res))
    if res.curves:
        fig, axes = plt.subplots(1, len(CURVES), figsize=(4.5 * len(CURVES), 3.6))
        for ax, key in zip(axes, CURVES):
            for arm in names:
                by_step = {}
                for r in res.curves:
                    if r["arm"] == arm and r["metric"] == key:
                        by_step.setdefault(r["step"], []).append(r["value"])
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(
                        steps,
                        [np.mean(by_step[s]) for s in steps],
                        label=arm,
                        marker="." if key.startswith("val/") else None,
                    )
            ax.set_title(key)
            ax.set_xlabel("RL step")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        _save_fig(fig, sweep_dir / "curves.png")
        plt.close(fig)
        out.append(sweep_dir / "curves.png")
    return out


def report(cfg, argv, base, arms, result_of, jobs, seconds, wall) -> Path:
    res = collect(cfg, arms, result_of, jobs)
    cmps = comparisons(cfg, arms, res)
    d = cfg.sweep_dir
    write_text_atomic(d / "ablation.csv", _csv(res.rows, ["arm", "seed", "split", "metric", "value"]))
    write_text_atomic(d / "curves.csv", _csv(res.curves, ["arm", "seed", "step", "metric", "value"]))
    flip_columns = ["arm", "seed", "step", "verdict", "records", "known", "flips", "to_right", "to_wrong"]
    write_text_atomic(d / "flips.csv", _csv(res.flips, flip_columns))
    write_text_atomic(d / "comparisons.json", json.dumps(cmps, indent=1) + "\n")
    write_text_atomic(d / "ablation.md", markdown(cfg, argv, base, arms, res, cmps, seconds, wall, jobs))
    plots(d, arms, res, cfg.baseline)
    return d / "ablation.md"


# --------------------------------------------------------------------------------------------------------------


# the smoke check of a recipe (--smoke): every stage for one step on a few records
SMOKE = (
    *("--sft-steps", "1", "--sft-batch-size", "2", "--rl-steps", "1", "--prompts-per-step", "2", "--group-size", "2"),
    *("--micro-batch", "2", "--eval-every", "1", "--val-limit", "2", "--test-limit", "2", "--save-every", "1"),
)


def smoke_config(cfg: AblateConfig) -> AblateConfig:
    """--smoke: the baseline arm, the first seed, any tuning, each run cut to SMOKE, no gate, in <name>-smoke."""
    return replace(
        cfg,
        name=f"{cfg.name}-smoke",
        arms=cfg.baseline,
        seeds=str(cfg.seed_list[0]),
        base=f"{cfg.base} {shlex.join(SMOKE)}",
        gate=-1,
        smoke=False,
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, _ = parse_config(AblateConfig, argv, __doc__)
    started = time.perf_counter()
    try:
        if cfg.smoke:
            cfg = smoke_config(cfg)
        base, arms = select_arms(cfg)
        tune = tuning_jobs(cfg, base, arms)
        chosen = tuned_lr(cfg, tune)  # from an earlier invocation, when its tuning finished
        # the RL runs at the tuned rate; before it is known, checked at the grid's first (and shown as TUNED)
        jobs, result_of = plan(cfg, base, arms, ("--rl-lr", chosen or cfg.lr_list[0]) if tune else ())
        data_dir = check_plan(base, arms, {**jobs, **tune})
        if cfg.dry_run:
            if tune and not chosen:
                jobs, _ = plan(cfg, base, arms, ("--rl-lr", "TUNED"))
            for job in [
                *(j for j in jobs.values() if not j.deps),
                *tune.values(),
                *(j for j in jobs.values() if j.deps),
            ]:
                print(f"{job.name}: python train.py {shlex.join(job.argv)}")
            if tune and not chosen:
                print(f"(TUNED: the --tune-lr learning rate whose {cfg.baseline} run validates best)")
            return 0
        if cfg.report_only and not (cfg.sweep_dir / "plan.json").exists():
            raise ConfigError(f"--report-only: no sweep in {cfg.sweep_dir} (no plan.json); run it first")
        if not cfg.report_only:
            if data_dir != BUILTIN_DIR and not Path(data_dir).is_dir():
                raise ConfigError(f"--data-dir {data_dir}: no such folder (python -m data.synthetic --out DIR)")
            lock = lock_sweep(cfg.sweep_dir)  # before the folder is read or written; every path releases it
            try:
                waiting = bool(tune) and not chosen  # RL runs wait for the tuned rate: planned once it is known
                held = {n for n, j in jobs.items() if waiting and j.stage == "rl" and j.deps}
                merge_plan(cfg.sweep_dir, {**{n: j for n, j in jobs.items() if n not in held}, **tune}, held)
                if data_dir == BUILTIN_DIR:
                    ensure_builtin(data_dir)  # once, here: parallel runs must not generate it concurrently
            except BaseException:
                os.close(lock)
                raise
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed, seconds, closed = [], {}, []
    if not cfg.report_only:  # `lock` is held
        try:
            warmups = {n: j for n, j in jobs.items() if not j.deps}
            if cfg.gate >= 0:  # the warm-ups first, then the gate, then the runs from them
                failed, seconds = execute(cfg, warmups, lock=lock)
                closed = gate_failures(cfg, jobs)
                write_text_atomic(cfg.sweep_dir / "gate.json", json.dumps({"margin": cfg.gate, "failed": closed}))
            if tune and not closed and not chosen:  # then the tuning, then the RL runs at the rate it chose
                failed, more_seconds = execute(cfg, {**warmups, **tune}, failed_before=failed, lock=lock)
                seconds.update(more_seconds)
                chosen = choose_lr(cfg, tune, failed)
                if chosen:
                    jobs, result_of = plan(cfg, base, arms, ("--rl-lr", chosen))
                    merge_plan(cfg.sweep_dir, jobs)
                    print(f"tuned: --rl-lr {chosen} (tune.json)", flush=True)
            if not closed and (chosen or not tune):
                failed, more_seconds = execute(cfg, jobs, failed_before=failed, lock=lock)
                seconds.update(more_seconds)
        except KeyboardInterrupt:
            print("interrupted; run the same command again to continue the sweep", file=sys.stderr)
            return 130
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            os.close(lock)
    try:  # (the tuning runs count in the recorded times)
        md = report(cfg, argv, base, arms, result_of, {**jobs, **tune}, seconds, time.perf_counter() - started)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(
        f"wrote {md} (and ablation.csv, curves.csv, comparisons.json, plots) in {_fmt_s(time.perf_counter() - started)}"
    )
    if closed:
        print(
            f"gate: no run from a warm-up was started; {len(closed)} warm-up(s) do not beat the majority label by "
            f"--gate {cfg.gate} (docs/ablation.md, the protocol):\n  " + "\n  ".join(closed),
            file=sys.stderr,
        )
    if failed:
        print(f"error: {len(failed)} run(s) failed or were skipped: {', '.join(failed)}", file=sys.stderr)
        return 1
    if closed:
        return 4
    if tune and not chosen and not cfg.report_only:
        print("error: the tuning did not finish, so no RL run was started", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
