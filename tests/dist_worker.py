"""One GRPO update and one distillation step on this rank's share of a fixed combined batch, through the code that
train.py and distill.py run, then a checkpoint; tests/test_parallel.py runs it on 2 ranks under torchrun and as one
process on the whole batch, and compares.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py BENCH TEACHER OUT fsdp,ddp triton ref
    python tests/dist_worker.py BENCH TEACHER OUT none triton ref     # one process, the combined batch

For each strategy of the comma list, in turn in the same process group (one launch, so its start-up is paid
once), writes OUT/STRATEGY/result.pt (losses, metrics, updated parameters of every model) and OUT/STRATEGY/ckpt/
(the RL policy, gathered full weights in Hugging Face format with the trainer state), from rank 0.
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distill  # noqa: E402
import train  # noqa: E402
from model.hf import PRESETS, load_tokenizer, prepare  # noqa: E402
from model.sampling import pad_left, pad_right  # noqa: E402
from runtime.checkpoint import rank_rng_states, save_checkpoint  # noqa: E402
from runtime.config import parse_flags  # noqa: E402
from runtime.configs import DistillConfig, TrainConfig  # noqa: E402
from runtime.loop import make_optimizer  # noqa: E402
from runtime.parallel import Sharded, init_distributed, resolve_strategy, shutdown  # noqa: E402
from sam.prompt import render_gold_reasoning  # noqa: E402

B, G, S = 8, 2, 3  # rollouts (4 prompts x 2 samples), group size, segments
V = 96  # the policy's vocabulary: small, so that the interpreted Triton kernels stay quick


def small_model():
    """A `nano`-shaped Qwen2 policy over the first V token ids, seeded."""
    config = Qwen2Config(
        vocab_size=V,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **PRESETS["nano"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return Qwen2ForCausalLM(config)


def rl_batch(prompts) -> train.Rollouts:
    """A fixed combined rollout batch: prompts of different lengths, completions ending at different steps,
    random advantages, keep weights (0, 0.5, 1) and segment ids (-1 outside the loss)."""
    g = torch.Generator().manual_seed(7)
    p_ids, p_mask = pad_left([prompts[b // G] for b in range(B)], 0, "cpu")
    lengths = torch.tensor([9, 4, 12, 7, 1, 10, 5, 12])
    T = int(lengths.max())
    completion = torch.randint(2, V, (B, T), generator=g)
    response = torch.arange(T)[None] < lengths[:, None]
    step_id = torch.randint(-1, S, (B, T), generator=g).masked_fill(~response, -1)
    adv = torch.randn(B, generator=g)
    keep = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (B, S), generator=g)]
    return train.Rollouts(p_ids, p_mask, completion, response, adv, keep, step_id)


def params(policy: Sharded) -> dict:
    """Full copies of the parameters (gathered from the shards under FSDP)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in policy.module.named_parameters()
    }


def main(bench: str, teacher: str, out: str, strategies: str, impl: str, distill_impl: str) -> None:
    dist = init_distributed("cpu")
    for strategy in strategies.split(","):
        step_both(bench, teacher, Path(out) / strategy, strategy, impl, distill_impl, dist)
    shutdown()


def step_both(bench: str, teacher: str, out: Path, strategy: str, impl: str, distill_impl: str, dist) -> None:
    """The GRPO update and the distillation step under `strategy`, from fresh models; results under `out`."""
    strategy = resolve_strategy(strategy, dist.world)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(Path(bench) / "tokenizer")
    result = {"world": dist.world, "strategy": strategy}

    # GRPO + SAM: rl_update with a frozen KL reference, 2 inner epochs, micro-batches that split the rank's rows;
    # each holds whole groups, so every forward (policy, old log-probs, reference) reads a group's prompt once
    flags = ["--impl", impl, "--mu", "2", "--micro-batch", "2", "--group-size", str(G), "--kl-coef", "0.05"]
    cfg = parse_flags(TrainConfig, [*flags, "--grad-clip", "0.5"])[0]
    fresh = lambda: prepare(small_model(), device="cpu")  # noqa: E731
    policy = Sharded(fresh(), dist, strategy)
    ref = Sharded(fresh().requires_grad_(False), dist, strategy, trainable=False)
    opt, sched = make_optimizer(policy.module, 1e-2, 10, 0, weight_decay=0.01, schedule="constant")
    prompts = [torch.randint(2, V, (3 + 4 * i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    batch = train.Rollouts(*(dist.shard(t) for t in rl_batch(prompts)))
    loss, metrics, norms = train.rl_update(policy, opt, sched, batch, cfg, dist=dist, ref=ref)
    result["rl"] = {"loss": loss, "metrics": metrics, "grad_norms": norms, "params": params(policy)}
    full = policy.full_state_dict()
    state = {"step": 1, "optimizer": policy.optimizer_state(opt), **rank_rng_states(dist)}
    if dist.main:
        save_checkpoint(out / "ckpt", policy.module, tok, state, state_dict=full)

    # distillation: both students (token-level rkl), fixed teacher traces; on rank 1 (rows 2, 3 of the combined
    # batch) the traces never end, so its label student has no rows and must run zero-weighted micro-batches
    dcfg = parse_flags(
        DistillConfig,
        [
            "--teacher",
            teacher,
            "--data-dir",
            bench,
            "--student",
            "auto",  # a random `nano` student (the default is the shipped nano reader, a pretrained model)
            "--loss",
            "rkl",
            "--micro-batch",
            "1",
            "--prompts-per-step",
            "4",
            "--lr",
            "1e-2",
            "--impl",
            distill_impl,
            "--parallel",
            strategy if strategy != "none" else "auto",
        ],
    )[0]
    run = distill.Run(dcfg, None, dist)
    records = run.train[run.fmt].records[:4]
    traces = [
        tok(render_gold_reasoning(r, run.fmt), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for r in records
    ]
    traces[2:] = [t[: len(t) // 2] for t in traces[2:]]
    p_ids, p_mask = pad_left(run.train[run.fmt].prompts[:4], tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right(traces, tok.pad_token_id, "cpu")
    teacher_batch = tuple(dist.shard(t) for t in (p_ids, p_mask, c_ids, c_mask))
    label_prompts = dist.shard(run.train["label"].prompts[:4])
    hidden = distill.teacher_states(run, teacher_batch)
    result["distill"] = {}
    for kind, student in run.students.items():
        opt, sched = make_optimizer(student.module, dcfg.lr, 10, 0, weight_decay=0.01, schedule="constant")
        if kind == "reasoning":
            loss, _ = distill.reasoning_step(run, student, teacher_batch, hidden, "worker")
            counts = {}
        else:
            loss, counts = distill.label_step(
                run, student, teacher_batch, hidden, label_prompts, label_prompts[0], "worker"
            )
        norm = student.clip_grad_norm(dcfg.grad_clip)
        opt.step()
        result["distill"][kind] = {"loss": loss, "grad_norm": norm, "counts": counts, "params": params(student)}
    if dist.main:
        torch.save(result, out / "result.pt")
    dist.barrier()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(200, exit=True)  # a hung collective shows where it hangs
    main(*sys.argv[1:7])
