"""Benchmark of token_logprobs (grm_kernels/logprob.py) against naive PyTorch, torch.compile and Liger-Kernel.

    python -m bench.bench_logprob                    # GPU: full Qwen2.5-like shapes, bf16
    python -m bench.bench_logprob --smoke            # CPU: tiny shapes, Triton in the interpreter (CI)
    python -m bench.bench_logprob --dims 4096 --tokens 16384 --providers naive,ours

Providers:
- naive: fp32 logits materialised (hidden @ W^T in the input dtype, upcast), log_softmax, gather;
- compiled: `torch.compile` of the naive function;
- ours: `token_logprobs(impl="triton")`;
- liger: Liger-Kernel's fused linear cross-entropy with reduction="none" (logp = -loss), when installed. Liger
  computes gradients inside its forward for a scalar loss, so its fwd+bwd backpropagates `loss.sum()`.

Modes: fwd (under torch.no_grad, as for old/reference log-probs) and fwd+bwd (random per-token upstream gradient,
gradients w.r.t. hidden and weight). FLOP counts used for TFLOP/s: fwd 2*N*D*V; fwd+bwd 8*N*D*V (forward, the
backward's logit recomputation, and the two gradient GEMMs), the same count for every provider so the column
compares times. Extra memory: peak bytes above the inputs during the call, minus the gradients it returns
(so: scratch memory only). Error: max |logp - fp64 reference| over a sample of rows (`--error-rows`).

Rows are appended to a CSV (default bench/results/bench_logprob.csv) stamped with device, versions and commit.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined: it must be set before grm_kernels.logprob is imported
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
from grm_kernels.logprob import token_logprobs, token_logprobs_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("naive", "compiled", "ours", "liger")
MODES = ("fwd", "fwd+bwd")


def naive_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()  # (N, V) fp32: the memory the fused kernel avoids
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def make_provider(name: str):
    """A function (hidden, weight, targets) -> logp (N,), or None with a reason when unavailable."""
    if name == "naive":
        return naive_logprobs, ""
    if name == "compiled":
        return torch.compile(naive_logprobs, dynamic=False), ""
    if name == "ours":
        return (lambda h, w, t: token_logprobs(h, w, t, impl="triton")), ""
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None, "liger-kernel not installed"
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_logprobs(h, w, t):
            loss = loss_fn(w, h, t)
            return -(loss[0] if isinstance(loss, tuple) else loss)

        return liger_logprobs, ""
    raise ValueError(name)


def bench_one(provider, fn, mode, N, D, V, dtype, device, error_rows, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, D, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, D, device=device, generator=g) * D**-0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    row = {"provider": provider, "mode": mode, "N": N, "D": D, "V": V, "dtype": str(dtype).replace("torch.", "")}

    if mode == "fwd":
        flops = 2 * N * D * V

        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)

        grad_bytes = 0
    else:
        flops = 8 * N * D * V
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        upstream = torch.randn(N, device=device, generator=g)
        scalar = provider == "liger"

        def call():
            logp = fn(hidden, weight, targets)
            out = logp.sum() if scalar else logp
            grads = torch.autograd.grad(out, (hidden, weight), None if scalar else upstream)
            return logp, grads

        grad_bytes = (N + V) * D * hidden.element_size()

    try:
        extra, out = peak_extra_bytes(call, device)
        logp = out if mode == "fwd" else out[0]
        ms = time_ms(call, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "ms": math.nan, "tflops": math.nan, "extra_mib": math.nan, "max_err": math.nan, "status": "oom"}

    # error on a sample of rows against the fp64 reference (rows are independent, so a sample is exact)
    idx = torch.linspace(0, N - 1, min(N, error_rows), device=device).long()
    with torch.no_grad():
        gold = token_logprobs_ref(hidden[idx].double(), weight.double(), targets[idx])
    max_err = (logp.detach()[idx].double() - gold).abs().max().item()
    return {
        **row,
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "extra_mib": (extra - grad_bytes) / 2**20,
        "max_err": max_err,
        "status": "ok",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CPU: Triton interpreter)")
    p.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all; smoke: naive,ours)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help=f"comma list of {MODES}")
    p.add_argument("--dims", type=int_list, default=None, help="hidden sizes D (default 896,1536,3584,4096)")
    p.add_argument("--tokens", type=int_list, default=None, help="token counts N (default 4096,16384)")
    p.add_argument("--vocab", type=int_list, default=None, help="vocabulary sizes V (default 151936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--error-rows", type=int, default=256, help="rows sampled for the fp64 error check")
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "bench_logprob.csv"), help="CSV to append to")
    args = p.parse_args(argv)
    args.providers = pick(
        p, args.providers or ("naive,ours" if args.smoke else ",".join(PROVIDERS)), PROVIDERS, "provider"
    )
    args.modes = pick(p, args.modes, MODES, "mode")
    if args.smoke:
        args.dims, args.tokens, args.vocab = args.dims or [64], args.tokens or [48], args.vocab or [1000]
    else:
        args.dims = args.dims or [896, 1536, 3584, 4096]
        args.tokens = args.tokens or [4096, 16384]
        args.vocab = args.vocab or [151936]
    if args.error_rows < 1:
        p.error("--error-rows must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    found = bench_device(args.smoke, "bench_logprob")
    if found is None:
        return 2
    device, env = found
    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.providers:
        fn, why = make_provider(name)
        if fn is None:
            print(f"# skipping {name}: {why}")
            continue
        for mode in args.modes:
            for D in args.dims:
                for V in args.vocab:
                    for N in args.tokens:
                        rows.append({**env, **bench_one(name, fn, mode, N, D, V, dtype, device, args.error_rows)})
    print_table(rows, ["provider", "mode", "N", "D", "V", "dtype", "ms", "tflops", "extra_mib", "max_err", "status"])
    try:
        append_csv(Path(args.csv), rows)
    except OSError as exc:
        print(f"error: cannot write {args.csv}: {exc}", file=sys.stderr)
        return 1
    print(f"# appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
