"""What a real pretrained model costs on this machine: prompt length with the full criteria instruction in the
chat template, prefill time, decode tokens/s at batch 1 and 8, and one SFT step (forward, backward, AdamW).

    python -m bench.real_model_cost --model models/smollm2-135m                  # data/builtin's val records

Decode is timed over a fixed number of steps (EOS is never allowed to end a row early): decode tokens/s is
B x (steps - 1) over the time of `generate` with `steps` new tokens minus the time with one new token, so the
prefill is not counted. The SFT step is train.py's warm-up step on a batch of (prompt, gold trace) pairs: response
log-probs through grm_kernels.token_logprobs (reference path on the CPU), mean NLL, backward, clip, AdamW. Every
figure is the median of `--repeats` runs after one warm-up run. Nothing is written; the output is the table.
"""

import argparse
import statistics
import time

import torch

from data.schema import read_jsonl
from model.hf import load_model, load_tokenizer
from model.sampling import generate, pad_left, pad_right, response_logprobs
from runtime.data import BUILTIN_DIR, ensure_builtin, sft_target
from sam.prompt import render_prompt


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local Hugging Face model folder")
    p.add_argument("--data-dir", default=BUILTIN_DIR, help="benchmark folder (its val split gives the prompts)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--steps", type=int, default=33, help="decode steps timed (>= 2)")
    p.add_argument("--sft-batch", type=int, default=2, help="pairs in the SFT step")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.sft_batch < 1:
        p.error("need --steps >= 2, --repeats >= 1, --sft-batch >= 1")
    torch.manual_seed(0)
    if args.data_dir == BUILTIN_DIR:
        ensure_builtin(args.data_dir)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu")
    records = read_jsonl(f"{args.data_dir}/val.jsonl")[:64]
    prompts = [tok(render_prompt(r, "criteria", tokenizer=tok, with_instruction=True))["input_ids"] for r in records]
    lengths = sorted(len(ids) for ids in prompts)
    print(
        f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"prompt tokens with the full criteria instruction in the chat template ({len(lengths)} val records): "
        f"min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
    )
    never = len(tok) + 1  # an id no token has: rows never end, every step is timed

    for B in (int(b) for b in args.batches.split(",")):
        ids, mask = pad_left(prompts[:B], tok.pad_token_id, "cpu")

        def run(n, ids=ids, mask=mask):
            return generate(
                model,
                ids,
                mask,
                max_new_tokens=n,
                eos_id=never,
                pad_id=tok.pad_token_id,
                temperature=1.0,
                generator=torch.Generator().manual_seed(0),
            )

        first = median_time(lambda: run(1), args.repeats)
        full = median_time(lambda: run(args.steps), args.repeats)
        rate = B * (args.steps - 1) / (full - first)
        print(f"batch {B}: prefill + first token {first:.2f} s; decode {rate:.1f} tokens/s ({rate / B:.1f} per row)")

    batch = records[: args.sft_batch]
    targets = [
        tok(sft_target(r, "criteria"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in batch
    ]
    ids, mask = pad_left(prompts[: args.sft_batch], tok.pad_token_id, "cpu")
    comp, resp = pad_right(targets, tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def sft_step():
        logp = response_logprobs(model, ids, mask, comp, resp)
        loss = -(logp * resp).sum() / resp.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_time(sft_step, args.repeats)
    tokens = int(mask.sum() + resp.sum())
    print(
        f"SFT step, batch {args.sft_batch} ({tokens} tokens, {int(resp.sum())} trained): {seconds:.1f} s "
        f"({tokens / seconds:.0f} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
