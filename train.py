"""Warm-up SFT, then GRPO with Stepwise Advantage Masking (SAM), for a generative relevance model.

    python train.py                                   # the default run: built-in benchmark, the reader, CPU ok
    python train.py --model tiny --name scratch       # the same from random weights (it does not learn to read)
    python train.py --name sam-steps --segmenter steps --verdicts gold       # an ablation arm
    python train.py --stages rl --init runs/default/sft --name outcome --policy none
    python train.py --model /models/Qwen2.5-0.5B-Instruct --data-dir /data/grm --name qwen \
        --max-prompt-tokens 2048 --max-new-tokens 1024 --prompts-per-step 40 --group-size 8 --rl-lr 1e-6
    python train.py --name default --resume           # continue an interrupted run exactly
    torchrun --nproc-per-node 8 train.py --model DIR ...   # 8 processes: FSDP2 (or --parallel ddp); README
    python train.py --help                            # every option

The default run generates the built-in benchmark into data/builtin when it is missing, trains the shipped reader
(models/reader: the `tiny` preset, about 0.9M parameters, pretrained on the world's text by pretrain.py) on the
warm-up traces, then runs GRPO+SAM on label-only prompts, evaluates
both stages on test_random and test_longtail, and prints the table. Everything lands in runs/<name>/: config.json,
metrics.jsonl (one JSON line per step), ckpt/ (the latest checkpoint, resumable), sft/ (the warm-up model), best/
(the RL checkpoint with the best validation accuracy), eval_sft.json, eval_rl.json (test metrics per stage),
predictions_sft.jsonl, predictions_rl.jsonl (per test example: gold, predicted label, parse status),
results.json, curves.png.

One RL step (DESIGN.md, "One GRPO step, as data"): P prompts x G samples -> parse, segment, reward, verdicts ->
group advantages -> SAM keep weights -> `policy_loss(token_logprobs(...))` over micro-batches with one
normaliser for the whole rollout batch -> `mu` AdamW steps with gradient clipping. The model's own (B, T, V)
logits are never formed: hidden states and the head weight go to `grm_kernels.token_logprobs`. A group's G rows
share one prompt, which sampling and the update read once (its keys and values serve the G completions).

Where this departs from the paper or the authors' settings (PAPER.md), and why:
- The reward for a correct label is 1.0 (authors: 2.0). GRPO normalises by the group's std, so the scale cancels.
- The default run is sized for a 2-core CPU in under 10 minutes: a 0.9M-parameter model pretrained here on the
  world's text (the paper starts from a pretrained LLM), 16 prompts x 8 samples per step (authors: 40 x 8), a
  learning rate suited to a small model (authors: 1e-6 on 32B), and prompts without the instruction text
  (`--instruction auto` takes the reader's prompt.json: a model this small cannot read the instruction, which is the
  same for every record and would be 80% of each prompt). Real models keep it.
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
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from data.schema import write_text_atomic
from grm_kernels import policy_loss, policy_loss_normalizer
from model.hf import ModelLoadError, is_preset, load_tokenizer, num_parameters
from model.sampling import pad_left, pad_right, response_logprobs
from runtime.checkpoint import read_prompt_settings
from runtime.config import to_json
from runtime.configs import STAGES, TrainConfig
from runtime.data import DataError, sft_target
from runtime.evaluate import format_compact
from runtime.loop import (
    Logger,
    NonFiniteLoss,
    batch_indices,
    check_finite,
    check_update,
    make_optimizer,
    micro_slices,
    restart_advice,
    scalars,
    shard_check,
)
from runtime.parallel import Dist, Sharded, exit_process
from runtime.session import Session, run_script, start
from sam.metrics import paired_difference
from sam.prompt import load_rules
from sam.rollout import ScoringRules, score_rollouts

FOLDERS = ("ckpt", "sft", "best")  # checkpoint folders of a run (recovered after an interrupted swap)


# --------------------------------------------------------------------------------------------------------------
# Small pieces of the loop


def rollout_logprobs(model: Sharded, sl: slice, grad: bool = False, *, batch, cfg) -> torch.Tensor:
    """Flat (b * T,) log-probs of rows `sl` of a rollout batch (prompt ids, prompt mask, completion, response).
    Where `sl` holds whole groups, each prompt runs once for its G completions (`response_hidden`'s `group`)."""
    G = cfg.group_size
    group = G if sl.start % G == 0 and (sl.stop - sl.start) % G == 0 else 1
    with torch.set_grad_enabled(grad):
        rows = [t[sl] for t in batch[:4]]
        return model(response_logprobs, *rows, temperature=cfg.temperature, impl=cfg.impl, group=group).reshape(-1)


class Rollouts(NamedTuple):
    """One rank's share of a rollout batch: whole groups, prompt-major; everything the update needs."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    completion: torch.Tensor  # (B, T)
    response: torch.Tensor  # (B, T) bool
    adv: torch.Tensor  # (B,) fp32 sequence advantages
    keep: torch.Tensor  # (B, S) SAM keep weights per segment
    step_id: torch.Tensor  # (B, T) segment of each completion token, -1 outside the loss


def rl_update(
    model: Sharded,
    opt,
    sched,
    batch: Rollouts,
    cfg,
    *,
    dist: Dist,
    ref: Sharded | None = None,
    where: str = "rl step",
) -> tuple[float, dict, list[float]]:
    """`cfg.mu` optimizer steps on one rollout batch: returns (global loss, model-loss metrics averaged over
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
    old = torch.cat([logprobs_of(model, sl) for sl in slices]) if cfg.mu > 1 else None
    ref_logp = torch.cat([logprobs_of(ref, sl) for sl in slices]) if ref is not None else None
    loss_sum, metric_sums, grad_norms = torch.zeros((), device=dev), {}, []
    for epoch in range(cfg.mu):
        epoch_loss = torch.zeros((), device=dev)
        for m, sl in enumerate(slices):
            tok_sl = slice(sl.start * T, sl.stop * T)
            with model.sync_grads(m == len(slices) - 1):
                logp = logprobs_of(model, sl, grad=True)
                old_sl = old[tok_sl] if old is not None else logp.detach()
                loss, metrics = policy_loss(
                    logp,
                    old_sl,
                    batch.adv,
                    seq_id[tok_sl],
                    step_flat[tok_sl],
                    batch.keep,
                    ref_logp=None if ref_logp is None else ref_logp[tok_sl],
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip or None,
                    kl_coef=cfg.kl_coef,
                    agg=cfg.agg,
                    normalizer=norm,
                    impl=cfg.impl,
                )
                model.backward(loss)
            epoch_loss = epoch_loss + loss.detach()
            weight = (sl.stop - sl.start) / B / cfg.mu  # metrics: averaged over micro-batches by rollouts
            for k, v in metrics.items():  # on the device, in fp64 (as Python floats): no host sync here
                v, zero = v.detach().double(), torch.zeros((), dtype=torch.float64, device=dev)
                sofar = metric_sums.get(k, zero)
                metric_sums[k] = torch.maximum(sofar, v) if k == "ratio_max" else sofar + weight * v
        epoch_loss = dist.sum(epoch_loss)  # every rank sees the same value: they stop together
        check_finite(epoch_loss, f"{where} (epoch {epoch})")
        loss_sum = loss_sum + epoch_loss / cfg.mu
        grad_norms.append(model.clip_grad_norm(cfg.grad_clip))
        opt.step()
        check_update(model.module.parameters(), grad_norms[-1], f"{where} (epoch {epoch})", dist)
        sched.step()
        opt.zero_grad(set_to_none=True)
    metric_sums = dict(zip(metric_sums, torch.stack(list(metric_sums.values())).tolist()))  # one host sync
    return float(loss_sum), dist.mean(metric_sums, maxima=("ratio_max",)), grad_norms


# --------------------------------------------------------------------------------------------------------------
# Run setup: everything checked before training starts


class Run(Session):
    """Resolved settings, data, tokenizer and model of one training run (runtime.session.Session: the rest)."""

    def __init__(self, cfg: TrainConfig, state: dict | None, dist: Dist | None = None):
        super().__init__(cfg, dist)
        shard_check(self.dist, prompts_per_step=cfg.prompts_per_step, sft_batch_size=cfg.sft_batch_size)
        source = cfg.init or cfg.model
        self.preset = is_preset(source)
        self.check_folder(source)
        # a model directory is checked (and loaded) first: a wrong path fails before any data work
        module = None if self.preset else self.load(self.ckpt if state is not None else source)
        self.ensure_data()
        self.check_reader(source)
        tok_dir = cfg.tokenizer or (str(Path(cfg.data_dir) / "tokenizer") if self.preset else source)
        self.tokenizer = load_tokenizer(tok_dir)
        # a checkpoint of this codebase remembers how it was prompted
        saved = read_prompt_settings(source) if cfg.instruction == "auto" and not self.preset else None
        if saved is not None:
            self.with_instruction = saved.with_instruction
        else:
            self.with_instruction = cfg.instruction == "full" or (cfg.instruction == "auto" and not self.preset)
        self.rules = load_rules(cfg.rules) if cfg.rules else None
        self.load_data()
        self.check_same_data(state)
        if module is None:
            module = self.start_model() if state is None else self.load(self.ckpt)
        self.check_head(module, source)
        # every rank built or loaded the same weights; FSDP keeps each rank's shard of them
        self.model = self.wrap(module)
        self.scoring = ScoringRules.of(cfg)  # how rollouts are scored (sam/rollout.py)
        self.sft_val = None  # the validation at the warm-up's last step, when this process ran it

    def load_data(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        self.sft = self.rl = None
        if "sft" in cfg.stage_list:
            self.sft = self.encode(cfg.sft_split, cfg.fmt)
            targets = [
                tok(sft_target(r, cfg.fmt), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for r in self.sft.records
            ]
            long = sum(len(t) > cfg.max_new_tokens for t in targets)
            if long:
                raise DataError(
                    f"split {cfg.sft_split!r}: {long} warm-up trace(s) are longer than --max-new-tokens "
                    f"{cfg.max_new_tokens}; the model could never finish one when sampling"
                )
            self.sft_targets = targets
        if "rl" in cfg.stage_list:
            self.rl = self.encode(cfg.rl_split, cfg.fmt)
            if len(self.rl.records) < cfg.prompts_per_step:
                raise DataError(
                    f"split {cfg.rl_split!r} has {len(self.rl.records)} prompts, fewer than "
                    f"--prompts-per-step {cfg.prompts_per_step}"
                )
        self.val = self.encode(cfg.val_split, cfg.fmt, cfg.val_limit)
        self.tests = {s: self.encode(s, cfg.fmt, cfg.test_limit) for s in cfg.test_list}

    def start_model(self) -> torch.nn.Module:
        return self.build(self.cfg.init or self.cfg.model, seed=self.cfg.seed)

    def rl_start_model(self) -> Sharded:
        """The model RL started from (the frozen KL reference): the warm-up checkpoint or the starting model."""
        model = self.load(self.dir / "sft") if "sft" in self.cfg.stage_list else self.start_model()
        return self.wrap(model.eval().requires_grad_(False), trainable=False)

    def non_finite(self, exc: NonFiniteLoss, stage: str, batch: tuple) -> NonFiniteLoss:
        """`exc` with where to restart from: the run's last checkpoint, else the model the stage started from, the
        first of them from which a forward and backward pass of the failing step's sequences (`batch`: prompt ids,
        prompt mask, targets, target mask) is finite on every rank. The last checkpoint can hold weights that are
        finite but already diverging (the very ones the failing step started from), and then a new run from it
        would stop at once. A candidate the check cannot run on (a second copy of the model does not fit) is named
        as unchecked rather than passed over."""
        cfg = self.cfg
        start = str(self.dir / "sft") if stage == "rl" and "sft" in cfg.stage_list else (cfg.init or cfg.model)
        temperature = cfg.temperature if stage == "rl" else 1.0
        folders = [f for f in dict.fromkeys([str(self.ckpt), start]) if (Path(f) / "config.json").exists()]
        named, checked = None, True
        for folder in folders:
            verdict = self.passes_finite(folder, batch, temperature)
            if verdict is not False:
                named, checked = folder, verdict is True
                break
        remaining = cfg.stage_list[cfg.stage_list.index(stage) :]
        extra = "" if remaining == list(STAGES) else f" --stages {','.join(remaining)}"
        why = "no checkpoint had been written yet and the run started from a preset" if not folders else ""
        return NonFiniteLoss(f"{exc}; {restart_advice(named, extra=extra, checked=checked, none_why=why)}")

    def passes_finite(self, folder: str, batch: tuple, temperature: float) -> bool | None:
        """Whether the model in `folder` gives a finite loss and finite gradients on `batch` on every rank (a plain
        copy on this rank's device, in micro-batches: the training model is left alone); None when the check
        could not run on some rank (the copy did not load or fit). Every rank reaches the one all-reduce."""
        verdict = torch.zeros(2, device=self.device)  # [not finite, could not check], allocated before the copy
        model = None
        try:
            self.model.module.zero_grad(set_to_none=True)  # the failed step's gradients: memory for the copy
            model = self.load(folder).train()
            finite = True
            for sl in micro_slices(batch[0].shape[0], self.cfg.micro_batch):
                rows = [t[sl] for t in batch]
                logp = response_logprobs(model, *rows, temperature=temperature, impl=self.cfg.impl)
                loss = -(logp * rows[3]).sum()
                loss.backward()
                finite = finite and bool(torch.isfinite(loss))
                del logp, loss
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = finite and all(bool(torch.isfinite(g).all()) for g in grads)
            verdict[0] = 0.0 if finite else 1.0
        except (ModelLoadError, RuntimeError, ValueError):  # does not load, or out of memory
            verdict[1] = 1.0
        finally:
            del model
        verdict = self.dist.sum(verdict)
        return None if bool(verdict[1] > 0) else not bool(verdict[0] > 0)

    def save_model(self, path: Path, model: Sharded | None = None, trainer_state: dict | None = None) -> None:
        """A checkpoint folder with the prompt settings beside the model (eval.py and --init read them)."""
        self.save(path, {"": (model or self.model, self.cfg.fmt)}, trainer_state)

    def save_resumable(self, state: dict, opt, sched, generator=None) -> None:
        optimizer = self.model.optimizer_state(opt)
        self.save_model(
            self.ckpt,
            trainer_state=self.trainer_state(state, generator, optimizer=optimizer, scheduler=sched.state_dict()),
        )

    def restore(self, state: dict, opt, sched, generator=None) -> None:
        """Optimizer, scheduler and this rank's random states from a resumable checkpoint."""
        self.model.load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.restore_rng(state, generator)

    def validate(self) -> dict:
        """The metrics.jsonl fields of a validation of the current model: the headline metrics (`val/accuracy`,
        ...) and, in the criteria format, `val/verdicts`, each record's step verdicts in
        runtime.evaluate.verdict_string's 9 characters (a sweep counts how often a verdict flips between two
        validations; ablate.py's report)."""
        metrics, preds = self.evaluate(self.model, self.val, self.cfg.fmt, samples=self.cfg.eval_samples)
        row = scalars(headline(metrics), "val/")
        if any(p["verdicts"] for p in preds):
            row["val/verdicts"] = [p["verdicts"] or "" for p in preds[: len(self.val.records)]]
        return row

    def evaluate_tests(self, model: Sharded, stage: str) -> dict:
        """Evaluate on the test splits; writes predictions_<stage>.jsonl (one line per example, for paired
        comparisons such as ablate.py's bootstrap), then eval_<stage>.json, both atomically. Returns the metrics."""
        results, lines = {}, []
        for split, enc in self.tests.items():
            bar = tqdm(
                total=len(enc.records),
                desc=f"eval {stage} {split}",
                leave=False,
                disable=not (self.cfg.progress and self.dist.main),
            )
            results[split], preds = self.evaluate(
                model, enc, self.cfg.fmt, samples=self.cfg.eval_samples, progress=bar.update
            )
            bar.close()
            lines += [
                json.dumps(
                    {
                        "split": split,
                        "id": p["id"],
                        "label": p["label"],
                        "predicted": p["predicted"],
                        "status": p["status"],
                        **({"sample": p["sample"]} if "sample" in p else {}),
                    }
                )
                for p in preds
            ]
        if self.dist.main:
            write_text_atomic(self.dir / f"predictions_{stage}.jsonl", "".join(line + "\n" for line in lines))
            write_text_atomic(self.dir / f"eval_{stage}.json", json.dumps(results, indent=2) + "\n")
        self.dist.barrier()
        return results


# --------------------------------------------------------------------------------------------------------------
# Stages


def run_sft(run: Run, state: dict, logger: Logger, budget: list[int]) -> bool:
    """Warm-up SFT (token NLL through token_logprobs). Returns False when halted."""
    cfg, model, tok, dev, dist = run.cfg, run.model, run.tokenizer, run.device, run.dist
    n = len(run.sft.records)
    total = cfg.sft_steps or math.ceil(cfg.sft_epochs * n / cfg.sft_batch_size)
    opt, sched = make_optimizer(
        model.module, cfg.sft_lr, total, cfg.sft_warmup, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule
    )
    if state.get("optimizer") is not None:
        run.restore(state, opt, sched)
    model.train()
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
        try:
            for m, sl in enumerate(slices):
                with model.sync_grads(m == len(slices) - 1):
                    logp = model(response_logprobs, p_ids[sl], p_mask[sl], t_ids[sl], t_mask[sl], impl=cfg.impl)
                    loss = -(logp * t_mask[sl]).sum() / num_tokens
                    model.backward(loss)
                total_loss = total_loss + loss.detach()
            total_loss = dist.sum(total_loss)
            check_finite(total_loss, f"sft step {step}")
            total_loss = float(total_loss)
            grad_norm = model.clip_grad_norm(cfg.grad_clip)
            opt.step()
            check_update(model.module.parameters(), grad_norm, f"sft step {step}", dist)
        except NonFiniteLoss as exc:
            raise run.non_finite(exc, "sft", (p_ids, p_mask, t_ids, t_mask)) from None
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        row = {
            "stage": "sft",
            "step": step + 1,
            "loss": total_loss,
            "grad_norm": float(grad_norm),
            "lr": sched.get_last_lr()[0],
            "tokens": int(num_tokens),
            "step_s": seconds,
            "tokens_per_s": int(num_tokens) / seconds,
        }
        state["step"] = step + 1
        if state["step"] == total:
            run.sft_val = run.validate()  # RL's step 0 starts from these weights: its validation is this one
            row.update(run.sft_val)
            model.train()
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


def run_rl(run: Run, state: dict, logger: Logger, budget: list[int]) -> bool:
    """GRPO + SAM. Returns False when halted."""
    cfg, model, tok, dev, dist = run.cfg, run.model, run.tokenizer, run.device, run.dist
    P, G = cfg.prompts_per_step, cfg.group_size
    opt, sched = make_optimizer(
        model.module,
        cfg.rl_lr,
        cfg.rl_steps * cfg.mu,
        cfg.rl_warmup,
        weight_decay=cfg.weight_decay,
        schedule=cfg.lr_schedule,
    )
    # each rank samples from its own stream (rank 0's is the one-process stream)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed + 1 + 1_000_003 * dist.rank)
    if state.get("optimizer") is not None:
        run.restore(state, opt, sched, generator)
    ref = run.rl_start_model() if cfg.kl_coef > 0 else None
    if budget[0] == 0 and state["step"] < cfg.rl_steps:
        return False
    if state["step"] == 0:
        # greedy (or seeded) validation of unchanged weights gives the same numbers: the warm-up's own validation,
        # when this process just ran it, is reused, not repeated
        val = run.sft_val if run.sft_val is not None else run.validate()
        logger.log({"stage": "rl", "step": 0, **val})
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
        prompts = [run.rl.prompts[i] for i in idx for _ in range(G)]
        sampled = run.sample(model, prompts, temperature=cfg.temperature, generator=generator, group=G)
        p_ids, p_mask, completion, response = sampled
        model.train()
        times["generate_s"] = time.perf_counter() - t0
        gen_tokens = int(dist.sum(response.sum()))

        # 2. parse, segment, reward, verdicts, advantages, SAM keep weights (sam/rollout.py; whole groups: no
        #    communication)
        t1 = time.perf_counter()
        # the random control's draws: a stream per (seed, step, rank), so a resumed run draws the same masks
        mask_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank + 7)
        scored = score_rollouts(records, completion, response, tok, run.scoring, group_size=G, generator=mask_gen)
        batch = Rollouts(p_ids, p_mask, completion, response, scored.adv.to(dev), scored.keep.to(dev), scored.step_id)
        times["score_s"] = time.perf_counter() - t1

        # 3. mu optimizer steps over micro-batches, one normaliser for the whole batch over every rank
        t3 = time.perf_counter()
        try:
            loss_sum, metric_sums, grad_norms = rl_update(
                model, opt, sched, batch, cfg, dist=dist, ref=ref, where=f"rl step {step}"
            )
        except NonFiniteLoss as exc:
            raise run.non_finite(exc, "rl", (p_ids, p_mask, completion, response)) from None
        times["update_s"] = time.perf_counter() - t3
        times["step_s"] = time.perf_counter() - t0
        solved = scored.correct.view(-1, G).float().mean(dim=1)  # (P,) share of each group answered right
        rollout = dist.mean(
            {
                "reward": float(scored.rewards.mean()),
                "accuracy": float(scored.correct.float().mean()),
                "pass_at_group": float((solved > 0).float().mean()),
                "informative_groups": float(((solved > 0) & (solved < 1)).float().mean()),
                "malformed_rate": 1 - float(scored.well_formed.float().mean()),
                **scalars(scored.diagnostics),
            }
        )
        B = completion.shape[0] * dist.world

        state["step"] = step + 1
        row = {
            "stage": "rl",
            "step": step + 1,
            "loss": loss_sum,
            "reward": rollout.pop("reward"),
            "accuracy": rollout.pop("accuracy"),
            "malformed_rate": rollout.pop("malformed_rate"),
            "response_tokens": gen_tokens / B,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": sched.get_last_lr()[0],
            "generate_tokens_per_s": gen_tokens / times["generate_s"],
            "update_tokens_per_s": gen_tokens * cfg.mu / times["update_s"],
            **times,
            **scalars(metric_sums, "pl/"),
            **rollout,
        }
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.rl_steps:
            val = run.validate()
            model.train()
            row.update(val)
            if val["val/accuracy"] > state["best_val"]:
                state["best_val"], state["best_step"] = val["val/accuracy"], state["step"]
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
    panels = [
        ("sft", "loss", "SFT loss"),
        ("rl", "reward", "RL reward"),
        ("rl", "val/accuracy", "RL val accuracy"),
        ("rl", "pl/masked_frac", "RL masked token fraction"),
    ]
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
            out[split] = paired_difference(
                np.array([rl[split][i] for i in ids]), np.array([sft[split][i] for i in ids]), resamples
            )
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
        print(
            f"RL - warm-up on {split}: accuracy {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (paired bootstrap "
            f"95% interval over {d['n']} records; RL alone right on {d['a_better']}, warm-up alone on "
            f"{d['b_better']})"
        )
    results = {
        "tests": rows,
        "rl_minus_sft": paired,
        "wall_s_this_invocation": time.perf_counter() - started,
        "parameters": num_parameters(run.model.module),
        "config": json.loads(to_json(run.cfg)),
    }
    write_text_atomic(run.dir / "results.json", json.dumps(results, indent=2) + "\n")
    png = plot_curves(run.dir)
    print(f"wrote {run.dir}/results.json" + (f" and {png}" if png else ""))


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    return run_script(TrainConfig, argv, __doc__, train)


def train(cfg: TrainConfig, given: set[str], dist: Dist, started: float) -> int:
    cfg, state = start(cfg, given, dist, FOLDERS)
    run = Run(cfg, state, dist)
    size = num_parameters(run.model.module) / 1e6
    instruction = "on" if run.with_instruction else "off"
    run.announce(
        state is None,
        f"device {run.device}, dtype {run.dtype}, model {size:.2f}M parameters, instruction {instruction}, "
        f"{run.parallel_summary()}, run folder {run.dir}",
    )
    stages = cfg.stage_list
    if "rl" in stages and cfg.micro_batch % cfg.group_size and dist.main:
        print(
            f"note: --micro-batch {cfg.micro_batch} is not a multiple of --group-size {cfg.group_size}, so the RL "
            "update reads each prompt once per row of a micro-batch that splits its group (a multiple reads it once "
            "per group)",
            file=sys.stderr,
            flush=True,
        )
    state = state or {"stage": stages[0], "step": 0, "best_val": -1.0, "best_step": -1}
    order, step = STAGES.index(state["stage"]), state["step"]
    logger = run.logger(lambda row: (STAGES.index(row["stage"]), row["step"]) <= (order, step))
    budget = [cfg.halt_after or -1]  # steps left in this invocation (-1: unlimited)
    try:
        for stage in stages[stages.index(state["stage"]) :]:
            if state["stage"] != stage:  # a fresh stage: new optimizer, step 0
                state = {"stage": stage, "step": 0, "best_val": -1.0, "best_step": -1}
            if stage == "sft":
                if not run_sft(run, state, logger, budget):
                    return run.halted()
                if not (run.dir / "eval_sft.json").exists():
                    run.save_model(run.dir / "sft")
                    run.evaluate_tests(run.model, "sft")
            else:
                if not run_rl(run, state, logger, budget):
                    return run.halted()
                if not (run.dir / "eval_rl.json").exists():
                    best = run.dir / "best"
                    if cfg.select == "best" and best.exists():
                        run.evaluate_tests(run.wrap(run.load(best), trainable=False), "rl")
                        run.say(f"after RL: testing the best validation checkpoint, RL step {state['best_step']}")
                    else:
                        run.evaluate_tests(run.model, "rl")
                        run.say(
                            f"after RL: testing the last step ({cfg.rl_steps}); the best validation accuracy was "
                            f"at RL step {state['best_step']}",
                            flush=True,
                        )
    finally:
        logger.close()
    if dist.main:
        report(run, started)
    return 0


if __name__ == "__main__":
    exit_process(main())
