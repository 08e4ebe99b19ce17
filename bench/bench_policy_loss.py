"""Benchmark of policy_loss (grm_kernels/policy_loss.py) against its eager and torch.compile'd PyTorch reference.

    python -m bench.bench_policy_loss                 # GPU: N in {327680, 655360} tokens (40 prompts x 8 x 1-2k)
    python -m bench.bench_policy_loss --smoke         # CPU: tiny batch, Triton in the interpreter (CI)

Providers: ref (eager `policy_loss_ref`), compiled (`torch.compile` of it), ours (`policy_loss(impl="triton")`).
Modes: fwd (loss and metrics) and fwd+bwd (plus dL/dlogp). The op is memory-bound, so the rate column is
effective bandwidth: bytes of the per-token inputs read (logp, old_logp, ref_logp fp32; seq_id, step_id int64)
plus, for fwd+bwd, the second read and the fp32 gradient written, over the time. Extra memory is the peak above
the inputs minus the returned gradient. Error: |loss - fp64 reference loss|. KL term on (kl_coef 0.001), the
paper's aggregation (seq-mean-token-mean).
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined: it must be set before grm_kernels.policy_loss is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import (  # noqa: E402
    REPO,
    append_csv,
    bench_device,
    int_list,
    peak_extra_bytes,
    pick,
    print_table,
    time_ms,
)
from grm_kernels.policy_loss import policy_loss, policy_loss_ref  # noqa: E402

PROVIDERS = ("ref", "compiled", "ours")
MODES = ("fwd", "fwd+bwd")
KW = dict(kl_coef=0.001, agg="seq-mean-token-mean")


def make_batch(N, B, S, device, seed=0):
    """B rollouts of equal length N // B (the last takes the rest): 1/8 prompt tokens, then S segments."""
    g = torch.Generator(device=device).manual_seed(seed)
    seq_id = torch.clamp(torch.arange(N, device=device) // max(1, N // B), max=B - 1)
    pos = torch.arange(N, device=device) - seq_id * max(1, N // B)
    length = max(1, N // B)
    step_id = torch.where(pos < length // 8, -1, torch.clamp((pos - length // 8) * S // max(1, length), max=S - 1))
    old = -torch.rand(N, device=device, generator=g) * 3
    return dict(
        logp=old + 0.2 * torch.randn(N, device=device, generator=g),
        old_logp=old,
        seq_adv=torch.randn(B, device=device, generator=g),
        seq_id=seq_id,
        step_id=step_id,
        keep=(torch.rand(B, S, device=device, generator=g) > 0.3).float(),
        ref_logp=old + 0.1 * torch.randn(N, device=device, generator=g),
    )


def make_provider(name):
    if name == "ref":
        return policy_loss_ref
    if name == "compiled":
        return torch.compile(policy_loss_ref, dynamic=False)
    return lambda *a, **k: policy_loss(*a, impl="triton", **k)


def bench_one(provider, fn, mode, N, B, S, device):
    batch = make_batch(N, B, S, device)
    row = {"provider": provider, "mode": mode, "N": N, "B": B, "S": S}
    logp = batch.pop("logp")
    in_bytes = N * (3 * 4 + 2 * 8)
    if mode == "fwd":
        moved, grad_bytes = in_bytes, 0

        def call():
            with torch.no_grad():
                return fn(logp, **batch, **KW)[0]

    else:
        moved, grad_bytes = 2 * in_bytes + N * 4, N * 4
        logp.requires_grad_(True)

        def call():
            loss, _ = fn(logp, **batch, **KW)
            return loss, torch.autograd.grad(loss, logp)[0]

    try:
        extra, out = peak_extra_bytes(call, device)
        ms = time_ms(call, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "ms": math.nan, "gb_s": math.nan, "extra_mib": math.nan, "loss_err": math.nan, "status": "oom"}
    loss = out if mode == "fwd" else out[0]
    gold, _ = policy_loss_ref(logp.detach().double(), **batch, **KW, upcast=True)
    return {
        **row,
        "ms": ms,
        "gb_s": moved / (ms * 1e-3) / 1e9,
        "extra_mib": (extra - grad_bytes) / 2**20,
        "loss_err": abs(loss.item() - gold.item()),
        "status": "ok",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny batch on any device (CPU: Triton interpreter)")
    p.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all; smoke: ref,ours)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help=f"comma list of {MODES}")
    p.add_argument("--tokens", type=int_list, default=None, help="token counts N (default 327680,655360)")
    p.add_argument("--rollouts", type=int, default=None, help="rollouts B (default 320; smoke 16)")
    p.add_argument("--segments", type=int, default=3, help="segments per rollout S")
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "bench_policy_loss.csv"))
    args = p.parse_args(argv)
    args.providers = pick(
        p, args.providers or ("ref,ours" if args.smoke else ",".join(PROVIDERS)), PROVIDERS, "provider"
    )
    args.modes = pick(p, args.modes, MODES, "mode")
    args.tokens = args.tokens or ([2000] if args.smoke else [327680, 655360])
    args.rollouts = args.rollouts or (16 if args.smoke else 320)
    if args.rollouts < 1 or args.segments < 1:
        p.error("--rollouts and --segments must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    found = bench_device(args.smoke, "bench_policy_loss")
    if found is None:
        return 2
    device, env = found
    rows = []
    for name in args.providers:
        fn = make_provider(name)
        for mode in args.modes:
            for N in args.tokens:
                rows.append({**env, **bench_one(name, fn, mode, N, args.rollouts, args.segments, device)})
    print_table(rows, ["provider", "mode", "N", "B", "S", "ms", "gb_s", "extra_mib", "loss_err", "status"])
    try:
        append_csv(Path(args.csv), rows)
    except OSError as exc:
        print(f"error: cannot write {args.csv}: {exc}", file=sys.stderr)
        return 1
    print(f"# appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
