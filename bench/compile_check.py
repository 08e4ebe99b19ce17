"""Static GPU check without a GPU: compile every kernel launch ahead of time for NVIDIA targets and read the result.

    python -m bench.compile_check                      # sm_80, sm_90, sm_100; a minute or two on 2 CPU cores
    python -m bench.compile_check --targets 90 --csv bench/results/compile_check.csv

The real launchers (`token_logprobs_forward` / `_backward`, `distill_kl_forward` / `_backward`, and `policy_loss`
itself) run on tensors of the `meta` device at realistic shapes with the launch configurations a CUDA device would
get; each kernel launch is captured instead of run, specialised exactly as Triton's JIT would (Triton's own binder:
constexprs, integer and pointer-alignment attributes, launch options) and compiled for each target with
`triton.compile`. One row per distinct kernel x specialisation x target: registers, spill bytes (LOCAL and STACK
from `cuobjdump -res-usage`), shared memory against the target's limit, resident programs per SM (registers and
shared memory), the tensor-core instructions in the PTX (mma.sync, wgmma or tcgen05; "none": FMA, as for fp32 dots
at IEEE precision, or no dot at all) and whether loads are pipelined (cp.async or TMA). Exit status 1 on a compile
error, a spill in a bf16/fp16 configuration (both models 16-bit, for distill_kl) or shared memory over the limit.

Batch invariance is checked structurally: the logprob and distill_kl forward kernels are compiled for N = 1, 37 and
a full batch (the JIT turns an int equal to 1 into a constant and tags multiples of 16, unless the argument is in
`do_not_specialize`), and the check fails when the cubins differ. Meta tensors report address 0, so every pointer
is taken as 16-byte aligned (a view at an odd offset would get a variant not compiled here); every launch must pin
`enable_fp_fusion`. Speed is not measured here (no GPU): bench/RESULTS.md keeps the table.
"""

import argparse
import contextlib
import csv
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import grm_kernels._lmhead as lmhead
from grm_kernels import INTERPRET

# the modules (grm_kernels/__init__.py re-exports functions under the same names)
logprob_mod = importlib.import_module("grm_kernels.logprob")
distill_mod = importlib.import_module("grm_kernels.distill_kl")
policy_mod = importlib.import_module("grm_kernels.policy_loss")

# shared memory a block may opt into, and registers per SM (CUDA occupancy tables)
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}
REGS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32
CUOBJDUMP = os.environ.get("TRITON_CUOBJDUMP_PATH") or Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    label: str  # which op and case launched it


@contextlib.contextmanager
def capture(into: list, label: list, cc: int):
    """Record kernel launches instead of running them; the launchers see a CUDA device of compute capability `cc`.

    The LM-head launch configurations are keyed on grm_kernels._lmhead.capability, looked up in that module when a
    launcher asks for its configuration; the substitute goes there and counts its calls: if no launch consulted it
    (a configuration moved to another lookup), the interpreter's small tiles would be compiled without a word, so
    that is an error."""
    saved = (JITFunction.run, lmhead.capability, policy_mod.resolve_impl)
    asked = []

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, kwargs, label[0]))

    def capability(device):
        asked.append(device)
        return cc

    JITFunction.run = record
    lmhead.capability = capability
    policy_mod.resolve_impl = lambda impl, tensor, op: "triton"
    try:
        yield
    finally:
        JITFunction.run, lmhead.capability, policy_mod.resolve_impl = saved
    if not asked:
        raise RuntimeError(
            f"no launcher asked grm_kernels._lmhead.capability for its configuration: the launches "
            f"captured here would carry interpreter tiles, not sm_{cc} ones"
        )


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(cc: int, quick: bool = False) -> list[Launch]:
    """Every launch of every op at realistic shapes, for each input dtype the ops accept, as a device of compute
    capability `cc` would launch them."""
    out, label = [], [""]
    N, D, V = (4096, 4096, 151936) if not quick else (256, 896, 4096)
    with capture(out, label, cc):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            for entropy in (True, False):  # with the entropy, and without (what the RL loss uses)
                for n in (1, 37, N):  # the forward at several batch sizes: one binary for all (batch invariance)
                    label[0] = f"logprob fwd {name}{'' if entropy else ' no-entropy'} N={n}"
                    h, w, t = meta(n, D, dtype=dtype), meta(V, D, dtype=dtype), meta(n, dtype=torch.int64)
                    logprob_mod.token_logprobs_forward(h, w, t, 1.0, -100, entropy)
            label[0] = f"logprob bwd {name}"
            h, w, t, s = (
                meta(N, D, dtype=dtype),
                meta(V, D, dtype=dtype),
                meta(N, dtype=torch.int64),
                meta(N, dtype=torch.float32),
            )
            logprob_mod.token_logprobs_backward(h, w, t, s, s, s, s, s, 1.0, -100, True, True)
            for t_dtype in {dtype, torch.float32}:  # a 16-bit student may learn from an fp32 teacher
                tname = str(t_dtype).removeprefix("torch.")
                for kind_id, kind in ((0, "fkl"), (2, "jsd")):  # fkl / rkl's merge, and jsd's two passes
                    for n in (1, 37, N):  # the forward at several batch sizes: one binary for all
                        label[0] = f"distill fwd {name}/{tname} {kind} N={n}"
                        student = meta(n, 896, dtype=dtype), meta(V, 896, dtype=dtype)
                        teacher = meta(n, D, dtype=t_dtype), meta(V, D, dtype=t_dtype)
                        out_stats = distill_mod.distill_kl_forward(
                            *student, *teacher, meta(n, dtype=torch.bool), V, kind_id, 0.5, 1.0
                        )
                hs, ws = meta(N, 896, dtype=dtype), meta(V, 896, dtype=dtype)
                ht, wt = meta(N, D, dtype=t_dtype), meta(V, D, dtype=t_dtype)
                mask = meta(N, dtype=torch.bool)
                _, stats = out_stats  # of the last forward: jsd at N
                label[0] = f"distill bwd {name}/{tname}"
                distill_mod.distill_kl_backward(
                    hs, ws, ht, wt, mask, stats, meta(N, dtype=torch.float32), V, 2, 0.5, 1.0, True, True
                )
        label[0] = "policy_loss fwd+bwd"
        T = 327680 if not quick else 4096
        logp = torch.zeros(T, device="meta", requires_grad=True)
        B, S = 320, 3
        loss, _ = policy_mod.policy_loss(
            logp,
            logp.detach(),
            meta(B, dtype=torch.float32),
            meta(T, dtype=torch.int64),
            meta(T, dtype=torch.int64),
            meta(B, S, dtype=torch.float32),
            impl="triton",
        )
        loss.backward()
    return out


def specialise(launch: Launch, target: GPUTarget):
    """(signature, constexprs, attrs, options) exactly as the JIT would build them for this launch on `target`."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the one kernel in a cubin (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def check(targets: list[int], quick: bool = False) -> tuple[list[dict], list[str]]:
    rows, failures, seen = [], [], {}
    fwd_cubins: dict[tuple, set] = {}
    for cc in targets:
        for launch in launches(cc, quick):
            if "enable_fp_fusion" not in launch.kwargs:
                failures.append(f"{launch.label}: {launch.fn.__name__} launched without enable_fp_fusion")
            target = GPUTarget("cuda", cc, 32)
            signature, constexprs, attrs, options = specialise(launch, target)
            key = (
                launch.fn.__name__,
                cc,
                repr(sorted(signature.items())),
                repr(sorted(constexprs.items())),
                repr(sorted(attrs.items())),
                options.num_warps,
                options.num_stages,
            )
            if key not in seen:
                try:
                    k = triton.compile(
                        ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options.__dict__
                    )
                    seen[key] = k
                except Exception as exc:  # a compile error is the finding: report it, keep checking the rest
                    failures.append(f"{launch.label} sm_{cc}: compile error {type(exc).__name__}: {exc}"[:400])
                    seen[key] = None
            k = seen[key]
            if k is None:
                continue
            if launch.label.startswith("logprob fwd") or launch.label.startswith("distill fwd"):
                group = (launch.fn.__name__, cc, launch.label.split(" N=")[0])
                fwd_cubins.setdefault(group, set()).add(k.asm["cubin"])
            if any(r["key"] == key for r in rows):
                continue
            res = resources(k.asm["cubin"])
            ptx = k.asm["ptx"]
            shared = k.metadata.shared
            by_regs = REGS_PER_SM // max(1, res.get("REG", 1) * 32 * options.num_warps)
            by_shared = SHARED_LIMIT[cc] // shared if shared else MAX_BLOCKS_PER_SM
            row = dict(
                key=key,
                kernel=launch.fn.__name__,
                case=launch.label,
                target=f"sm_{cc}",
                num_warps=options.num_warps,
                num_stages=options.num_stages,
                registers=res.get("REG"),
                local_bytes=res.get("LOCAL", 0),
                stack_bytes=res.get("STACK", 0),
                shared_bytes=shared,
                shared_limit=SHARED_LIMIT[cc],
                programs_per_sm=min(by_regs, by_shared, MAX_BLOCKS_PER_SM),
                mma=next((m for m in ("tcgen05", "wgmma", "mma.sync") if m in ptx), "none"),
                pipelined="cp.async" in ptx or "cp.async.bulk" in ptx,
            )
            rows.append(row)
            sixteen = "float32" not in launch.label and "policy_loss" not in launch.label  # every float input 16-bit
            if sixteen and (row["local_bytes"] or row["stack_bytes"]):
                failures.append(
                    f"{launch.label} sm_{cc}: spills {row['local_bytes']} B local, "
                    f"{row['stack_bytes']} B stack in a 16-bit configuration"
                )
            if shared > SHARED_LIMIT[cc]:
                failures.append(f"{launch.label} sm_{cc}: {shared} B of shared memory, limit {SHARED_LIMIT[cc]}")
    for (_, cc, case), cubins in fwd_cubins.items():
        if len(cubins) > 1:
            failures.append(
                f"{case} sm_{cc}: {len(cubins)} different binaries for N = 1, 37 and a full batch (batch invariance)"
            )
    return rows, failures


COLUMNS = (
    "kernel",
    "case",
    "target",
    "num_warps",
    "num_stages",
    "registers",
    "local_bytes",
    "stack_bytes",
    "shared_bytes",
    "shared_limit",
    "programs_per_sm",
    "mma",
    "pipelined",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="80,90,100", help="comma list of compute capabilities (80, 90, 100)")
    p.add_argument("--csv", default="", help="also write the rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="small shapes (the same kernels and configurations)")
    args = p.parse_args(argv)
    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        p.error(f"--targets: comma list of 80, 90, 100, got {args.targets!r}")
    if not targets or any(t not in SHARED_LIMIT for t in targets):
        p.error(f"--targets: choose from {sorted(SHARED_LIMIT)}, got {args.targets!r}")
    if INTERPRET:  # triton.jit then makes interpreted functions, which cannot be compiled (or captured)
        p.error("TRITON_INTERPRET=1 is set: unset it, the kernels must be JIT functions to be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # launches pin it; this silences direct-compile warnings
    rows, failures = check(targets, args.quick)
    print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS))
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    print(f"{len(rows)} compiled configurations, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
