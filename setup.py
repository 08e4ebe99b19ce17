"""Installable package for the GRPO + Stepwise Advantage Masking relevance-model codebase.

Floors only, no upper pins: the package must install over an existing CUDA build of torch on a GPU node.
Tested: CI installs torch 2.13.0 (CPU), triton 3.9 and the newest transformers (5.25 at the time of writing);
transformers 4.56.2 passed the model and training tests by hand (2026-12-06). 4.45 does not work (no `dtype=` in
from_pretrained, no `DynamicCache(config=...)`), hence the floor. The torch and triton floors are not tested.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SCRIPTS = [name for name in ("train", "distill", "eval", "ablate", "pretrain") if (ROOT / f"{name}.py").exists()]

setup(
    name="grm-sam",
    version="0.1.0",
    description="RL-trained generative relevance models: GRPO + Stepwise Advantage Masking with fused Triton kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["grm_kernels", "sam", "model", "data", "runtime", "bench"],
    py_modules=SCRIPTS,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.56",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "matplotlib>=3.8"],
        "plot": ["matplotlib>=3.8"],
        "gguf": ["gguf>=0.10", "accelerate>=0.26"],  # model.from_gguf: a GGUF file -> a Hugging Face folder
        "gpu": ["flash-attn>=2.6"],
        "peers": ["liger-kernel>=0.5"],
    },
)
