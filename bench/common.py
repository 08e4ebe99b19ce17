"""Shared benchmark plumbing: timing, peak memory, environment stamp, atomic CSV append, table printing.

Timing on CUDA is `triton.testing.do_bench` (median, L2 flushed between runs); on the CPU (smoke mode, Triton in
the interpreter) a plain median of wall-clock repeats, which only shows that the script runs.
"""

import argparse
import csv
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit hash, with "-dirty" when the work tree has changes; "unknown" outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """The stamp every CSV row carries."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
    }


def time_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 3) -> float:
    """Median milliseconds of `fn()`."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (compiles / traces once)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(peak bytes allocated during `fn()` above what was allocated before it, fn's result); NaN off CUDA.

    Whatever `fn` returns is still alive at the peak, so callers subtract the size of the outputs they keep
    (gradients) to get the scratch memory alone.
    """
    if device.type != "cuda":
        return float("nan"), fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before), out


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV file atomically (write a temporary file, then rename): an interrupted run never
    leaves a half-written file. The header is written when the file is new."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and old.splitlines()[0].split(",") != fields:
        raise SystemExit(f"error: {path} has different columns than this benchmark writes; use another --csv path")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(old + buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Aligned human-readable table of the chosen columns."""

    def fmt(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def pick(parser: argparse.ArgumentParser, text: str, allowed: tuple, what: str) -> list[str]:
    """A comma list of names, each one of `allowed`; exits through `parser.error` otherwise."""
    chosen = [x for x in text.split(",") if x]
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        parser.error(f"unknown or empty {what} {bad or text!r}; choose from {allowed}")
    return chosen


def bench_device(smoke: bool, name: str) -> tuple[torch.device, dict] | None:
    """The device to run on and its environment stamp (printed); None, with a message, when full shapes are
    asked for without a GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not smoke:
        print("error: no CUDA device; full shapes need a GPU (use --smoke on the CPU)", file=sys.stderr)
        return None
    env = environment(device)
    print(f"# {name} on {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    return device, env


def int_list(text: str) -> list[int]:
    """argparse type for "4096,16384"."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
