"""Warm-up SFT, then GRPO with Stepwise Advantage Masking (SAM), for a generative relevance model.

    python train.py                                   # the default run: built-in benchmark, `tiny` preset, CPU ok
    python train.py --name sam-steps --segmenter steps --verdicts gold       # an ablation arm
    python train.py --stages rl --init runs/default/sft --name outcome --policy none
    python train.py --model /models/Qwen2.5-0.5B-Instruct --data-dir /data/grm --name qwen \
        --max-prompt-tokens 2048 --max-new-tokens 1024 --prompts-per-step 40 --group-size 8 --rl-lr 1e-6
    python train.py --name default --resume           # continue an interrupted run exactly
    torchrun --nproc-per-node 8 train.py --model DIR ...   # 8 processes: FSDP2 (or --parallel ddp); README
    python train.py --help                            # every option

The default run generates the built-in benchmark into data/builtin when it is missing, trains the `tiny` preset
(about 0.9M parameters, random weights) on the warm-up traces, then runs GRPO+SAM on label-only prompts, evaluates
both stages on test_random and test_longtail, and prints the table. Everything lands in runs/<name>/: config.json,
metrics.jsonl (one JSON line per step), ckpt/ (the latest checkpoint, resumable), sft/ (the warm-up model), best/
(the RL checkpoint with the best validation accuracy), eval_sft.json, eval_rl.json (test metrics per stage),
predictions_sft.jsonl, predictions_rl.jsonl (per test example: gold, predicted label, parse status),
results.json, curves.png.

One RL step (DESIGN.md, "One GRPO step, as data"): P prompts x G samples -> parse, segment, reward, verdicts ->
group advantages -> SAM keep weights -> `policy_loss(token_logprobs(...))` over micro-batches with one
normaliser for the whole rollout batch -> `mu` AdamW steps with gradient clipping. The model's own (B, T, V)
logits are never formed: hidden states and the head weight go to `grm_kernels.token_logprobs`.

Where this departs from the paper or the authors' settings (PAPER.md), and why:
- The reward for a correct label is 1.0 (authors: 2.0). GRPO normalises by the group's std, so the scale cancels.
- The default run is sized for a 2-core CPU in under 10 minutes: a 0.9M-parameter model, 16 prompts x 8 samples
  per step (authors: 40 x 8), a learning rate suited to a small random-initialised model (authors: 1e-6 on 32B),
  and prompts without the instruction text (`--instruction auto`: a model trained from random weights cannot read
  the instruction, which is the same for every record and would be 80% of each prompt). Real models keep it.
- With mu = 1 the old log-probs are the current ones detached (the ratio is exactly 1, as it would be after a
  recomputation, since the kernel is batch-invariant); with mu > 1 they are computed once before the updates.
- Evaluation is greedy on every test record by default, which resolves a few points (the authors validate at
  T=0.6: `--eval-temperature 0.6 --eval-samples K` averages K seeded passes); the RL model tested is the last step
  (`--select best` picks it on validation instead).
- Zero-variance groups stay in the batch with advantage 0 (`--zero-variance drop` leaves them out of the loss).
"""

import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from data.schema import RecordError, write_text_atomic
from eval import PROMPT_FILE, evaluate_split, format_compact, merge_samples
from grm_kernels import policy_loss, policy_loss_normalizer
from grm_kernels.policy_loss import AGG_MODES
from model.hf import (
    PRESETS,
    ModelLoadError,
    build_preset,
    head_weight,
    is_preset,
    load_model,
    load_tokenizer,
    num_parameters,
    prepare,
)
from model.sampling import generate, pad_left, pad_right, response_logprobs
from runtime.checkpoint import rank_rng_states, save_checkpoint, set_rank_rng_states
from runtime.config import ConfigError, check_run_name, parse_config, to_json
from runtime.data import (
    BUILTIN_DIR,
    DataError,
    check_same_data,
    encode_prompts,
    ensure_builtin,
    load_split,
    sft_target,
)
from runtime.loop import (
    Logger,
    NonFiniteLoss,
    batch_indices,
    check_finite,
    check_update,
    device_settings,
    make_optimizer,
    micro_slices,
    release_run_dir,
    scalars,
    setup_run_dir,
    shard_check,
)
from runtime.parallel import STRATEGIES, Dist, Sharded, exit_process, process_group, resolve_strategy
from sam.advantage import METHODS, group_advantages
from sam.mask import POLICIES, keep_weights
from sam.metrics import paired_difference
from sam.prompt import FORMATS, NUM_BOXES, load_rules
from sam.reward import outcome_reward
from sam.segment import SEGMENTERS, num_segments, segment_batch
from sam.verdict import SOURCES, box_verdicts, expand_to_segments, gold_box_verdicts, gold_verdicts

STAGES = ("sft", "rl")


@dataclass
class Config:
    # run
    name: str = "default"  # run name: everything is written under <out_dir>/<name>/
    out_dir: str = "runs"  # parent folder of the runs
    data_dir: str = BUILTIN_DIR  # folder of the JSONL splits (the built-in benchmark is generated there if missing)
    model: str = "tiny"  # preset (tiny, small; random weights) or a local Hugging Face model directory
    init: str = ""  # start from this checkpoint folder instead of --model (e.g. runs/default/sft)
    tokenizer: str = ""  # tokenizer folder (default: <data_dir>/tokenizer for presets, else the model's)
    stages: str = "sft,rl"  # comma list of stages to run, in order: sft, rl
    fmt: str = "criteria"  # reasoning format: criteria (7 steps, 3 boxes), generic (3 steps), label (answer only)
    instruction: str = "auto"  # instruction text in prompts: full, none, auto (init's own, none for presets, else full)
    rules: str = ""  # business rules JSON {name: text} (default: the built-in rules)
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    attention: str = "auto"  # auto (flash_attention_2 if installed on GPU, else sdpa), sdpa, eager
    impl: str = "auto"  # kernels: auto (Triton on CUDA, reference on CPU), triton, ref
    parallel: str = "auto"  # under torchrun: fsdp (FSDP2, sharded), ddp (replicated), auto (fsdp where available)
    seed: int = 0  # seed for model init, data order and sampling (rank r samples with its own stream)
    trust_remote_code: bool = False  # allow custom model code from the model directory
    max_prompt_tokens: int = 512  # longer prompts follow --long-prompts
    long_prompts: str = "error"  # error (stop before training) or skip (leave out and count)
    max_new_tokens: int = 96  # completion budget for sampling (RL and evaluation)
    micro_batch: int = 32  # sequences per forward/backward pass (gradient accumulation over the rest)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    lr_schedule: str = "cosine"  # constant, linear or cosine decay to 10% after warm-up
    # warm-up SFT
    sft_split: str = "sft"  # split with reasoning traces (or gold values to render them from)
    sft_epochs: float = 2.0  # passes over the SFT split
    sft_batch_size: int = 16  # sequences per SFT optimizer step
    sft_lr: float = 3e-3  # peak SFT learning rate
    sft_warmup: int = 20  # SFT warm-up steps
    # GRPO + SAM
    rl_split: str = "rl"  # label-only split for RL prompts
    rl_steps: int = 30  # RL steps (rollout batches)
    prompts_per_step: int = 16  # P: prompts per RL step
    group_size: int = 8  # G: samples per prompt
    mu: int = 1  # inner epochs: optimizer steps per rollout batch
    rl_lr: float = 5e-5  # peak RL learning rate
    rl_warmup: int = 5  # RL warm-up steps
    temperature: float = 1.0  # rollout sampling temperature (log-probs use it too)
    top_p: float = 1.0  # rollout nucleus threshold
    policy: str = "sam"  # masking policy: none, sam, soft, sequence, token, random (control: sam's masked fraction)
    segmenter: str = "boxes"  # segments: boxes (paper), steps, box_tokens (with --policy token), none
    verdicts: str = "box"  # box (each box vs the label, paper), gold-box (box 1/2 vs gold initial/calibrated), gold
    exception: bool = True  # SAM's exception: keep both when calibration fixed a wrong initial score
    alpha: float = 0.5  # weight a masked segment keeps under --policy soft
    adv_method: str = "grpo"  # grpo, drgrpo, rloo
    adv_clamp: float = 3.0  # clamp advantages to [-c, c] (0 = off)
    zero_variance: str = "keep"  # groups with equal rewards: keep (advantage 0) or drop (out of the loss)
    reward_correct: float = 1.0  # reward for a correct final label
    malformed_penalty: float = 0.0  # subtracted from the reward of a malformed completion
    ordinal_reward: bool = False  # partial credit for a near-miss label
    clip_low: float = 0.2  # PPO clip epsilon below 1
    clip_high: float = 0.28  # PPO clip epsilon above 1
    dual_clip: float = 3.0  # dual-clip constant for negative advantages (0 = off)
    kl_coef: float = 0.0  # k3 KL to the frozen RL-start model (0 = off, no reference model)
    agg: str = "seq-mean-token-mean"  # loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum
    # evaluation
    val_split: str = "val"  # validation split
    val_limit: int = 500  # validation records used (0 = all)
    eval_every: int = 10  # evaluate on validation every N RL steps (and at the end of each stage)
    select: str = "last"  # RL model evaluated on the tests: last (the final step) or best (best validation accuracy)
    eval_temperature: float = 0.0  # evaluation sampling temperature (0 = greedy; the authors validate at 0.6)
    eval_samples: int = 1  # with --eval-temperature > 0: samples per record, metrics averaged over them
    eval_batch_size: int = 128  # prompts per evaluation batch
    test_splits: str = "test_random,test_longtail"  # splits evaluated after each stage ("" = none)
    test_limit: int = 0  # test records used per split (0 = all)
    # checkpoints and logging
    save_every: int = 20  # write the resumable checkpoint every N steps (and at the end of each stage)
    resume: bool = False  # continue runs/<name> from its last checkpoint
    halt_after: int = 0  # stop (checkpointed) after N steps in this invocation, as if preempted (0 = never)
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also log to runs/<name>/tb when tensorboard is installed

    def __post_init__(self):
        def need(cond, message):
            if not cond:
                raise ConfigError(message)

        check_run_name(self.name)

        stages = self.stage_list
        need(stages and all(s in STAGES for s in stages), f"--stages: choose from {STAGES}, got {self.stages!r}")
        need(stages == [s for s in STAGES if s in stages], f"--stages: each at most once, in the order {STAGES}")
        need(self.fmt in FORMATS, f"--fmt must be one of {FORMATS}, got {self.fmt!r}")
        need(self.instruction in ("auto", "full", "none"), "--instruction must be auto, full or none")
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        need(self.attention in ("auto", "sdpa", "eager", "flash_attention_2"), "--attention: auto, sdpa, eager or "
             "flash_attention_2")  # fmt: skip
        need(self.impl in ("auto", "triton", "ref"), f"--impl must be auto, triton or ref, got {self.impl!r}")
        need(self.parallel in STRATEGIES, f"--parallel must be one of {STRATEGIES}, got {self.parallel!r}")
        need(self.long_prompts in ("error", "skip"), "--long-prompts must be error or skip")
        need(self.lr_schedule in ("constant", "linear", "cosine"), "--lr-schedule: constant, linear or cosine")
        need(self.policy in POLICIES, f"--policy must be one of {POLICIES}, got {self.policy!r}")
        need(self.segmenter in SEGMENTERS, f"--segmenter must be one of {SEGMENTERS}, got {self.segmenter!r}")
        need(
            (self.policy == "token") == (self.segmenter == "box_tokens"),
            "--policy token and --segmenter box_tokens go together (the token policy masks the box tokens alone)",
        )
        need(self.verdicts in SOURCES, f"--verdicts must be one of {SOURCES}, got {self.verdicts!r}")
        need(self.verdicts == "box" or self.fmt == "criteria", f"--verdicts {self.verdicts} needs --fmt criteria")
        need(self.adv_method in METHODS, f"--adv-method must be one of {METHODS}")
        need(self.zero_variance in ("keep", "drop"), "--zero-variance must be keep or drop")
        need(self.agg in AGG_MODES, f"--agg must be one of {AGG_MODES}, got {self.agg!r}")
        need(self.group_size >= 2, "--group-size must be >= 2 (advantages are relative to the group)")
        for name in ("prompts_per_step", "mu", "micro_batch", "sft_batch_size", "max_new_tokens",
                     "max_prompt_tokens", "eval_batch_size", "save_every", "eval_every"):  # fmt: skip
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        for name in ("rl_steps", "val_limit", "test_limit", "halt_after", "sft_warmup", "rl_warmup"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        need(self.sft_epochs > 0, "--sft-epochs must be > 0")
        need(self.sft_lr > 0 and self.rl_lr > 0, "learning rates must be > 0")
        need(self.temperature > 0, "--temperature must be > 0 (RL samples its rollouts)")
        need(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        need(0 <= self.eval_temperature < float("inf"), "--eval-temperature must be a finite number >= 0")
        need(0 < self.temperature < float("inf"), "--temperature must be a finite number > 0")
        need(self.policy != "random" or (self.fmt == "criteria" and self.segmenter in ("boxes", "steps")),
             "--policy random needs --fmt criteria and --segmenter boxes or steps")  # fmt: skip
        need(self.select in ("last", "best"), f"--select must be last or best, got {self.select!r}")
        need(self.eval_samples >= 1, "--eval-samples must be >= 1")
        need(self.eval_samples == 1 or self.eval_temperature > 0, "--eval-samples > 1 needs --eval-temperature > 0 "
             "(greedy decoding gives the same answer every time)")  # fmt: skip
        need(0 <= self.alpha <= 1, "--alpha must be in [0, 1]")
        need(self.dual_clip == 0 or self.dual_clip > 1, "--dual-clip must be > 1, or 0 to turn it off")
        need(0 <= self.clip_low < 1 and self.clip_high >= 0, "need 0 <= --clip-low < 1 and --clip-high >= 0")
        need(self.kl_coef >= 0 and self.adv_clamp >= 0 and self.malformed_penalty >= 0,
             "--kl-coef, --adv-clamp and --malformed-penalty must be >= 0")  # fmt: skip
        need(self.weight_decay >= 0 and self.grad_clip > 0, "need --weight-decay >= 0 and --grad-clip > 0")

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]


# --------------------------------------------------------------------------------------------------------------
# Small pieces of the loop


def rollout_logprobs(policy: Sharded, sl: slice, grad: bool = False, *, batch, cfg) -> torch.Tensor:
    """Flat (b * T,) log-probs of rows `sl` of a rollout batch (prompt ids, prompt mask, completion, response)."""
    with torch.set_grad_enabled(grad):
        rows = [t[sl] for t in batch[:4]]
        return policy(response_logprobs, *rows, temperature=cfg.temperature, impl=cfg.impl).reshape(-1)


class Rollouts(NamedTuple):
    """One rank's share of a rollout batch: whole groups, prompt-major; everything the update needs."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    completion: torch.Tensor  # (B, T)
    response: torch.Tensor  # (B, T) bool
    adv: torch.Tensor  # (B,) fp32 sequence advantages
    keep: torch.Tensor  # (B, S) SAM keep weights per segment
    step_id: torch.Tensor  # (B, T) segment of each completion token, -1 outside the loss


def rl_update(policy: Sharded, opt, sched, batch: Rollouts, cfg, *, dist: Dist, ref: Sharded | None = None,
              where: str = "rl step", last_ckpt: str = "") -> tuple[float, dict, list[float]]:  # fmt: skip
    """`cfg.mu` optimizer steps on one rollout batch: returns (global loss, policy-loss metrics averaged over
    micro-batches and ranks, grad norms). Each rank holds its share; the normaliser counts the whole batch over
    every rank, and gradients are summed over ranks, so K ranks take the step one process would take on the
    combined batch."""
    B, T = batch.completion.shape
    dev = batch.completion.device
    seq_id = torch.arange(B, device=dev).repeat_interleave(T)  # (B*T,)
    step_flat = batch.step_id.reshape(-1)  # (B*T,)
    norm = policy_loss_normalizer(seq_id, step_flat, batch.keep, agg=cfg.agg)  # per-sequence counts stay local
    norm = norm._replace(pg=dist.sum(norm.pg), kl=dist.sum(norm.kl))  # the batch-wide denominators: every rank
    slices = micro_slices(B, cfg.micro_batch)
    logprobs_of = partial(rollout_logprobs, batch=batch, cfg=cfg)
    old = torch.cat([logprobs_of(policy, sl) for sl in slices]) if cfg.mu > 1 else None
    ref_logp = torch.cat([logprobs_of(ref, sl) for sl in slices]) if ref is not None else None
    loss_sum, metric_sums, grad_norms = torch.zeros((), device=dev), {}, []
    for epoch in range(cfg.mu):
        epoch_loss = torch.zeros((), device=dev)
        for m, sl in enumerate(slices):
            tok_sl = slice(sl.start * T, sl.stop * T)
            with policy.sync_grads(m == len(slices) - 1):
                logp = logprobs_of(policy, sl, grad=True)
                old_sl = old[tok_sl] if old is not None else logp.detach()
                loss, metrics = policy_loss(
                    logp, old_sl, batch.adv, seq_id[tok_sl], step_flat[tok_sl], batch.keep,
                    ref_logp=None if ref_logp is None else ref_logp[tok_sl], clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None, kl_coef=cfg.kl_coef, agg=cfg.agg,
                    normalizer=norm, impl=cfg.impl,
                )  # fmt: skip
                policy.backward(loss)
            epoch_loss = epoch_loss + loss.detach()
            weight = (sl.stop - sl.start) / B / cfg.mu  # metrics: averaged over micro-batches by rollouts
            for k, v in metrics.items():
                metric_sums[k] = max(metric_sums.get(k, 0.0), float(v)) if k == "ratio_max" else (
                    metric_sums.get(k, 0.0) + weight * float(v))  # fmt: skip
        epoch_loss = dist.sum(epoch_loss)  # every rank sees the same value: they stop together
        check_finite(epoch_loss, f"{where} (epoch {epoch})", last_ckpt)
        loss_sum = loss_sum + epoch_loss / cfg.mu
        grad_norms.append(policy.clip_grad_norm(cfg.grad_clip))
        opt.step()
        check_update(policy.module.parameters(), grad_norms[-1], f"{where} (epoch {epoch})", last_ckpt, dist)
        sched.step()
        opt.zero_grad(set_to_none=True)
    return float(loss_sum), dist.mean(metric_sums, maxima=("ratio_max",)), grad_norms


# --------------------------------------------------------------------------------------------------------------
# Run setup: everything checked before training starts


class Run:
    """Resolved settings, data, tokenizer, model and paths of one training run."""

    def __init__(self, cfg: Config, state: dict | None, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist = dist or Dist()
        self.strategy = resolve_strategy(cfg.parallel, dist.world)
        shard_check(dist, prompts_per_step=cfg.prompts_per_step, sft_batch_size=cfg.sft_batch_size)
        self.dir = Path(cfg.out_dir) / cfg.name
        self.ckpt = self.dir / "ckpt"
        self.device, self.dtype, self.attention = device_settings(cfg, dist)
        source = cfg.init or cfg.model
        self.preset = is_preset(source)
        if not self.preset and not Path(source).is_dir():
            raise ModelLoadError(f"{source}: model directory not found (and not a preset: {', '.join(PRESETS)})")
        # a model directory is checked (and loaded) first: a wrong path fails before any data work
        self.model = None if self.preset else self.load(self.ckpt if state is not None else source)
        if cfg.data_dir == BUILTIN_DIR:
            if dist.main:
                ensure_builtin(cfg.data_dir)
            dist.barrier()  # the others read what rank 0 wrote
        tok_dir = cfg.tokenizer or (str(Path(cfg.data_dir) / "tokenizer") if self.preset else source)
        self.tokenizer = load_tokenizer(tok_dir)
        saved = Path(source) / PROMPT_FILE  # a checkpoint of this codebase remembers how it was prompted
        if cfg.instruction == "auto" and saved.exists():
            self.with_instruction = json.loads(saved.read_text())["with_instruction"]
        else:
            self.with_instruction = cfg.instruction == "full" or (cfg.instruction == "auto" and not self.preset)
        self.rules = load_rules(cfg.rules) if cfg.rules else None
        self.data: dict[str, dict] = {}  # split -> fingerprint of the file read (saved with every checkpoint)
        self.load_data()
        if state is not None:
            check_same_data(state.get("data"), self.data, str(self.ckpt))
        if self.model is None:
            self.model = self.load_start_model() if state is None else self.load(self.ckpt)
        if head_weight(self.model).shape[0] < len(self.tokenizer):
            rows = head_weight(self.model).shape[0]
            raise ModelLoadError(f"{source}: the LM head has {rows} rows but the tokenizer has "
                                 f"{len(self.tokenizer)} tokens; they do not belong together")  # fmt: skip
        # every rank built or loaded the same weights; FSDP keeps each rank's shard of them
        self.policy = self.wrap(self.model)

    def wrap(self, model, trainable: bool = True) -> Sharded:
        return Sharded(model, self.dist, self.strategy, trainable=trainable)

    def encode(self, split: str, limit: int = 0):
        records = load_split(self.cfg.data_dir, split, self.data)  # its fingerprint is checked on --resume
        records = records[:limit] if limit else records
        enc = encode_prompts(records, self.tokenizer, fmt=self.cfg.fmt, with_instruction=self.with_instruction,
                             rules=self.rules, max_prompt_tokens=self.cfg.max_prompt_tokens,
                             long_prompts=self.cfg.long_prompts, split=split)  # fmt: skip
        if not enc.records:
            raise DataError(f"split {split!r}: every prompt is longer than --max-prompt-tokens")
        return enc

    def load_data(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        self.sft = self.rl = None
        if "sft" in cfg.stage_list:
            self.sft = self.encode(cfg.sft_split)
            targets = [tok(sft_target(r, cfg.fmt), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                       for r in self.sft.records]  # fmt: skip
            long = sum(len(t) > cfg.max_new_tokens for t in targets)
            if long:
                raise DataError(f"split {cfg.sft_split!r}: {long} warm-up trace(s) are longer than --max-new-tokens "
                                f"{cfg.max_new_tokens}; the model could never finish one when sampling")  # fmt: skip
            self.sft_targets = targets
        if "rl" in cfg.stage_list:
            self.rl = self.encode(cfg.rl_split)
            if len(self.rl.records) < cfg.prompts_per_step:
                raise DataError(f"split {cfg.rl_split!r} has {len(self.rl.records)} prompts, fewer than "
                                f"--prompts-per-step {cfg.prompts_per_step}")  # fmt: skip
        self.val = self.encode(cfg.val_split, cfg.val_limit)
        self.tests = {s.strip(): self.encode(s.strip(), cfg.test_limit) for s in cfg.test_splits.split(",") if
                      s.strip()}  # fmt: skip

    def load(self, path) -> torch.nn.Module:
        return load_model(path, device=self.device, dtype=self.dtype, attention=self.attention,
                          trust_remote_code=self.cfg.trust_remote_code)  # fmt: skip

    def load_start_model(self):
        source = self.cfg.init or self.cfg.model
        if self.preset:
            model = build_preset(source, self.tokenizer, seed=self.cfg.seed,
                                 max_positions=self.cfg.max_prompt_tokens + self.cfg.max_new_tokens)  # fmt: skip
            return prepare(model, device=self.device, dtype=self.dtype, attention=self.attention)
        return self.load(source)

    def rl_start_model(self) -> Sharded:
        """The model RL started from (the frozen KL reference): the warm-up checkpoint or the starting model."""
        model = self.load(self.dir / "sft") if "sft" in self.cfg.stage_list else self.load_start_model()
        return self.wrap(model.eval().requires_grad_(False), trainable=False)

    def save_model(self, path: Path, policy: Sharded | None = None, trainer_state: dict | None = None) -> None:
        """A checkpoint folder with the prompt settings beside it (eval.py and --init read them). Collective: the
        full weights are gathered, rank 0 writes, the others wait until the folder is complete."""
        policy = policy or self.policy
        full = policy.full_state_dict()
        if self.dist.main:
            save_checkpoint(path, policy.module, self.tokenizer, trainer_state, state_dict=full)
            prompt = {"fmt": self.cfg.fmt, "with_instruction": self.with_instruction, "rules": self.rules}
            write_text_atomic(path / PROMPT_FILE, json.dumps(prompt, indent=2) + "\n")
        self.dist.barrier()

    def save_resumable(self, state: dict, opt, sched, generator=None) -> None:
        state = dict(state, optimizer=self.policy.optimizer_state(opt), scheduler=sched.state_dict(), data=self.data,
                     **rank_rng_states(self.dist, generator))  # fmt: skip
        self.save_model(self.ckpt, trainer_state=state)

    def restore(self, state: dict, opt, sched, generator=None) -> None:
        """Optimizer, scheduler and this rank's random states from a resumable checkpoint."""
        self.policy.load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rank_rng_states(state, self.dist, generator)

    def evaluate(self, enc, policy: Sharded | None = None, progress=None, with_predictions=False):
        """Metrics of one encoded split (and its per-example predictions when asked); the ranks share the work.
        With --eval-samples K > 1 every record is answered K times (seeds seed, seed + 1, ...): metrics as
        eval.merge_samples (means over the passes, pass@K) and each prediction carries its sample index."""
        cfg = self.cfg
        runs = []
        for k in range(cfg.eval_samples):
            runs.append(evaluate_split(policy or self.policy, self.tokenizer, enc, fmt=cfg.fmt,
                                       temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.eval_batch_size, seed=cfg.seed + k, device=self.device,
                                       progress=progress, dist=self.dist))  # fmt: skip
        metrics, preds = merge_samples(runs), runs[0][1]
        if len(runs) > 1:
            preds = [dict(p, sample=k) for k, (_, ps) in enumerate(runs) for p in ps]
        return (metrics, preds) if with_predictions else metrics

    def evaluate_tests(self, policy: Sharded, stage: str) -> dict:
        """Evaluate on the test splits; writes predictions_<stage>.jsonl (one line per example, for paired
        comparisons such as ablate.py's bootstrap), then eval_<stage>.json, both atomically. Returns the metrics."""
        results, lines = {}, []
        for split, enc in self.tests.items():
            bar = tqdm(total=len(enc.records), desc=f"eval {stage} {split}", leave=False,
                       disable=not (self.cfg.progress and self.dist.main))  # fmt: skip
            results[split], preds = self.evaluate(enc, policy, progress=bar.update, with_predictions=True)
            bar.close()
            lines += [json.dumps({"split": split, "id": p["id"], "label": p["label"], "predicted": p["predicted"],
                                  "status": p["status"], **({"sample": p["sample"]} if "sample" in p else {})})
                      for p in preds]  # fmt: skip
        if self.dist.main:
            write_text_atomic(self.dir / f"predictions_{stage}.jsonl", "".join(line + "\n" for line in lines))
            write_text_atomic(self.dir / f"eval_{stage}.json", json.dumps(results, indent=2) + "\n")
        self.dist.barrier()
        return results


# --------------------------------------------------------------------------------------------------------------
# Stages


def run_sft(run: Run, state: dict, logger: Logger, budget: list[int]) -> bool:
    """Warm-up SFT (token NLL through token_logprobs). Returns False when halted."""
    cfg, policy, tok, dev, dist = run.cfg, run.policy, run.tokenizer, run.device, run.dist
    n = len(run.sft.records)
    total = math.ceil(cfg.sft_epochs * n / cfg.sft_batch_size)
    opt, sched = make_optimizer(
        policy.module, cfg.sft_lr, total, cfg.sft_warmup, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule
    )
    if state.get("optimizer") is not None:
        run.restore(state, opt, sched)
    policy.train()
    bar = tqdm(total=total, initial=state["step"], desc="sft", disable=not (cfg.progress and dist.main))
    for step in range(state["step"], total):
        if budget[0] == 0:  # halted; the checkpoint of the previous step is on disk
            bar.close()
            return False
        t0 = time.perf_counter()
        idx = dist.shard(batch_indices(n, cfg.sft_batch_size, step, cfg.seed))  # this rank's share
        p_ids, p_mask = pad_left([run.sft.prompts[i] for i in idx], tok.pad_token_id, dev)
        t_ids, t_mask = pad_right([run.sft_targets[i] for i in idx], tok.pad_token_id, dev)
        # normaliser of the whole batch, over every rank: micro-batches and ranks add up to it
        num_tokens = dist.sum(t_mask.sum()).clamp(min=1)
        total_loss = torch.zeros((), device=dev)
        slices = micro_slices(len(idx), cfg.micro_batch)
        for m, sl in enumerate(slices):
            with policy.sync_grads(m == len(slices) - 1):
                logp = policy(response_logprobs, p_ids[sl], p_mask[sl], t_ids[sl], t_mask[sl], impl=cfg.impl)
                loss = -(logp * t_mask[sl]).sum() / num_tokens
                policy.backward(loss)
            total_loss = total_loss + loss.detach()
        total_loss = dist.sum(total_loss)
        check_finite(total_loss, f"sft step {step}", str(run.ckpt))
        total_loss = float(total_loss)
        grad_norm = policy.clip_grad_norm(cfg.grad_clip)
        opt.step()
        check_update(policy.module.parameters(), grad_norm, f"sft step {step}", str(run.ckpt), dist)
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        row = {"stage": "sft", "step": step + 1, "loss": total_loss, "grad_norm": float(grad_norm),
               "lr": sched.get_last_lr()[0], "tokens": int(num_tokens), "step_s": seconds,
               "tokens_per_s": int(num_tokens) / seconds}  # fmt: skip
        state["step"] = step + 1
        if state["step"] == total:
            row.update(scalars(headline(run.evaluate(run.val)), "val/"))
            policy.train()
        logger.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}")
        budget[0] -= 1
        if state["step"] == total or state["step"] % cfg.save_every == 0 or budget[0] == 0:
            run.save_resumable(state, opt, sched)
    bar.close()
    return True


def headline(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "macro_f1", "binary_f1", "malformed_rate")}


def rollout_scores(run: Run, records, completion, response):
    """Parse, segment, reward and judge a rollout batch: host-side string work, once per step."""
    cfg = run.cfg
    step_id, parses, texts = segment_batch(completion, response, run.tokenizer, segmenter=cfg.segmenter, fmt=cfg.fmt)
    labels = torch.tensor([r.label for r in records])
    rewards, comp = outcome_reward(parses, labels, correct=cfg.reward_correct,
                                   malformed_penalty=cfg.malformed_penalty, ordinal=cfg.ordinal_reward)  # fmt: skip
    if cfg.verdicts == "box":
        raw = box_verdicts(parses, labels, NUM_BOXES[cfg.fmt])
    elif cfg.verdicts == "gold-box":
        raw = gold_box_verdicts(parses, [r.gold for r in records], labels, NUM_BOXES[cfg.fmt])
    else:
        raw = gold_verdicts(texts, parses, [r.gold for r in records])
    verdicts = expand_to_segments(raw, cfg.segmenter, cfg.fmt, source=cfg.verdicts)
    return step_id, parses, rewards, comp, verdicts


def run_rl(run: Run, state: dict, logger: Logger, budget: list[int]) -> bool:
    """GRPO + SAM. Returns False when halted."""
    cfg, policy, tok, dev, dist = run.cfg, run.policy, run.tokenizer, run.device, run.dist
    P, G = cfg.prompts_per_step, cfg.group_size
    opt, sched = make_optimizer(policy.module, cfg.rl_lr, cfg.rl_steps * cfg.mu, cfg.rl_warmup,
                                weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule)  # fmt: skip
    # each rank samples from its own stream (rank 0's is the one-process stream)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed + 1 + 1_000_003 * dist.rank)
    if state.get("optimizer") is not None:
        run.restore(state, opt, sched, generator)
    ref = run.rl_start_model() if cfg.kl_coef > 0 else None
    exception_segments = (4, 5) if cfg.segmenter == "steps" else (0, 1)
    S = num_segments(cfg.segmenter, cfg.fmt)
    if budget[0] == 0 and state["step"] < cfg.rl_steps:
        return False
    if state["step"] == 0:
        logger.log({"stage": "rl", "step": 0, **scalars(headline(run.evaluate(run.val)), "val/")})
    bar = tqdm(total=cfg.rl_steps, initial=state["step"], desc="rl", disable=not (cfg.progress and dist.main))
    for step in range(state["step"], cfg.rl_steps):
        if budget[0] == 0:  # halted; the checkpoint of the previous step is on disk
            bar.close()
            return False
        times = {}
        t0 = time.perf_counter()
        # 1. rollouts: G samples for each of this rank's P / K prompts, prompt-major so groups are contiguous
        idx = dist.shard(batch_indices(len(run.rl.records), P, step, cfg.seed))
        records = [run.rl.records[i] for i in idx for _ in range(G)]
        p_ids, p_mask = pad_left([run.rl.prompts[i] for i in idx for _ in range(G)], tok.pad_token_id, dev)
        with policy.gathered():  # ranks stop sampling at different lengths: no communication inside
            completion, response = policy(generate, p_ids, p_mask, max_new_tokens=cfg.max_new_tokens,
                                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                          temperature=cfg.temperature, top_p=cfg.top_p, vocab_size=len(tok),
                                          generator=generator)  # fmt: skip
        policy.train()
        times["generate_s"] = time.perf_counter() - t0
        gen_tokens = int(dist.sum(response.sum()))

        # 2. parse, segment, reward, verdicts, advantages, SAM keep weights (whole groups: no communication)
        t1 = time.perf_counter()
        step_id, parses, rewards, comp, verdicts = rollout_scores(run, records, completion, response)
        adv, valid, adv_stats = group_advantages(rewards, G, method=cfg.adv_method, clamp=cfg.adv_clamp or None,
                                                 zero_variance=cfg.zero_variance)  # fmt: skip
        # tokens per segment of the rollouts in the loss (dropped groups count none), for the weight diagnostics
        seg_tokens = torch.stack([(step_id == s).sum(1) for s in range(S)], dim=1).cpu() * valid[:, None]  # (B, S)
        # the random control's draws: a stream per (seed, step, rank), so a resumed run draws the same masks
        mask_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank + 7)
        keep, sam_diag = keep_weights(verdicts.correct, comp["correct"], comp["well_formed"], policy=cfg.policy,
                                      exception=cfg.exception, alpha=cfg.alpha, known=verdicts.known,
                                      exception_segments=exception_segments, segment_tokens=seg_tokens,
                                      seq_adv=adv, generator=mask_gen, agg=cfg.agg)  # fmt: skip
        step_id = torch.where(valid.to(dev)[:, None], step_id.to(dev), -1)  # dropped groups leave the loss
        batch = Rollouts(p_ids, p_mask, completion, response, adv.to(dev), keep.to(dev), step_id)
        times["score_s"] = time.perf_counter() - t1

        # 3. mu optimizer steps over micro-batches, one normaliser for the whole batch over every rank
        t3 = time.perf_counter()
        loss_sum, metric_sums, grad_norms = rl_update(policy, opt, sched, batch, cfg, dist=dist, ref=ref,
                                                      where=f"rl step {step}", last_ckpt=str(run.ckpt))  # fmt: skip
        times["update_s"] = time.perf_counter() - t3
        times["step_s"] = time.perf_counter() - t0
        solved = comp["correct"].view(-1, G).float().mean(dim=1)  # (P,) share of each group answered right
        rollout = dist.mean({"reward": float(rewards.mean()), "accuracy": float(comp["correct"].float().mean()),
                             "pass_at_group": float((solved > 0).float().mean()),
                             "informative_groups": float(((solved > 0) & (solved < 1)).float().mean()),
                             "malformed_rate": 1 - float(comp["well_formed"].float().mean()),
                             **scalars(sam_diag, "sam/"), **scalars(adv_stats, "adv/")})  # fmt: skip
        B = completion.shape[0] * dist.world

        state["step"] = step + 1
        row = {"stage": "rl", "step": step + 1, "loss": loss_sum, "reward": rollout.pop("reward"),
               "accuracy": rollout.pop("accuracy"), "malformed_rate": rollout.pop("malformed_rate"),
               "response_tokens": gen_tokens / B, "grad_norm": sum(grad_norms) / len(grad_norms),
               "lr": sched.get_last_lr()[0], "generate_tokens_per_s": gen_tokens / times["generate_s"],
               "update_tokens_per_s": gen_tokens * cfg.mu / times["update_s"], **times,
               **scalars(metric_sums, "pl/"), **rollout}  # fmt: skip
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.rl_steps:
            val = headline(run.evaluate(run.val))
            policy.train()
            row.update(scalars(val, "val/"))
            if val["accuracy"] > state["best_val"]:
                state["best_val"], state["best_step"] = val["accuracy"], state["step"]
                run.save_model(run.dir / "best")
        logger.log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", masked=f"{row['pl/masked_frac']:.2f}")
        budget[0] -= 1
        if state["step"] == cfg.rl_steps or state["step"] % cfg.save_every == 0 or budget[0] == 0:
            run.save_resumable(state, opt, sched, generator)
    bar.close()
    return True


# --------------------------------------------------------------------------------------------------------------
# Reports


def plot_curves(run_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    panels = [("sft", "loss", "SFT loss"), ("rl", "reward", "RL reward"), ("rl", "val/accuracy", "RL val accuracy"),
              ("rl", "pl/masked_frac", "RL masked token fraction")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "curves.png"
    tmp = out.with_name("curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def per_example_correct(path: Path) -> dict[str, dict[str, float]]:
    """{split: {record id: fraction of its samples answered correctly}} from a predictions_<stage>.jsonl."""
    hits: dict[str, dict[str, list[int]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        hits.setdefault(row["split"], {}).setdefault(row["id"], []).append(int(row["predicted"] == row["label"]))
    return {split: {i: sum(v) / len(v) for i, v in by_id.items()} for split, by_id in hits.items()}


def paired_rl_vs_sft(run_dir: Path, resamples: int = 2000) -> dict[str, dict]:
    """Accuracy of the RL model minus the warm-up's on the same test records, with a bootstrap 95% interval."""
    files = run_dir / "predictions_rl.jsonl", run_dir / "predictions_sft.jsonl"
    if not all(f.exists() for f in files):
        return {}
    rl, sft = (per_example_correct(f) for f in files)
    out = {}
    for split in rl:
        ids = [i for i in rl[split] if i in sft.get(split, {})]
        if ids:
            out[split] = paired_difference(np.array([rl[split][i] for i in ids]),
                                           np.array([sft[split][i] for i in ids]), resamples)  # fmt: skip
    return out


def report(run: Run, started: float) -> None:
    rows = {}
    for stage, file in (("sft", "eval_sft.json"), ("rl", "eval_rl.json")):
        if (run.dir / file).exists():
            rows[{"sft": "sft warm-up", "rl": "after RL"}[stage]] = json.loads((run.dir / file).read_text())
    if rows:
        print(format_compact(rows))
    paired = paired_rl_vs_sft(run.dir)
    for split, d in paired.items():
        print(f"RL - warm-up on {split}: accuracy {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (paired bootstrap "
              f"95% interval over {d['n']} records; RL alone right on {d['a_better']}, warm-up alone on "
              f"{d['b_better']})")  # fmt: skip
    results = {"tests": rows, "rl_minus_sft": paired, "wall_s_this_invocation": time.perf_counter() - started,
               "parameters": num_parameters(run.model), "config": json.loads(to_json(run.cfg))}  # fmt: skip
    write_text_atomic(run.dir / "results.json", json.dumps(results, indent=2) + "\n")
    png = plot_curves(run.dir)
    print(f"wrote {run.dir}/results.json" + (f" and {png}" if png else ""))


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    hf_logging.disable_progress_bar()  # the per-file bars of save/load would break the progress bar's line
    started = time.perf_counter()
    cfg, given = parse_config(Config, argv, __doc__)
    try:
        with process_group(cfg.device) as dist:
            try:
                return train(cfg, given, dist, started)
            finally:
                release_run_dir(Path(cfg.out_dir) / cfg.name)  # the folder lock setup_run_dir took
    except ConfigError as exc:  # joining the ranks failed; train() reports its own errors
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(cfg: Config, given: set[str], dist: Dist, started: float) -> int:
    try:
        cfg, state = setup_run_dir(cfg, given, ("ckpt", "sft", "best"), dist)
        torch.manual_seed(cfg.seed)
        run = Run(cfg, state, dist)
    except (ConfigError, ModelLoadError, RecordError, DataError) as exc:
        print(f"error{f' (rank {dist.rank})' if dist.world > 1 else ''}: {exc}", file=sys.stderr)
        return 2
    if dist.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            write_text_atomic(run.dir / "config.json", to_json(cfg))
        print(to_json(cfg), end="")
        print(f"device {run.device}, dtype {run.dtype}, model {num_parameters(run.model) / 1e6:.2f}M parameters, "
              f"instruction {'on' if run.with_instruction else 'off'}, parallel {run.strategy} over {dist.world} "
              f"process(es){f' ({dist.backend})' if dist.world > 1 else ''}, run folder {run.dir}",
              flush=True)  # fmt: skip
    dist.barrier()

    stages = cfg.stage_list
    state = state or {"stage": stages[0], "step": 0, "best_val": -1.0, "best_step": -1}
    logger = Logger(run.dir, cfg.tensorboard, enabled=dist.main)
    order, step = STAGES.index(state["stage"]), state["step"]
    try:
        logger.resume(lambda row: (STAGES.index(row["stage"]), row["step"]) <= (order, step), dist)
    except ConfigError as exc:
        print(f"error{f' (rank {dist.rank})' if dist.world > 1 else ''}: {exc}", file=sys.stderr)
        return 2
    budget = [cfg.halt_after or -1]  # steps left in this invocation (-1: unlimited)
    say = print if dist.main else lambda *a, **k: None
    try:
        for stage in stages[stages.index(state["stage"]) :]:
            if state["stage"] != stage:  # a fresh stage: new optimizer, step 0
                state = {"stage": stage, "step": 0, "best_val": -1.0, "best_step": -1}
            if stage == "sft":
                if not run_sft(run, state, logger, budget):
                    say(f"halted after {cfg.halt_after} steps; continue with --resume", flush=True)
                    return 0
                if not (run.dir / "eval_sft.json").exists():
                    run.save_model(run.dir / "sft")
                    run.evaluate_tests(run.policy, "sft")
            else:
                if not run_rl(run, state, logger, budget):
                    say(f"halted after {cfg.halt_after} steps; continue with --resume", flush=True)
                    return 0
                if not (run.dir / "eval_rl.json").exists():
                    best = run.dir / "best"
                    if cfg.select == "best" and best.exists():
                        run.evaluate_tests(run.wrap(run.load(best), trainable=False), "rl")
                        say(f"after RL: testing the best validation checkpoint, RL step {state['best_step']}")
                    else:
                        run.evaluate_tests(run.policy, "rl")
                        say(f"after RL: testing the last step ({cfg.rl_steps}); the best validation accuracy was "
                            f"at RL step {state['best_step']}", flush=True)  # fmt: skip
    except NonFiniteLoss as exc:
        print(f"error{f' (rank {dist.rank})' if dist.world > 1 else ''}: {exc}", file=sys.stderr)
        return 3
    finally:
        logger.close()
    if dist.main:
        report(run, started)
    return 0


if __name__ == "__main__":
    exit_process(main())
