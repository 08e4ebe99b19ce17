"""Test setup: without CUDA, every Triton kernel runs in the CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is defined (at import), so it is set here, before any test module
imports triton or the kernels.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"


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
