"""Distil an RL-tuned relevance model (the teacher) into smaller students for serving.

    python distill.py                                  # the default: runs/default/best -> nano-reader students, CPU
    python distill.py --student auto --lr 1e-2         # students of the next smaller preset, from random weights
    python distill.py --loss jsd --beta 0.5 --on-policy 0.5 --name jsd-onpolicy
    python distill.py --loss seq --students reasoning --name seq
    python distill.py --teacher runs/qwen/best --student /models/Qwen2.5-0.5B-Instruct --dtype bf16 \
        --prompts-per-step 64 --max-new-tokens 1024 --lr 1e-5
    python distill.py --name distill --resume          # continue an interrupted run exactly
    torchrun --nproc-per-node 8 distill.py --teacher DIR --student DIR ...   # 8 processes (FSDP2 or DDP)
    python distill.py --help                           # every option

Two students learn from the same teacher samples (PAPER.md, "Distillation for serving"):
- `reasoning` keeps the teacher's prompt and reasoning format and learns the whole trace;
- `label` answers label-only (`\\boxed{k}` and EOS, a serving option that trades accuracy for latency); it learns
  the teacher's final answer, i.e. its answer distribution after the teacher has reasoned, on the teacher's own
  answer tokens (the last tokens of each trace).

Losses (`--loss`):
- `seq`: sequence-level distillation: the student's NLL of the teacher's sampled tokens (through token_logprobs);
- `fkl` / `rkl` / `jsd`: token-level distillation over the whole vocabulary with grm_kernels.distill_kl, at every
  response position: forward KL(teacher || student), reverse KL, or the generalised JSD with `--beta`.
  The reasoning student's traces are teacher samples, or its own samples for the `--on-policy` fraction of each
  batch (on-policy distillation, GKD). The label student's rows are the last tokens of each teacher trace (its
  final `\\boxed{k}` and EOS), aligned one to one with the same tokens as the student's whole answer; a teacher
  trace that is malformed or does not end with its answer is left out (`label/used` in the metrics).

One step: P prompts -> samples (teacher, and the student for the on-policy share) -> teacher hidden states under
no_grad -> per student: loss over micro-batches with one normaliser (response tokens of the whole batch) -> AdamW
step with clipping. Neither model's (B, T, V) logits are formed: hidden states and heads go to the fused kernels.

The run folder runs/<name>/ holds config.json, metrics.jsonl, ckpt/ (resumable: both students, the optimizers, the
RNG states), reasoning/ and label/ (the final students, Hugging Face format, loadable by eval.py), eval_*.json and
report.json. The report compares teacher and students on the test splits: accuracy and macro-F1, label agreement
with the teacher, parameters, latency per example (batch 1) and generation throughput (batched).
"""

import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from data.schema import write_text_atomic
from grm_kernels import distill_kl
from model.hf import (
    PRESETS,
    ModelLoadError,
    build_preset,
    check_model_dir,
    head_weight,
    is_preset,
    load_tokenizer,
    num_parameters,
)
from model.sampling import generate, pad_left, pad_right, response_hidden, response_logprobs, response_rows, take_rows
from runtime.checkpoint import PromptSettings, read_prompt_settings
from runtime.config import ConfigError, to_json
from runtime.configs import STUDENTS, DistillConfig
from runtime.data import DataError, Encoded
from runtime.loop import (
    NonFiniteLoss,
    batch_indices,
    check_finite,
    check_update,
    make_optimizer,
    micro_slices,
    restart_advice,
    shard_check,
)
from runtime.parallel import Dist, Sharded, exit_process
from runtime.session import Session, run_script, start
from sam.parse import parse_scores
from sam.prompt import render_label

FOLDERS = ("ckpt", *STUDENTS)  # checkpoint folders of a run (recovered after an interrupted swap)


# --------------------------------------------------------------------------------------------------------------
# Setup: everything checked before training starts


def check_same_tokenizer(teacher_tok, student_tok, where: str) -> None:
    """Token-level distillation compares distributions id by id: the two tokenizers must be the same."""
    problems = []
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sorted(set(t.items()) ^ set(s.items()))[:3]
        problems.append(f"vocabularies differ ({len(t)} vs {len(s)} entries; e.g. {differ})")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            problems.append(f"{attr} {getattr(teacher_tok, attr)} vs {getattr(student_tok, attr)}")
    if problems:
        raise ModelLoadError(f"{where}: the student's tokenizer does not match the teacher's: {'; '.join(problems)}")


def same_records(by_fmt: dict) -> dict:
    """Keep the records every format's encoding kept (`--long-prompts skip` may drop a record in one format only),
    so that index i is the same record for the teacher's and the label student's prompts."""
    common = set.intersection(*({r.id for r in enc.records} for enc in by_fmt.values()))
    out = {}
    for fmt, enc in by_fmt.items():
        keep = [i for i, r in enumerate(enc.records) if r.id in common]
        out[fmt] = Encoded(
            [enc.records[i] for i in keep], [enc.prompts[i] for i in keep], enc.skipped + len(enc.records) - len(keep)
        )
    return out


class Run(Session):
    """Resolved settings, data, tokenizer, teacher and students of one distillation run (runtime.session.Session:
    the rest)."""

    def __init__(self, cfg: DistillConfig, state: dict | None, dist: Dist | None = None):
        super().__init__(cfg, dist)
        shard_check(self.dist, prompts_per_step=cfg.prompts_per_step)
        teacher_dir = Path(cfg.teacher)
        if not teacher_dir.is_dir():
            hint = (
                " (the default teacher is the output of `python train.py`: run it first)"
                if (cfg.teacher == DistillConfig.teacher)
                else ""
            )
            raise ModelLoadError(f"{teacher_dir}: teacher checkpoint not found{hint}")
        teacher = self.load(teacher_dir).eval().requires_grad_(False)
        self.teacher_parameters = num_parameters(teacher)
        self.tokenizer = load_tokenizer(teacher_dir)
        saved = read_prompt_settings(teacher_dir) or PromptSettings()
        self.fmt, self.with_instruction, self.rules = saved.fmt, saved.with_instruction, saved.rules
        if self.fmt == "label" and "reasoning" in cfg.student_list:
            raise ConfigError(f"{teacher_dir} answers label-only: it has no reasoning to distil (--students label)")

        self.student_spec = cfg.student if cfg.student != "auto" else self.auto_student()
        self.check_folder(self.student_spec, "student model")
        if not is_preset(self.student_spec):
            check_model_dir(self.student_spec)  # before its tokenizer: an empty folder is named as such
            check_same_tokenizer(self.tokenizer, load_tokenizer(self.student_spec), self.student_spec)

        self.ensure_data()
        self.check_reader(self.student_spec)
        self.train = same_records({fmt: self.encode(cfg.split, fmt) for fmt in self.fmts()})
        if len(self.train[self.fmt].records) < cfg.prompts_per_step:
            raise DataError(f"split {cfg.split!r} has fewer prompts than --prompts-per-step {cfg.prompts_per_step}")
        self.val = {fmt: self.encode(cfg.val_split, fmt, cfg.val_limit) for fmt in self.fmts()}
        self.tests = {s: {fmt: self.encode(s, fmt, cfg.test_limit) for fmt in self.fmts()} for s in cfg.test_list}
        self.check_same_data(state)

        self.students = {}
        for i, kind in enumerate(cfg.student_list):
            model = self.load(self.ckpt / kind) if state is not None else self.build(self.student_spec, cfg.seed + i)
            self.check_head(model, self.student_spec, "the student's LM head")
            self.students[kind] = self.wrap(model)
        self.teacher = self.wrap(teacher, trainable=False)  # every rank loaded the same weights: FSDP keeps shards

    def auto_student(self) -> str:
        size = self.teacher_parameters
        smaller = [name for name in PRESETS if num_parameters(build_preset(name, self.tokenizer)) < size]
        if not smaller:
            raise ConfigError(
                f"--student auto: no preset is smaller than the teacher ({size / 1e6:.2f}M parameters); pass --student"
            )
        return smaller[-1]  # presets are listed smallest first

    def fmt_of(self, student: str) -> str:
        return self.fmt if student == "reasoning" else "label"

    def fmts(self) -> list[str]:
        """Prompt formats in use: the teacher's and the students'."""
        return sorted({self.fmt} | {self.fmt_of(s) for s in self.cfg.student_list})

    def save_student(self, path: Path, kind: str) -> None:
        """The final student, loadable by eval.py (collective)."""
        self.save(path, {"": (self.students[kind], self.fmt_of(kind))})

    def save_resumable(self, state: dict, opts: dict, generator) -> None:
        """ckpt/: every student in its subfolder, and the trainer state (collective)."""
        optimizers = {k: (self.students[k].optimizer_state(o), s.state_dict()) for k, (o, s) in opts.items()}
        models = {kind: (student, self.fmt_of(kind)) for kind, student in self.students.items()}
        self.save(self.ckpt, models, self.trainer_state(state, generator, optimizers=optimizers))


# --------------------------------------------------------------------------------------------------------------
# One step


def concat_samples(a, b, pad_id: int):
    """Stack two sample batches: prompts left-padded to one width P, completions right-padded to one width T."""
    if a is None or b is None:
        return a if b is None else b
    P = max(a[0].shape[1], b[0].shape[1])
    T = max(a[2].shape[1], b[2].shape[1])

    def left(x, fill):
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=fill)

    def right(x, fill):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

    return (
        torch.cat([left(a[0], pad_id), left(b[0], pad_id)]),
        torch.cat([left(a[1], False), left(b[1], False)]),
        torch.cat([right(a[2], pad_id), right(b[2], pad_id)]),
        torch.cat([right(a[3], False), right(b[3], False)]),
    )


def student_loss(model, rows, teacher_hidden, teacher_weight, mask, *, cfg, vocab_size) -> torch.Tensor:
    """Sum over the response tokens of `rows` (prompt ids, prompt mask, targets, target mask) of the chosen loss:
    the NLL of the targets (seq), or the divergence from the teacher's next-token distribution, whose hidden states
    `teacher_hidden` (b, T, Dt) and head `teacher_weight` (V, Dt) are given. Runs inside the student's forward."""
    if cfg.loss == "seq":
        return -(response_logprobs(model, *rows, impl=cfg.impl) * mask).sum()
    hs = response_hidden(model, *rows)  # (b, T, Ds)
    # only the rows that carry loss reach the kernel (the mask is the target mask, or all False for a rank's
    # zero-weighted micro-batch: then no rows, a zero loss and zero gradients)
    index = response_rows(mask)
    per_token = distill_kl(
        take_rows(hs, index),
        head_weight(model),
        take_rows(teacher_hidden, index),
        teacher_weight,
        kind=cfg.loss,
        beta=cfg.beta,
        temperature=cfg.kl_temperature,
        vocab_size=vocab_size,
        impl=cfg.impl,
    )
    return per_token.sum()


def accumulate(run: Run, student: Sharded, rows, teacher_hidden, mask, where: str) -> float:
    """Backward of the student's loss on `rows` over micro-batches, normalised by the response tokens of the
    whole batch over every rank; returns that global loss. Every rank runs the same number of micro-batches
    (a rank short of rows runs zero-weighted ones), as the gradient sync needs."""
    cfg, dist = run.cfg, run.dist
    num_tokens = dist.sum(mask.sum()).clamp(min=1)
    slices = micro_slices(len(rows[0]), cfg.micro_batch)
    n_micro = dist.max_int(len(slices))
    total = torch.zeros((), device=run.device)
    head = run.teacher.full_head() if cfg.loss != "seq" else nullcontext(None)  # seq needs no teacher head
    with head as teacher_weight:
        for m in range(n_micro):
            # past this rank's rows: its first row again, with a zero mask (no loss, no gradient)
            sl = slices[m] if m < len(slices) else slice(0, 1)
            weight = mask[sl] if m < len(slices) else torch.zeros_like(mask[sl])
            ht = None if teacher_hidden is None else teacher_hidden[sl]
            with student.sync_grads(m == n_micro - 1):
                loss = (
                    student(
                        student_loss,
                        tuple(r[sl] for r in rows),
                        ht,
                        teacher_weight,
                        weight,
                        cfg=cfg,
                        vocab_size=len(run.tokenizer),
                    )
                    / num_tokens
                )
                student.backward(loss)
            total = total + loss.detach()
    total = dist.sum(total)
    check_finite(total, where)
    return float(total)


def reasoning_step(run: Run, student: Sharded, batch, teacher_hidden, where: str) -> tuple[float, int]:
    """Accumulate the reasoning student's gradient; returns (loss, response tokens over every rank)."""
    loss = accumulate(run, student, batch, teacher_hidden, batch[3], where)
    return loss, int(run.dist.sum(batch[3].sum()))


def label_targets(run: Run, completion, response) -> list[list[int] | None]:
    """The label student's target per teacher trace: the trace's own last tokens that spell its final answer,
    `\\boxed{k}` (and EOS), or None when the trace is malformed or does not end with its answer and EOS.

    Taking the teacher's own tokens (not a fresh tokenization of `\\boxed{k}`, which may differ in a leading space)
    keeps the student's rows aligned with the teacher positions that predicted them."""
    tok = run.tokenizer
    targets = []
    for row in range(completion.shape[0]):
        ids = completion[row, : int(response[row].sum())].tolist()
        parsed = parse_scores(tok.decode(ids, skip_special_tokens=True), run.fmt)
        target = None
        if parsed.ok and ids and ids[-1] == tok.eos_token_id:  # the student must learn to stop, too
            answer = render_label(parsed.label)
            for k in range(1, min(len(ids), 64) + 1):
                if tok.decode(ids[-k:], skip_special_tokens=True).strip() == answer:
                    target = ids[-k:]
                    break
        targets.append(target)
    return targets


def label_step(
    run: Run, student: Sharded, teacher_batch, teacher_hidden, label_prompts, fallback_prompt, where: str
) -> tuple[float, dict]:
    """Accumulate the label student's gradient; returns (loss, counts). `teacher_batch` is None on a rank whose
    share of the batch was all on-policy; such a rank (or one whose traces were all unusable) still takes part in
    the gradient sync with a zero-weighted row built from `fallback_prompt`."""
    tok = run.tokenizer
    targets, use = [], []
    if teacher_batch is not None:
        _, _, completion, response = teacher_batch
        targets = label_targets(run, completion, response)
        use = [i for i, t in enumerate(targets) if t is not None]
    used, traces = (int(x) for x in run.dist.sum(torch.tensor([len(use), len(targets)], device=run.device)))
    counts = {"label/used": used / max(1, traces)}
    if not used:
        return 0.0, counts
    prompts = [label_prompts[i] for i in use] or [fallback_prompt]
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id, run.device)
    t_ids, t_mask = pad_right([targets[i] for i in use] or [[tok.eos_token_id]], tok.pad_token_id, run.device)
    if not use:
        t_mask.zero_()
    ht = None
    if run.cfg.loss != "seq":
        # teacher rows: the positions that predicted the last L tokens of each trace
        dt = head_weight(run.teacher.module).shape[1]
        ht = torch.zeros(*t_ids.shape, dt, dtype=run.dtype, device=run.device)
        for j, i in enumerate(use):
            n, L = int(response[i].sum()), len(targets[i])
            ht[j, :L] = teacher_hidden[i, n - L : n]
    return accumulate(run, student, (p_ids, p_mask, t_ids, t_mask), ht, t_mask, where), counts


@torch.no_grad()
def teacher_states(run: Run, batch) -> torch.Tensor | None:
    """Teacher hidden states (B, T, Dt) at the response positions, for the token-level losses."""
    if run.cfg.loss == "seq":
        return None
    with run.teacher.gathered():
        if batch is None:
            return None
        p_ids, p_mask, completion, response = batch
        parts = [
            run.teacher(response_hidden, p_ids[sl], p_mask[sl], completion[sl], response[sl])
            for sl in micro_slices(len(p_ids), run.cfg.micro_batch)
        ]
    return torch.cat(parts)


def distill(run: Run, state: dict, logger, budget: list[int]) -> bool:
    """The distillation loop, logging each step to `logger` (runtime.loop.Logger). Returns False when halted."""
    cfg, tok, dist = run.cfg, run.tokenizer, run.dist
    P = cfg.prompts_per_step // dist.world  # this rank's share
    opts = {
        kind: make_optimizer(
            m.module, cfg.lr, cfg.steps, cfg.warmup, weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule
        )
        for kind, m in run.students.items()
    }
    # each rank samples from its own stream (rank 0's is the one-process stream)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + 1 + 1_000_003 * dist.rank)
    if state.get("optimizers") is not None:
        for kind, (opt, sched) in opts.items():
            run.students[kind].load_optimizer_state(opt, state["optimizers"][kind][0])
            sched.load_state_dict(state["optimizers"][kind][1])
        run.restore_rng(state, generator)
    enc = run.train[run.fmt]
    label_enc = run.train.get("label")
    n_on = round(cfg.on_policy * P) if "reasoning" in run.students else 0  # rounded per rank
    for model in run.students.values():
        model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="distill", disable=not (cfg.progress and dist.main))
    for step in range(state["step"], cfg.steps):
        if budget[0] == 0:
            bar.close()
            return False
        times, t0 = {}, time.perf_counter()
        idx = dist.shard(batch_indices(len(enc.records), cfg.prompts_per_step, step, cfg.seed))
        on_idx, off_idx = idx[:n_on], idx[n_on:]
        # 1. traces: the on-policy share from the reasoning student, the rest from the teacher
        how = dict(temperature=cfg.sample_temperature, generator=generator)
        teacher_batch = run.sample(run.teacher, [enc.prompts[i] for i in off_idx], **how)
        student_batch = (
            run.sample(run.students["reasoning"], [enc.prompts[i] for i in on_idx], **how)
            if "reasoning" in run.students and cfg.on_policy > 0
            else None
        )
        for model in run.students.values():
            model.train()
        times["sample_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        row = {"stage": "distill", "step": step + 1}
        if off_idx:  # the same number of teacher traces on every rank
            _, _, completion, response = teacher_batch
            texts = [
                tok.decode(completion[b, : int(response[b].sum())].tolist(), skip_special_tokens=True)
                for b in range(len(off_idx))
            ]
            parses = [parse_scores(t, run.fmt) for t in texts]
            correct = sum(p.ok and p.label == enc.records[i].label for p, i in zip(parses, off_idx))
            row.update(
                dist.mean(
                    {
                        "teacher/accuracy": correct / len(off_idx),
                        "teacher/malformed_rate": sum(not p.ok for p in parses) / len(off_idx),
                    }
                )
            )
        # 2. teacher hidden states on every trace (the student's own ones included)
        batch = concat_samples(student_batch, teacher_batch, tok.pad_token_id)
        hidden = teacher_states(run, batch)
        times["teacher_s"] = time.perf_counter() - t1
        # 3. one optimizer step per student
        t2 = time.perf_counter()
        for kind, model in run.students.items():
            where = f"step {step} ({kind} student)"
            if kind == "reasoning":
                loss, tokens = reasoning_step(run, model, batch, hidden, where)
                row["reasoning/tokens"] = tokens
            else:
                t_hidden = None if hidden is None else hidden[len(on_idx) :]
                label_prompts = [label_enc.prompts[i] for i in off_idx]
                loss, counts = label_step(
                    run, model, teacher_batch, t_hidden, label_prompts, label_enc.prompts[idx[0]], where
                )
                row.update(counts)
            opt, sched = opts[kind]
            row[f"{kind}/grad_norm"] = model.clip_grad_norm(cfg.grad_clip)
            opt.step()
            check_update(model.module.parameters(), row[f"{kind}/grad_norm"], where, dist)
            sched.step()
            opt.zero_grad(set_to_none=True)
            row[f"{kind}/loss"] = loss
        times["update_s"] = time.perf_counter() - t2
        times["step_s"] = time.perf_counter() - t0
        row.update(lr=opts[next(iter(opts))][1].get_last_lr()[0], **times)
        if "reasoning" in run.students:
            row["reasoning/tokens_per_s"] = row["reasoning/tokens"] / times["step_s"]
        state["step"] = step + 1
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            for kind, model in run.students.items():
                metrics, _ = run.evaluate(model, run.val[run.fmt_of(kind)], run.fmt_of(kind))
                row.update({f"val/{kind}/{k}": float(metrics[k]) for k in ("accuracy", "macro_f1", "malformed_rate")})
                model.train()
        logger.log(row)
        bar.update(1)
        bar.set_postfix({k.split("/")[0][:5]: f"{v:.3f}" for k, v in row.items() if k.endswith("/loss")})
        budget[0] -= 1
        if state["step"] == cfg.steps or state["step"] % cfg.save_every == 0 or budget[0] == 0:
            run.save_resumable(state, opts, generator)
    bar.close()
    return True


# --------------------------------------------------------------------------------------------------------------
# Report


@torch.no_grad()
def latency_ms(run: Run, model: Sharded, enc, fmt: str) -> float:
    """Median milliseconds to answer one prompt alone (batch 1, greedy: a serving request), over the first
    `latency_examples` prompts of `enc` (spread over the ranks, each on its own device)."""
    tok, dist, times = run.tokenizer, run.dist, []
    with model.gathered():
        for prompt in enc.prompts[: run.cfg.latency_examples][dist.rank :: dist.world]:
            ids, mask = pad_left([prompt], tok.pad_token_id, run.device)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(
                generate,
                ids,
                mask,
                max_new_tokens=run.cfg.max_new_tokens,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                temperature=0.0,
                vocab_size=len(tok),
            )
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    times = [t for part in dist.gather(times) for t in part]
    return statistics.median(times) if times else math.nan


def evaluate_model(run: Run, name: str, model: Sharded, fmt: str) -> dict:
    """Test-split metrics, predictions and speed of one model, cached in eval_<name>.json (resume skips it)."""
    path = run.dir / f"eval_{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    model.eval()
    out = {"parameters": num_parameters(model.module), "fmt": fmt, "splits": {}}
    for split, by_fmt in run.tests.items():
        bar = tqdm(
            total=len(by_fmt[fmt].records),
            desc=f"eval {name} {split}",
            leave=False,
            disable=not (run.cfg.progress and run.dist.main),
        )
        metrics, preds = run.evaluate(model, by_fmt[fmt], fmt, progress=bar.update)
        bar.close()
        out["splits"][split] = {"metrics": metrics, "predicted": [p["predicted"] for p in preds]}
    first = next(iter(run.tests.values()), None)
    out["latency_ms"] = latency_ms(run, model, first[fmt], fmt) if first is not None else math.nan
    if run.dist.main:
        write_text_atomic(path, json.dumps(out) + "\n")
    run.dist.barrier()
    return out


def agreement(a: list, b: list) -> float:
    """Fraction of examples where two models give the same answer (a malformed answer is an answer: None)."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def report(run: Run, started: float) -> dict:
    results = {"teacher": evaluate_model(run, "teacher", run.teacher, run.fmt)}
    for kind in run.students:
        student = run.wrap(run.load(run.dir / kind), trainable=False)
        results[f"{kind} student"] = evaluate_model(run, kind, student, run.fmt_of(kind))
    teacher = results["teacher"]
    header = (
        f"{'model':<18} {'params':>8} {'split':<14} {'acc':>6} {'macroF1':>8} {'agree':>6} {'malformed':>9} "
        f"{'lat ms':>7} {'tok/s':>7} {'ex/s':>7}"
    )
    lines, table = [header], {}
    for name, res in results.items():
        for split, s in res["splits"].items():
            m = s["metrics"]
            agree = agreement(s["predicted"], teacher["splits"][split]["predicted"])
            table.setdefault(name, {})[split] = {
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "agreement_with_teacher": agree,
                "malformed_rate": m["malformed_rate"],
                "examples_per_s": m["examples_per_s"],
                "generated_tokens_per_s": m["generated_tokens_per_s"],
                "mean_completion_tokens": m["mean_completion_tokens"],
            }
            lines.append(
                f"{name:<18} {res['parameters'] / 1e6:>7.2f}M {split:<14} {m['accuracy']:>6.3f} "
                f"{m['macro_f1']:>8.3f} {agree:>6.3f} {m['malformed_rate']:>9.3f} {res['latency_ms']:>7.1f} "
                f"{m['generated_tokens_per_s']:>7.0f} {m['examples_per_s']:>7.1f}"
            )
    if not run.dist.main:
        return {}
    print("\n".join(lines))
    print(
        f"(sampled at T={run.cfg.eval_temperature}, seed {run.cfg.seed}; latency: median of "
        f"{run.cfg.latency_examples} prompts answered one at a time, greedy; tok/s and ex/s: batched evaluation "
        f"of {run.cfg.eval_batch_size} prompts per batch on {run.device})"
    )
    out = {
        "table": table,
        "parameters": {k: r["parameters"] for k, r in results.items()},
        "latency_ms": {k: r["latency_ms"] for k, r in results.items()},
        "wall_s_this_invocation": time.perf_counter() - started,
        "config": json.loads(to_json(run.cfg)),
    }
    write_text_atomic(run.dir / "report.json", json.dumps(out, indent=2) + "\n")
    print(f"wrote {run.dir}/report.json")
    return out


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    return run_script(DistillConfig, argv, __doc__, run_distill)


def run_distill(cfg: DistillConfig, given: set[str], dist: Dist, started: float) -> int:
    cfg, state = start(cfg, given, dist, FOLDERS)
    run = Run(cfg, state, dist)
    sizes = ", ".join(f"{k} {num_parameters(m.module) / 1e6:.2f}M" for k, m in run.students.items())
    run.announce(
        state is None,
        f"device {run.device}, dtype {run.dtype}, teacher {cfg.teacher} "
        f"({run.teacher_parameters / 1e6:.2f}M parameters, format {run.fmt}), student {run.student_spec}: "
        f"{sizes}; loss {cfg.loss}, on-policy {cfg.on_policy}; vocabulary: the tokenizer's "
        f"{len(run.tokenizer)} entries; {run.parallel_summary()}; run folder {run.dir}",
    )
    state = state or {"step": 0}
    done_steps = state["step"]
    logger = run.logger(lambda row: row["step"] <= done_steps)
    budget = [cfg.halt_after or -1]
    try:
        if not distill(run, state, logger, budget):
            return run.halted()
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{exc}; {restart_advice(None, init_flag='')}") from None
    finally:
        logger.close()
    missing = [kind for kind in run.students if not (run.dir / kind).exists()]
    dist.barrier()  # every rank has looked before rank 0 writes: they save the same students
    for kind in missing:
        run.save_student(run.dir / kind, kind)
    report(run, started)
    return 0


if __name__ == "__main__":
    exit_process(main())
