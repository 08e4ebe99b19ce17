"""Test setup: without CUDA, every Triton kernel runs in the CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is defined (at import), so it is set here, before any test module
imports triton or the kernels.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
