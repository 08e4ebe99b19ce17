"""Test setup: without CUDA, every Triton kernel runs in the CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is defined (at import), so it is set here, before any test module
imports triton or the kernels.
"""

import os
import sys

# Under pytest-xdist (`-n auto`, the README's test command) each worker gets its share of the cores, for torch's
# threads, numpy's BLAS (both read OMP_NUM_THREADS when they load, so it is set before either is imported), the
# tokenizers' thread pool (RAYON_NUM_THREADS) and the scripts the tests start (torchrun ranks, gpu_check.sh,
# ablate.py's runs), which inherit them. Without this, 2 workers x 2 threads oversubscribe 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["RAYON_NUM_THREADS"] = str(_threads)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(_threads)

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

# Under `--dist loadfile` a worker takes the next file when the one it runs has at most 2 tests left, and runs its
# files one after the other. So the files go slowest first (seconds measured under `-n 2`, bench/RESULTS.md), and
# a file's long test goes first within it (run last, it would have a second file queued behind it on its worker).
# The order is kept as given (xdist's own reordering, by test count, is turned off below). Files not named here
# follow in their usual order.
SLOW_FILES = (
    "test_real_model.py",  # ~135 s (beside test_parallel's and test_ablate's subprocesses)
    "test_parallel.py",  # ~110 s
    "test_ablate.py",  # ~80 s
    "test_train.py",  # ~75 s
    "test_logprob.py",  # ~70 s
    "test_bench.py",  # ~45 s
    "test_synthetic.py",  # ~40 s
    "test_distill_kl.py",  # ~40 s
    "test_distill.py",  # ~20 s
)
LONG_TESTS = ("test_tiny_end_to_end_run_with_the_real_model",)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: --dist loadfile sorts by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    first = lambda item: getattr(item, "originalname", item.name) in LONG_TESTS  # noqa: E731
    items.sort(key=lambda item: (rank.get(item.path.name, len(SLOW_FILES)), not first(item)))


# Fixtures shared by the test files (they import the data and model code lazily, after TRITON_INTERPRET is set)


@pytest.fixture(scope="session")
def make_bench(tmp_path_factory):
    """make_bench(sizes, seed=0) -> a folder holding a built-in benchmark with these split sizes (and its tokenizer),
    written once per session for each (sizes, seed); tests must not modify it."""
    from data import synthetic

    made = {}

    def make(sizes: dict, seed: int = 0):
        key = (seed, tuple(sorted(sizes.items())))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("bench")
            synthetic.write_benchmark(made[key], seed=seed, sizes=sizes)
        return made[key]

    return make


@pytest.fixture(scope="session")
def make_teacher(tmp_path_factory):
    """make_teacher(bench, peaked=1.0) -> a checkpoint folder of a random `tiny` model (seed 5) on the bench's
    tokenizer, prompted like train.py's default run (criteria, no instruction). `peaked` scales the final norm, so
    that its next-token distributions are sharp and a fresh student starts far from it."""
    from model.hf import build_preset, load_tokenizer
    from runtime.checkpoint import PromptSettings, save_checkpoint

    def make(bench, peaked: float = 1.0):
        tok = load_tokenizer(bench / "tokenizer")
        model = build_preset("tiny", tok, seed=5, max_positions=1024)
        with torch.no_grad():
            model.model.norm.weight.mul_(peaked)
        path = tmp_path_factory.mktemp("teacher") / "best"
        save_checkpoint(path, model, tok, prompt=PromptSettings("criteria", with_instruction=False))
        return path

    return make
