"""Causal LMs from transformers: named random-initialised presets or a local Hugging Face directory.

The training code never asks a model for its `(B, T, V)` logits. It takes the final hidden states (after the final
norm) from `model.base_model` and the LM-head weight from `model.get_output_embeddings()`, and feeds both to
`grm_kernels.token_logprobs`. With tied embeddings the head weight *is* the input embedding matrix, so its gradient
flows to the one shared parameter. Models whose head is more than a bias-free linear map (logit soft-capping, a
logit scale) are refused: the fused kernels would compute different numbers than the model.

Presets are Qwen2-architecture models sized to the tokenizer they are built with (the built-in word-level
tokenizer has about 650 entries):
- `tiny`:  hidden 128, 4 layers, 4 heads (2 KV heads), MLP 384, tied head: about 0.9M parameters;
- `small`: hidden 320, 8 layers, 5 heads, MLP 1024, tied head: about 11M parameters.

Nothing is downloaded: directories load with `local_files_only=True`, and `trust_remote_code` is off unless asked.
"""

import importlib.util
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PRESETS = {  # smallest first; `nano` is the default distillation student of a `tiny` teacher
    "nano": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192
    ),
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
    "small": dict(
        hidden_size=320, num_hidden_layers=8, num_attention_heads=5, num_key_value_heads=5, intermediate_size=1024
    ),
}
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_UNSUPPORTED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be used; the message names the path and the reason."""


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (bf16 matmuls on a CPU are slow and its rounding is not the point there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_attention(device: torch.device | str) -> str:
    """flash-attention 2 when the package imports and the device is a GPU, PyTorch SDPA otherwise."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def is_preset(spec: str) -> bool:
    return spec in PRESETS


def build_preset(name: str, tokenizer, *, seed: int = 0, max_positions: int = 4096) -> Qwen2ForCausalLM:
    """A random-initialised Qwen2 model of preset `name`, vocabulary sized to `tokenizer`, seeded (CPU, fp32)."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)} or pass a directory")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **PRESETS[name],
    )
    # initialisation draws from the global generator: fork it so building a model leaves the caller's RNG alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory with a pad token (the EOS token stands in when it has none)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: tokenizer directory not found")
    try:
        tok_class = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        tok_class = None
    try:
        if tok_class in _GENERIC_TOKENIZERS and (path / "tokenizer.json").exists():
            # a generic tokenizer.json (the built-in one, or one trained with `tokenizers`): load it as it is.
            # AutoTokenizer would pick the class of the model type in config.json (Qwen2Tokenizer for a Qwen2
            # checkpoint), which rebuilds its own pre-tokenizer and silently tokenizes differently.
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError) for a bad directory
        raise ModelLoadError(f"{path}: cannot load a tokenizer: {type(exc).__name__}: {exc}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        # padding positions are masked by position, never by id, so pad == eos is safe (the real EOS stays trained)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_model_dir(path: str | Path) -> Path:
    """`path` as a Path when it is a folder with a readable config.json; ModelLoadError otherwise. Called before
    anything else is read from a model folder (its tokenizer included), so that a wrong folder is named as such."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory not found")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: not readable JSON: {exc}") from None
    return path


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attention: str | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from a local Hugging Face directory (config.json + weights), on `device` in `dtype`."""
    path = check_model_dir(path)
    dtype = dtype or default_dtype(device)
    attention = attention or default_attention(device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except Exception as exc:  # unknown architecture, missing weights, remote code refused, ...
        raise ModelLoadError(f"{path}: cannot load a causal LM: {_one_line(exc)}") from None
    # transformers fills a tensor missing from the checkpoint with a fresh random initialisation (and only logs it):
    # a half-random model must not train or score as if it were the checkpoint. Weights the model ties (a head tied
    # to the embeddings) are not reported missing.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise ModelLoadError(
                f"{path}: the checkpoint does not match the model's config: {len(keys)} "
                f"{kind.replace('_keys', '').replace('_', ' ')} tensor(s): {shown}"
            )
    check_model(model, where=str(path))
    return model.to(device)


def _one_line(exc: Exception, limit: int = 300) -> str:
    """An exception as one short line: torch's refusal of a pickle that holds more than tensors is a page of advice
    (to load it unsafely) around the one line that says what was found; other errors keep their first line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    found = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if found:
        what = found[0].removeprefix("WeightsUnpickler error:").split(". ")[0].strip()
        text = f"a pickle file that holds more than tensors, refused (loading it in full could run code): {what}"
    else:
        text = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {text}"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    if "trust_remote_code" in str(exc):  # transformers' remedy sits on a later line: say it in this codebase's terms
        text += " (the folder ships its own model code: train.py and distill.py run it only with --trust-remote-code)"
    return text


def prepare(model, *, device, dtype: torch.dtype | None = None, attention: str | None = None):
    """Move a freshly built preset to `device`/`dtype` and pick its attention implementation."""
    model.config._attn_implementation = attention or default_attention(device)
    check_model(model, where="preset")
    return model.to(device=device, dtype=dtype or default_dtype(device))


def check_model(model, *, where: str) -> None:
    """Refuse models the fused log-prob path would compute wrongly."""
    config = model.config
    for key in _UNSUPPORTED_HEAD:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ModelLoadError(f"{where}: {key}={value} changes the logits; token_logprobs does not support it")
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(f"{where}: the model has no linear LM head")
    if head.bias is not None:
        raise ModelLoadError(f"{where}: the LM head has a bias; token_logprobs takes a bias-free head")


def head_weight(model) -> torch.Tensor:
    """The LM-head weight (V, D); with tied embeddings the same Parameter as the input embeddings."""
    return model.get_output_embeddings().weight


def num_parameters(model) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_pretrained(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """Hugging Face format (safetensors + config + tokenizer) into `path` (callers make it atomic). `state_dict`
    replaces the model's own tensors (the full weights gathered from sharded ranks)."""
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(path))
