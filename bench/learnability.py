"""Can a preset learn a benchmark's traces? Teacher-forced accuracy of each trace line while SFT runs.

    python -m bench.learnability --data-dir data/builtin --lr 3e-3 --steps 1000      # a few minutes on 2 CPU cores
    python -m bench.learnability --model models/reader --steps 500 --every 125      # the shipped reader
    python -m bench.learnability --model models/smollm2-135m --lr 5e-5 --batch 8 --steps 100 --every 25 --val 100
    python -m bench.learnability --task induction --model models/reader --steps 1000 --every 100

Trains a random-initialised preset, or with `--model` a local Hugging Face model (its own tokenizer; a pretrained
one), on the `sft` traces (AdamW, batch `--batch`, constant learning rate after 20 warm-up steps; `--prompt-loss`
adds the prompt's tokens to the loss) and every `--every` steps prints, for each line of
the 7-step criteria format, the share of `val` gold traces (first `--val` records) whose every token on that line
is the model's argmax given the gold prefix. A line that stays at its majority rate means the model has not
learned to compute it: line 2 (the coverage) and line 3 (the category match) need the note compared with the
query, lines 5-7 follow from the lines before them. docs/LOG.md (2026-12-02) has the measurements behind the
benchmark v2 entry.

`--task induction` measures the skill under every lookup instead (issue 28): a random sequence of 24 words of the
vocabulary, a gap of 0-32 random words, the same 24 words again; every repeated word after the first is
supervised, and the copy accuracy (argmax right) on 256 held-out sequences is printed every `--every` steps
(chance: 1 / vocabulary). A model that forms an induction head (find the earlier copy of the current word, read the
word after it) reaches 1.0; one that learns only positions cannot, since the gap is random.
"""

import argparse
import time
from pathlib import Path

import torch

from data.schema import read_jsonl
from model.hf import PRESETS, ModelLoadError, build_preset, load_model, load_tokenizer, prepare
from sam.prompt import render_gold_reasoning, render_prompt


def encode(tok, record, trace):
    prompt = tok(render_prompt(record, with_instruction=False))["input_ids"]
    return prompt, tok(trace, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def batch(items, pad_id, prompt_loss=False):
    """(ids (B, L), labels (B, L) with -100 outside the trace, or outside the sequence with prompt_loss),
    right-padded."""
    L = max(len(p) + len(t) for p, t in items)
    ids = torch.full((len(items), L), pad_id)
    labels = torch.full((len(items), L), -100)
    for i, (p, t) in enumerate(items):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, 0 if prompt_loss else len(p) : len(p) + len(t)] = torch.tensor(p + t if prompt_loss else t)
    return ids, labels


def line_of_tokens(tok, ids: list[int]) -> list[int]:
    """The trace line (0-based) each token starts on, from the decoded text: a byte-level BPE token may carry a
    newline together with other characters ("}\n"), so the newline is not always a token of its own."""
    lines, text = [], ""
    for k in range(len(ids)):
        lines.append(text.count("\n"))
        text = tok.decode(ids[: k + 1], skip_special_tokens=True)
    return lines


def induction_batch(n: int, vocab: int, generator: torch.Generator, span: int = 24, max_gap: int = 32):
    """(ids (n, L), labels (n, L) with -100 except on the repeat's words 2.., attention mask (n, L)): a random
    prefix of 0-8 words, then A, a gap of 0-`max_gap` words, A again; words drawn from ids 4..vocab-1 (the
    tokenizers' special tokens come first)."""
    rows = []
    for _ in range(n):
        pre, gap = (int(torch.randint(0, k + 1, (), generator=generator)) for k in (8, max_gap))
        words = torch.randint(4, vocab, (pre + span + gap,), generator=generator)
        a = words[pre : pre + span]
        rows.append((torch.cat([words, a]), len(words)))
    width = max(len(r) for r, _ in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (r, start) in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
        labels[i, start + 1 : len(r)] = r[start + 1 :]  # the first word of the repeat cannot be known
    return ids, labels, mask


@torch.no_grad()
def copy_accuracy(model, batch_) -> float:
    ids, labels, mask = batch_
    model.eval()
    pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    model.train()
    target = labels[:, 1:]
    keep = target != -100
    return (pred[keep] == target[keep]).float().mean().item()


def induction(model, vocab: int, args) -> int:
    """Train `model` on the random-gap induction task and print its copy accuracy (see the module docstring)."""
    gen = torch.Generator().manual_seed(args.seed)
    held = induction_batch(256, vocab, torch.Generator().manual_seed(args.seed + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = time.perf_counter()
    print(f"step  loss  copy accuracy (chance {1 / vocab:.4f})  seconds")
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        ids, labels, mask = induction_batch(args.batch, vocab, gen)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            print(f"{step:>5} {loss.item():.3f} {copy_accuracy(model, held):.3f} {time.perf_counter() - start:.0f}")
    return 0


@torch.no_grad()
def line_accuracy(model, tok, val, lines=7) -> list[float]:
    model.eval()
    right, n = [0] * lines, 0
    for lo in range(0, len(val), 100):
        ids, labels = batch(val[lo : lo + 100], tok.pad_token_id)
        pred = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        for b in range(ids.shape[0]):
            ok = [True] * lines
            positions = (target[b] != -100).nonzero().flatten().tolist()
            for j, line in zip(positions, line_of_tokens(tok, target[b, positions].tolist())):
                if line < lines and pred[b, j] != target[b, j]:
                    ok[line] = False
            right = [r + o for r, o in zip(right, ok)]
            n += 1
    model.train()
    return [r / n for r in right]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data/builtin")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--model", default="", help="a local Hugging Face model folder instead of --preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-loss", action="store_true", help="train on the prompt's tokens too (plain LM loss)")
    p.add_argument("--task", default="traces", choices=("traces", "induction"), help="what to learn (docstring)")
    args = p.parse_args(argv)
    if not (args.lr > 0 and args.steps > 0 and args.every > 0 and args.val > 0 and args.batch > 0):  # refuses nan
        p.error("--lr, --steps, --every, --val and --batch must be > 0")
    if args.model and not Path(args.model).is_dir():
        p.error(f"--model {args.model}: not a folder")
    for name in ("tokenizer/tokenizer.json", "sft.jsonl", "val.jsonl"):
        if not (Path(args.data_dir) / name).exists():
            p.error(
                f"--data-dir {args.data_dir}: no {name} (write a benchmark with python -m data.synthetic --out DIR)"
            )
    torch.manual_seed(args.seed)
    try:  # a model folder first: one that is not a model says so before its tokenizer is tried
        model = load_model(args.model, device="cpu", dtype=torch.float32, attention="sdpa") if args.model else None
        tok = load_tokenizer(args.model or f"{args.data_dir}/tokenizer")
    except ModelLoadError as exc:
        p.error(str(exc))
    if args.task == "induction":
        if model is None:
            model = build_preset(args.preset, tok, seed=args.seed, max_positions=512)
            model = prepare(model, device="cpu", dtype=torch.float32, attention="sdpa")
        return induction(model, len(tok), args)
    sft = [encode(tok, r, r.reasoning or render_gold_reasoning(r)) for r in read_jsonl(f"{args.data_dir}/sft.jsonl")]
    val = [encode(tok, r, render_gold_reasoning(r)) for r in read_jsonl(f"{args.data_dir}/val.jsonl")[: args.val]]
    if model is None:
        model = build_preset(args.preset, tok, seed=args.seed, max_positions=512)
        model = prepare(model, device="cpu", dtype=torch.float32, attention="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = time.perf_counter()
    print("step  loss  line accuracy (steps 1-7)  seconds")
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        items = [sft[i] for i in torch.randint(0, len(sft), (args.batch,)).tolist()]
        ids, labels = batch(items, tok.pad_token_id, args.prompt_loss)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            acc = " ".join(f"{a:.2f}" for a in line_accuracy(model, tok, val))
            print(f"{step:>5} {loss.item():.3f} {acc} {time.perf_counter() - start:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
