"""Benchmark of distill_kl (grm_kernels/distill_kl.py) against naive PyTorch, torch.compile and Liger-Kernel.

    python -m bench.bench_distill_kl                  # GPU: Qwen2.5-like shapes, bf16, fkl / rkl / jsd
    python -m bench.bench_distill_kl --smoke          # CPU: tiny shapes, Triton in the interpreter (CI)
    python -m bench.bench_distill_kl --kinds fkl --dims 896,3584 --tokens 8192 --providers matmul,ours

Student and teacher share the hidden size D (`--teacher-dims` to differ) and the vocabulary V.

Providers:
- matmul: the yardstick, the two bare logit GEMMs `hs @ Ws.T` and `ht @ Wt.T` (under fwd+bwd, plus the student's
  two gradient GEMMs), its TFLOP/s counted on those GEMMs: a fused kernel has to do at least this work;
- naive: both (N, V) fp32 logit matrices materialised, log_softmax, the divergence (distill_kl_ref);
- compiled: `torch.compile` of the naive function;
- ours: `distill_kl(impl="triton")`;
- liger: Liger-Kernel's fused linear JSD (LigerFusedLinearJSD) with beta 0 (fkl), 1 (rkl) or beta (jsd), when
  installed. It returns a scalar loss averaged over tokens and computes its gradients inside the forward; its
  error column compares that scalar with the mean of the fp64 reference, rescaled by beta (1 - beta) for jsd
  (grm_kernels/distill_kl.py normalises jsd by it).

Modes: fwd (under no_grad) and fwd+bwd (random per-token upstream gradient; a scalar sum for liger; gradients
w.r.t. the student's hidden states and head). FLOP counts used for TFLOP/s, the same for every provider:
fwd 2 N V (Ds + Dt), twice that for jsd (its second sweep); fwd+bwd adds the backward's recomputation of both
tiles, 2 N V (Ds + Dt), and the student's two gradient GEMMs, 4 N V Ds. Extra memory: peak bytes above the inputs
during the call minus the gradients it returns. Error: max |loss - fp64 reference| over a sample of rows.

Rows are appended to a CSV (default bench/results/bench_distill_kl.csv) stamped with device, versions and commit.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined: it must be set before grm_kernels.distill_kl is imported
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
from grm_kernels.distill_kl import KINDS, distill_kl, distill_kl_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("matmul", "naive", "compiled", "ours", "liger")
MODES = ("fwd", "fwd+bwd")


def make_provider(name: str, kind: str, beta: float):
    """(fn(hs, ws, ht, wt) -> per-token loss (N,) or scalar, reason when unavailable)."""
    kw = dict(kind=kind, beta=beta)
    if name == "matmul":
        return (lambda hs, ws, ht, wt: (hs @ ws.T, ht @ wt.T)), ""
    if name == "naive":
        return (lambda hs, ws, ht, wt: distill_kl_ref(hs, ws, ht, wt, **kw)), ""
    if name == "compiled":
        return torch.compile(lambda hs, ws, ht, wt: distill_kl_ref(hs, ws, ht, wt, **kw), dynamic=False), ""
    if name == "ours":
        return (lambda hs, ws, ht, wt: distill_kl(hs, ws, ht, wt, impl="triton", **kw)), ""
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            return None, "liger-kernel not installed"
        liger_beta = {"fkl": 0.0, "rkl": 1.0}.get(kind, beta)
        loss_fn = LigerFusedLinearJSD(jsd_beta=liger_beta)
        return (lambda hs, ws, ht, wt: loss_fn(hs, ws, ht, wt)), ""
    raise ValueError(name)


def bench_one(provider, fn, kind, beta, mode, N, Ds, Dt, V, dtype, device, error_rows, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hs = torch.randn(N, Ds, device=device, generator=g).to(dtype)
    ws = (torch.randn(V, Ds, device=device, generator=g) * Ds**-0.5).to(dtype)
    ht = torch.randn(N, Dt, device=device, generator=g).to(dtype)
    wt = (torch.randn(V, Dt, device=device, generator=g) * Dt**-0.5).to(dtype)
    kind_col = "-" if provider == "matmul" else kind
    row = {
        "provider": provider,
        "kind": kind_col,
        "beta": beta if kind == "jsd" else math.nan,
        "mode": mode,
        "N": N,
        "Ds": Ds,
        "Dt": Dt,
        "V": V,
        "dtype": str(dtype).replace("torch.", ""),
    }
    sweeps = 2 if kind == "jsd" and provider != "matmul" else 1  # the matmul yardstick counts its real GEMMs
    recompute = 0 if provider == "matmul" else 1
    scalar = provider == "liger"
    if mode == "fwd":
        flops = 2 * N * V * (Ds + Dt) * sweeps

        def call():
            with torch.no_grad():
                return fn(hs, ws, ht, wt)

        grad_bytes = 0
    else:
        flops = 2 * N * V * (Ds + Dt) * (sweeps + recompute) + 4 * N * V * Ds
        hs.requires_grad_(True)
        ws.requires_grad_(True)
        upstream = torch.randn(N, device=device, generator=g)

        if provider == "matmul":

            def call():
                with torch.no_grad():
                    zs, zt = hs @ ws.T, ht @ wt.T
                    dz = zs  # stands in for dL/dz: the two gradient GEMMs of the student
                    return (zs, zt), (dz @ ws, dz.T @ hs)
        else:

            def call():
                loss = fn(hs, ws, ht, wt)
                out = loss if scalar else (loss * upstream).sum()
                return loss, torch.autograd.grad(out, (hs, ws))

        grad_bytes = (N + V) * Ds * hs.element_size()

    try:
        extra, out = peak_extra_bytes(call, device)
        ms = time_ms(call, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "ms": math.nan, "tflops": math.nan, "extra_mib": math.nan, "max_err": math.nan, "status": "oom"}

    max_err = math.nan
    if provider != "matmul":
        loss = (out if mode == "fwd" else out[0]).detach()
        idx = torch.linspace(0, N - 1, min(N, error_rows), device=device).long()
        with torch.no_grad():
            gold = distill_kl_ref(hs[idx].double(), ws.double(), ht[idx].double(), wt.double(), kind=kind, beta=beta)
        if scalar:
            liger_scale = beta * (1 - beta) if kind == "jsd" else 1.0
            ref_mean = distill_kl_ref(hs.double(), ws.double(), ht.double(), wt.double(), kind=kind, beta=beta)
            max_err = abs(loss.double().item() - liger_scale * ref_mean.mean().item()) if N * V <= 2**28 else math.nan
        else:
            max_err = (loss[idx].double() - gold).abs().max().item()
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
    p.add_argument("--kinds", default="fkl,rkl,jsd", help=f"comma list of {KINDS}")
    p.add_argument("--beta", type=float, default=0.5, help="jsd beta")
    p.add_argument("--modes", default="fwd,fwd+bwd", help=f"comma list of {MODES}")
    p.add_argument("--dims", type=int_list, default=None, help="student hidden sizes Ds (default 896,3584)")
    p.add_argument("--teacher-dims", type=int_list, default=None, help="teacher hidden sizes (default: = Ds)")
    p.add_argument("--tokens", type=int_list, default=None, help="token counts N (default 4096,16384)")
    p.add_argument("--vocab", type=int_list, default=None, help="vocabulary sizes V (default 151936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--error-rows", type=int, default=256, help="rows sampled for the fp64 error check")
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "bench_distill_kl.csv"), help="CSV to append to")
    args = p.parse_args(argv)
    args.providers = pick(
        p, args.providers or ("naive,ours" if args.smoke else ",".join(PROVIDERS)), PROVIDERS, "provider"
    )
    args.kinds = pick(p, args.kinds, KINDS, "kind")
    args.modes = pick(p, args.modes, MODES, "mode")
    if not 0 < args.beta < 1:
        p.error("--beta must be in (0, 1) (0 and 1 are the fkl and rkl kinds)")
    if args.smoke:
        args.dims, args.tokens, args.vocab = args.dims or [64], args.tokens or [48], args.vocab or [300]
    else:
        args.dims = args.dims or [896, 3584]
        args.tokens = args.tokens or [4096, 16384]
        args.vocab = args.vocab or [151936]
    if args.teacher_dims is not None and len(args.teacher_dims) != len(args.dims):
        p.error("--teacher-dims needs one value per --dims value")
    args.teacher_dims = args.teacher_dims or args.dims
    if args.error_rows < 1:
        p.error("--error-rows must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    found = bench_device(args.smoke, "bench_distill_kl")
    if found is None:
        return 2
    device, env = found
    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.providers:
        for kind in args.kinds if name != "matmul" else args.kinds[:1]:
            fn, why = make_provider(name, kind, args.beta)
            if fn is None:
                print(f"# skipping {name}: {why}")
                break
            for mode in args.modes:
                for Ds, Dt in zip(args.dims, args.teacher_dims):
                    for V in args.vocab:
                        for N in args.tokens:
                            rows.append(
                                {
                                    **env,
                                    **bench_one(
                                        name, fn, kind, args.beta, mode, N, Ds, Dt, V, dtype, device, args.error_rows
                                    ),
                                }
                            )
    columns = [
        "provider",
        "kind",
        "mode",
        "N",
        "Ds",
        "Dt",
        "V",
        "dtype",
        "ms",
        "tflops",
        "extra_mib",
        "max_err",
        "status",
    ]
    print_table(rows, columns)
    try:
        append_csv(Path(args.csv), rows)
    except OSError as exc:
        print(f"error: cannot write {args.csv}: {exc}", file=sys.stderr)
        return 1
    print(f"# appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
