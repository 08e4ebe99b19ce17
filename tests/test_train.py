"""train.py and eval.py end to end on a slice of the built-in benchmark (CPU): a tiny run, exact resume, the
bad-input table, a non-finite loss, the Hugging Face path with a byte-level BPE tokenizer trained on the fly, and
the mini-convergence check of the fused kernels against their references inside a training loop."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import eval as eval_script
import model.sampling
import runtime.loop
import train
from data.schema import read_jsonl
from grm_kernels import policy_loss, policy_loss_normalizer
from model.hf import load_tokenizer
from model.sampling import pad_left, pad_right, response_logprobs
from runtime.checkpoint import load_trainer_state
from sam.prompt import render_gold_reasoning, render_prompt

SIZES = {"sft": 24, "rl": 16, "val": 6, "test_random": 6, "test_longtail": 6}


@pytest.fixture(scope="module")
def bench(make_bench):
    return make_bench(SIZES)


# a tiny run: a third of an SFT epoch, 2 RL steps of 2 prompts x 2 samples, a few validation and test records
FAST = "--no-progress --sft-epochs 0.33 --sft-batch-size 4 --rl-steps 2 --prompts-per-step 2 --group-size 2"
FAST += " --val-limit 4 --test-limit 3 --eval-every 100 --micro-batch 3"


def fast_args(bench, out, *extra):
    return ["--data-dir", str(bench), "--out-dir", str(out), *FAST.split(), *extra]


GENERIC = ["--fmt", "generic", "--max-new-tokens", "64"]


def metric_rows(run_dir):
    drop = ("_s", "tokens_per_s")  # wall-clock fields differ between runs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in rows]


def test_tiny_end_to_end_run_and_eval(bench, tmp_path, capsys, monkeypatch):
    # every row the loop sends to the LM-head kernel is a response token it uses (model.sampling.response_rows):
    # none is an ignored (padding or post-EOS) row, in SFT, the rollouts' old log-probs and the RL update
    sent = []

    def recording(hidden, weight, targets, **kw):
        assert not (targets == -100).any(), "a row outside the response reached token_logprobs"
        sent.append(targets.shape[0])
        return real(hidden, weight, targets, **kw)

    real = model.sampling.token_logprobs
    monkeypatch.setattr(model.sampling, "token_logprobs", recording)
    validations = []
    real_validate = train.Run.validate
    monkeypatch.setattr(train.Run, "validate", lambda self: validations.append(1) or real_validate(self))
    assert train.main(fast_args(bench, tmp_path, "--name", "e2e", "--max-new-tokens", "136")) == 0
    assert len(sent) >= 4 and all(n > 0 for n in sent)
    run = tmp_path / "e2e"
    for name in (
        "config.json",
        "metrics.jsonl",
        "eval_sft.json",
        "eval_rl.json",
        "results.json",
        "ckpt/trainer_state.pt",
        "ckpt/model.safetensors",
        "ckpt/tokenizer.json",
        "sft/prompt.json",
        "best/config.json",
    ):
        assert (run / name).exists(), name
    rows = metric_rows(run)
    assert [r["step"] for r in rows if r["stage"] == "sft"] == [1, 2]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [0, 1, 2]
    # RL's step 0 reports the warm-up's last validation (same weights), computed once: SFT's end, then RL step 2
    val_keys = [k for k in rows[1] if k.startswith("val/")]
    assert val_keys and {k: rl[0][k] for k in val_keys} == {k: rows[1][k] for k in val_keys}
    assert len(validations) == 2
    for key in (
        "reward",
        "accuracy",
        "malformed_rate",
        "pl/masked_frac",
        "pl/clip_frac_low",
        "sam/seg_masked_frac_pos",
        "adv/zero_variance_frac",
        "val/accuracy",
        "lr",
        "grad_norm",
    ):
        assert key in rl[-1], key
    assert rows[0]["loss"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run / "curves.png").exists()
    out = capsys.readouterr().out
    assert "sft warm-up" in out and "after RL" in out and "test_longtail" in out
    tests = json.loads((run / "eval_rl.json").read_text())
    assert set(tests) == {"test_random", "test_longtail"} and tests["test_random"]["n"] == 3

    # eval.py on the best checkpoint, with the prompt settings saved beside it
    out_json = tmp_path / "eval.json"
    argv = [
        "--checkpoint",
        str(run / "best"),
        "--data-dir",
        str(bench),
        "--limit",
        "3",
        "--out",
        str(out_json),
        "--max-new-tokens",
        "136",
    ]
    assert eval_script.main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["with_instruction"] is False and result["fmt"] == "criteria"
    m = result["results"]["test_random"]
    for key in (
        "accuracy",
        "macro_f1",
        "per_class_f1",
        "binary_accuracy",
        "binary_f1",
        "confusion",
        "malformed_rate",
        "accuracy_by_type",
        "examples_per_s",
    ):
        assert key in m, key

    # eval.py's bad input: one line and exit 2, before any evaluation (no traceback, nothing written)
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    bad = {
        "--limit -7": (["--limit", "-7"], "--limit >= 0"),
        "--device tpu": (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
        "--out under a file": (["--out", str(tmp_path / "a-file" / "x.json")], "cannot write there"),
        "--out a folder": (["--out", str(tmp_path)], "is a folder"),
        "an empty model folder": (["--checkpoint", str(tmp_path / "empty")], "not a Hugging Face model directory"),
    }
    if not torch.cuda.is_available():
        bad["--device cuda"] = (["--device", "cuda"], "this machine has 0 CUDA device(s)")
    for case, (extra, message) in bad.items():
        code = call_main(eval_script.main, [*argv, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, case
    assert not (tmp_path / "a-file").is_dir()


@pytest.mark.parametrize("micro, update_group", [(2, 2), (3, 1)])
def test_rl_reads_each_prompt_once_per_group_where_micro_batches_hold_whole_groups(
    bench, tmp_path, capsys, monkeypatch, micro, update_group
):
    """Sampling always reads a group's prompt once; the update (log-probs of the policy and, with a KL term, of the
    reference) does where --micro-batch is a multiple of --group-size, and says so where it is not."""
    import runtime.session

    groups = {"sample": [], "update": []}

    def sampling(*args, **kw):
        groups["sample"].append(kw.get("group", 1))
        return real_generate(*args, **kw)

    def update(*args, **kw):
        groups["update"].append(kw.get("group", 1))
        return response_logprobs(*args, **kw)

    real_generate = runtime.session.generate
    monkeypatch.setattr(runtime.session, "generate", sampling)
    monkeypatch.setattr(train, "response_logprobs", update)
    argv = ["--stages", "rl", "--rl-steps", "1", "--kl-coef", "0.1", "--test-splits", "", "--name", f"g{micro}"]
    assert train.main(fast_args(bench, tmp_path, *argv, "--micro-batch", str(micro))) == 0
    assert groups["sample"] and set(groups["sample"]) == {2}  # validation samples through runtime.evaluate, not here
    assert len(groups["update"]) == 2 * (4 // micro + (4 % micro > 0)) and set(groups["update"]) == {update_group}
    assert ("is not a multiple of --group-size" in capsys.readouterr().err) == (update_group == 1)


def test_resume_refuses_changed_data_and_survives_a_torn_log_line(bench, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(bench, data)
    args = fast_args(data, tmp_path, *GENERIC, "--name", "r", "--stages", "sft", "--sft-epochs", "0.5")
    assert train.main([*args, "--halt-after", "1"]) == 0
    assert set(load_trainer_state(tmp_path / "r" / "ckpt")["data"]) == {"sft", "val", "test_random", "test_longtail"}
    # a split lost records since the run started: refused, naming the split and both fingerprints
    original = (data / "sft.jsonl").read_text()
    (data / "sft.jsonl").write_text("".join(original.splitlines(keepends=True)[:-4]))
    assert train.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the data changed since" in err and "'sft' was 24 lines" in err and "now 20 lines" in err
    # the same data again, and a log whose last line was cut by a kill: the resume drops the torn line and goes on
    (data / "sft.jsonl").write_text(original)
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "sft", "st')
    assert train.main([*args, "--resume"]) == 0
    assert [r["step"] for r in metric_rows(tmp_path / "r")] == [1, 2, 3]
    # a damaged line inside the log is a clear error, not a traceback
    log = tmp_path / "r" / "metrics.jsonl"
    log.write_text("garbage\n" + log.read_text())
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl:1: not a JSON line" in err and "Traceback" not in err


def test_controls_selection_sampled_eval_and_paired_interval(bench, tmp_path, capsys):
    # the random-mask control with gold-box verdicts, the best-validation checkpoint, 2 samples per test record
    args = fast_args(
        bench,
        tmp_path,
        "--name",
        "ctl",
        "--max-new-tokens",
        "80",
        "--policy",
        "random",
        "--verdicts",
        "gold-box",
        "--select",
        "best",
        "--eval-temperature",
        "0.6",
        "--eval-samples",
        "2",
    )
    assert train.main(args) == 0
    run = tmp_path / "ctl"
    out = capsys.readouterr().out
    assert "testing the best validation checkpoint" in out and "RL - warm-up on test_random: accuracy" in out
    rl = [r for r in metric_rows(run) if r["stage"] == "rl" and r["step"] > 0]
    for key in (
        "sam/tok_masked_frac",
        "sam/kept_weight_gain",
        "sam/weight_change",
        "pass_at_group",
        "informative_groups",
    ):
        assert key in rl[-1], key
    assert 0 <= rl[-1]["informative_groups"] <= rl[-1]["pass_at_group"] <= 1
    preds = [json.loads(line) for line in (run / "predictions_rl.jsonl").read_text().splitlines()]
    assert sorted(p["sample"] for p in preds if p["split"] == "test_random") == [0, 0, 0, 1, 1, 1]
    tests = json.loads((run / "eval_rl.json").read_text())
    m = tests["test_random"]
    assert m["samples"] == 2 and m["pass_at_k"] >= m["accuracy"]
    paired = json.loads((run / "results.json").read_text())["rl_minus_sft"]
    assert set(paired) == {"test_random", "test_longtail"}
    for d in paired.values():
        assert d["lo"] <= d["diff"] <= d["hi"] and d["n"] == 3
    # the pre-RL gate figures from eval.py: pass@K >= pass@1, informative groups <= pass@K
    out_json = tmp_path / "gate.json"
    argv = [
        "--checkpoint",
        str(run / "sft"),
        "--data-dir",
        str(bench),
        "--splits",
        "rl",
        "--limit",
        "4",
        "--temperature",
        "1",
        "--samples",
        "3",
        "--max-new-tokens",
        "80",
        "--out",
        str(out_json),
    ]
    assert eval_script.main(argv) == 0
    m = json.loads(out_json.read_text())["results"]["rl"]
    assert m["samples"] == 3 and m["accuracy"] <= m["pass_at_k"] and m["informative_frac"] <= m["pass_at_k"]
    with pytest.raises(SystemExit) as exc:  # greedy answers repeat: several samples make no sense
        eval_script.main(["--checkpoint", str(run / "sft"), "--samples", "2"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        train.main(fast_args(bench, tmp_path, "--name", "bad", "--eval-samples", "2", "--eval-temperature", "0"))
    assert exc.value.code == 2 and "--eval-samples > 1 needs --eval-temperature > 0" in capsys.readouterr().err


def test_resume_is_exact(bench, tmp_path):
    common = fast_args(bench, tmp_path, *GENERIC, "--rl-steps", "3", "--save-every", "100")
    assert train.main([*common, "--name", "whole"]) == 0
    # the same run cut twice: inside SFT (after 1 step) and inside RL (after SFT's 2nd step and 1 RL step)
    assert train.main([*common, "--name", "cut", "--halt-after", "1"]) == 0
    assert load_trainer_state(tmp_path / "cut" / "ckpt")["step"] == 1
    assert train.main([*common, "--name", "cut", "--resume", "--halt-after", "2"]) == 0
    state = load_trainer_state(tmp_path / "cut" / "ckpt")
    assert (state["stage"], state["step"]) == ("rl", 1)
    assert train.main([*common, "--name", "cut", "--resume"]) == 0
    whole = load_file(tmp_path / "whole" / "ckpt" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "ckpt" / "model.safetensors")
    assert whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key
    assert metric_rows(tmp_path / "whole") == metric_rows(tmp_path / "cut")
    # a resumed run keeps its settings
    assert train.main([*common, "--name", "cut", "--resume", "--rl-lr", "1"]) == 2

    # a crafted trainer state cannot run code on --resume, and a truncated one is one line and exit 2
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "evil")
    marker = tmp_path / "ran"
    state_file = tmp_path / "evil" / "ckpt" / "trainer_state.pt"
    torch.save({"step": 1, "payload": _Payload(marker)}, state_file)
    assert train.main([*common, "--name", "evil", "--resume"]) == 2
    assert not marker.exists()
    state_file.write_bytes((tmp_path / "cut" / "ckpt" / "trainer_state.pt").read_bytes()[:100])
    assert train.main([*common, "--name", "evil", "--resume"]) == 2


class _Payload:
    """Pickles as a call that creates a file: what a crafted checkpoint would do with a full unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_run_folder_lock_and_a_run_interrupted_before_its_first_checkpoint(bench, tmp_path, capsys):
    import fcntl

    # another process holds the folder: refused (exit 2) before anything in it is touched (a live run's ckpt.tmp)
    busy = tmp_path / "busy"
    (busy / "ckpt.tmp").mkdir(parents=True)
    with open(busy / runtime.loop.LOCK_FILE, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(fast_args(bench, tmp_path, "--name", "busy")) == 2
        assert "in use by another running process" in capsys.readouterr().err
        assert (busy / "ckpt.tmp").exists() and not (busy / "metrics.jsonl").exists()
    # killed before its first checkpoint (a log, no checkpoint, no results): a fresh start proceeds and says so;
    # --resume says there is nothing to resume and how to start
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 9.0}) + "\n")
    assert train.main(fast_args(bench, tmp_path, "--name", "stuck", "--resume")) == 2
    assert "starts afresh without --resume" in capsys.readouterr().err
    assert train.main(fast_args(bench, tmp_path, "--name", "stuck", "--stages", "sft", "--halt-after", "1")) == 0
    assert "interrupted before its first checkpoint; starting it afresh" in capsys.readouterr().out
    rows = metric_rows(stuck)
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] != 9.0
    # with a checkpoint the folder holds a run again: a fresh start is refused, naming what it holds
    assert train.main(fast_args(bench, tmp_path, "--name", "stuck")) == 2
    assert "already holds a run (ckpt)" in capsys.readouterr().err


def test_an_out_dir_that_is_a_file_is_one_line(bench, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert train.main(fast_args(bench, blocker, "--name", "r")) == 2
    err = capsys.readouterr().err
    assert "cannot create the run folder" in err and "Traceback" not in err


def test_a_non_finite_update_stops_before_a_checkpoint(bench, tmp_path, capsys):
    # a finite loss, but the step sends weights to inf (a huge learning rate with weight decay): exit 3 at that step,
    # no checkpoint written from it
    huge = ["--sft-lr", "3e37", "--weight-decay", "10", "--sft-warmup", "0"]
    argv = fast_args(bench, tmp_path, *GENERIC, "--name", "huge", *huge)
    assert train.main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite update at sft step 0" in err
    # no checkpoint was written: the advice names the model the run started from (the default reader)
    assert "--init models/reader --name <new name>" in err
    # from a preset there is no folder to name, and the advice says why
    assert train.main(fast_args(bench, tmp_path, *GENERIC, "--name", "huge2", "--model", "tiny", *huge)) == 3
    err = capsys.readouterr().err
    assert "no checkpoint had been written yet and the run started from a preset" in err and "--init" not in err
    assert not list((tmp_path / "huge").glob("**/model.safetensors"))


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _bad_split(bench, tmp_path, transform):
    """A copy of the benchmark whose rl split is transform(lines of rl.jsonl)."""
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(bench, out)
    lines = (bench / "rl.jsonl").read_text().splitlines()
    _write(out / "rl.jsonl", transform(lines))
    return out


def _label(lines, value):
    obj = json.loads(lines[1])
    obj["label"] = value
    return [lines[0], json.dumps(obj), *lines[2:]]


BAD = {
    "missing model": (["--model", "{tmp}/nope"], "model directory not found"),
    "not a causal LM": (["--model", "{tmp}/notlm"], "cannot load a causal LM"),
    "no config": (["--model", "{tmp}/empty"], "not a Hugging Face model directory"),
    "unknown preset-like path": (["--init", "{tmp}/nope"], "model directory not found"),
    "malformed jsonl": ("broken", "rl.jsonl:2: not valid JSON"),
    "empty jsonl": ("empty", "has no records"),
    "label out of range": ("label7", "rl.jsonl:2: 'label' must be an integer in -1..3"),
    "label as float": ("label2.0", "'label' must be an integer"),
    "missing split": (["--rl-split", "nosuch"], "split 'nosuch' not found"),
    "prompt too long": (["--max-prompt-tokens", "20"], "longer than --max-prompt-tokens 20"),
    "trace longer than budget": (["--max-new-tokens", "20"], "longer than --max-new-tokens 20"),
    "resume without run": (["--resume"], "no resumable checkpoint"),
    "token policy without box tokens": (["--policy", "token"], "go together"),
    "learning rate past float32": (["--sft-lr", "1e300"], "--sft-lr must be > 0 and at most 3.4e+37"),
    "decay past float32": (["--weight-decay", "1e300"], "x --weight-decay 1e+300 must be at most"),
}
TRANSFORMS = {
    "broken": lambda lines: [lines[0], "{not json", *lines[2:]],
    "empty": lambda lines: [],
    "label7": lambda lines: _label(lines, 7),
    "label2.0": lambda lines: _label(lines, 2.0),
}


def call_main(main, argv) -> int:
    """Exit code of a script's main(), whether it returns one or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_clearly_before_training(bench, tmp_path, capsys, case):
    args, message = BAD[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notlm").mkdir()
    (tmp_path / "notlm" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    data = bench
    if isinstance(args, str):
        data, args = _bad_split(bench, tmp_path, TRANSFORMS[args]), []
    argv = fast_args(data, tmp_path / "runs", *[a.format(tmp=tmp_path) for a in args], "--name", "bad")
    assert call_main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()


def test_long_prompts_can_be_skipped_and_counted(bench, tmp_path):
    tok = load_tokenizer(bench / "tokenizer")

    def lengths(split, n):
        return [
            len(tok(render_prompt(r, "generic", with_instruction=False))["input_ids"])
            for r in read_jsonl(bench / f"{split}.jsonl")[:n]
        ]

    val, test = lengths("val", 4), lengths("test_random", 3)
    limit = max(min(val), min(test), min(lengths("test_longtail", 3)), min(lengths("sft", 24)))  # each keeps one
    argv = fast_args(
        bench,
        tmp_path,
        *GENERIC,
        "--name",
        "skip",
        "--stages",
        "sft",
        "--long-prompts",
        "skip",
        "--max-prompt-tokens",
        str(limit),
        "--sft-epochs",
        "0.2",
    )
    assert sum(n > limit for n in test) > 0, "the chosen limit must skip something in test_random"
    assert train.main(argv) == 0
    result = json.loads((tmp_path / "skip" / "eval_sft.json").read_text())
    assert result["test_random"]["skipped_long_prompts"] == sum(n > limit for n in test)
    assert result["test_random"]["n"] == sum(n <= limit for n in test)
    argv = [a if a != "skip" else "error" for a in argv]  # the same limit under the default policy is an error
    assert train.main([*argv, "--name", "skip2"]) == 2


def test_non_finite_loss_stops_and_keeps_the_checkpoint(bench, tmp_path, monkeypatch, capsys):
    argv = fast_args(bench, tmp_path, *GENERIC, "--name", "nan")
    assert train.main([*argv, "--halt-after", "1"]) == 0
    before = load_file(tmp_path / "nan" / "ckpt" / "model.safetensors")

    calls = []

    def poisoned(*args, **kwargs):  # one bad forward pass (the step's); the restart check computes it again
        calls.append(1)
        return response_logprobs(*args, **kwargs) * (float("nan") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(train, "response_logprobs", poisoned)
    assert train.main([*argv, "--resume"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err
    assert load_trainer_state(tmp_path / "nan" / "ckpt")["step"] == 1
    after = load_file(tmp_path / "nan" / "ckpt" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the advice can be followed: a new run from the named checkpoint, with a lower learning rate
    ckpt = str(tmp_path / "nan" / "ckpt")
    assert f"--init {ckpt} --name <new name>" in err
    monkeypatch.undo()
    assert (
        train.main(
            [
                *fast_args(bench, tmp_path, *GENERIC, "--name", "nan2", "--init", ckpt, "--sft-lr", "1e-4"),
                "--halt-after",
                "1",
            ]
        )
        == 0
    )


def _bpe_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def test_hugging_face_model_with_bpe_tokenizer(bench, tmp_path):
    records = read_jsonl(bench / "sft.jsonl") + read_jsonl(bench / "rl.jsonl")
    texts = [render_prompt(r, "generic", with_instruction=False) + render_gold_reasoning(r, "generic") for r in records]
    tok = _bpe_tokenizer(texts)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model_dir = tmp_path / "hf"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = fast_args(
        bench,
        tmp_path,
        *GENERIC,
        "--name",
        "hf",
        "--model",
        str(model_dir),
        "--instruction",
        "none",
        "--max-prompt-tokens",
        "1024",
        "--max-new-tokens",
        "96",
    )
    assert train.main(argv) == 0
    rows = metric_rows(tmp_path / "hf")
    assert any(r["stage"] == "rl" and r["step"] == 2 for r in rows)
    saved = json.loads((tmp_path / "hf" / "ckpt" / "config.json").read_text())
    assert saved["vocab_size"] == len(tok) and saved["tie_word_embeddings"] is False


def test_mini_convergence_fused_equals_reference(bench):
    """A few optimizer steps (SFT NLL, then the SAM policy loss) with impl="ref" and impl="triton" (the Triton
    interpreter on the CPU) give the same losses and parameters."""
    tok = load_tokenizer(bench / "tokenizer")
    records = read_jsonl(bench / "sft.jsonl")[:4]
    prompts = [tok(render_prompt(r, "generic", with_instruction=False))["input_ids"] for r in records]
    targets = [tok(render_gold_reasoning(r, "generic"))["input_ids"] + [tok.eos_token_id] for r in records]
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        tie_word_embeddings=True,
    )
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id, "cpu")
    c_ids, c_mask = pad_right(targets, tok.pad_token_id, "cpu")
    B, T = c_ids.shape
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(B, generator=g)
    keep = (torch.rand(B, 3, generator=g) > 0.3).float()
    step_id = torch.where(c_mask, torch.arange(T) * 3 // T, -1).int().reshape(-1)
    seq_id = torch.arange(B).repeat_interleave(T)
    norm = policy_loss_normalizer(seq_id, step_id, keep)

    def run(impl):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        old = None
        losses = []
        for step in range(4):
            logp = response_logprobs(model, p_ids, p_mask, c_ids, c_mask, impl=impl)
            if step < 2:  # SFT
                loss = -(logp * c_mask).sum() / c_mask.sum()
            else:  # policy loss with old log-probs from before the first RL update (ratios != 1 at step 3)
                old = logp.detach().reshape(-1) if old is None else old
                loss, _ = policy_loss(logp.reshape(-1), old, adv, seq_id, step_id, keep, normalizer=norm, impl=impl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    ref_losses, ref_params = run("ref")
    fused_losses, fused_params = run("triton")
    assert fused_losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    for key in ref_params:
        torch.testing.assert_close(fused_params[key], ref_params[key], atol=1e-4, rtol=1e-4, msg=key)
    assert ref_losses[1] < ref_losses[0]  # the steps do train


def test_triton_without_cuda_or_interpreter_is_a_clear_error(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime.loop, "INTERPRET", False)
    assert train.main(fast_args(bench, tmp_path, "--name", "t", "--impl", "triton")) == 2
    assert "--impl triton needs a CUDA device" in capsys.readouterr().err


def test_learnability_probe_runs_and_scores_lines(bench, tmp_path, capsys):
    from bench import learnability

    assert learnability.main(["--data-dir", str(bench), "--steps", "2", "--every", "2", "--val", "3"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "2" and len(row) == 1 + 1 + 7 + 1 and all(0 <= float(a) <= 1 for a in row[2:9])
    with pytest.raises(SystemExit):
        learnability.main(["--data-dir", str(bench), "--lr", "nan"])
    with pytest.raises(SystemExit):
        learnability.main(["--data-dir", str(bench / "missing")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # --model: a folder that holds no model is one line, exit 2
        learnability.main(["--data-dir", str(bench), "--model", str(tmp_path)])
    assert exc.value.code == 2 and "not a Hugging Face model directory" in capsys.readouterr().err


def test_sft_steps_sets_the_warm_up_length(bench, tmp_path):
    # --sft-steps overrides --sft-epochs: ablate.py's more-sft control takes exactly an RL run's optimizer steps
    argv = fast_args(bench, tmp_path, "--name", "steps", "--stages", "sft", "--sft-steps", "3", "--test-splits", "")
    assert train.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "steps" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "val/accuracy" in rows[-1]


def test_init_takes_a_run_and_instruction_overrides_its_prompt_json(bench, tmp_path, capsys):
    # a run's warm-up checkpoint as --init: --instruction overrides the prompt.json saved beside it, and `auto`
    # (the default) takes it; each run writes the settings it used beside its own checkpoint
    one = ["--stages", "sft", "--sft-steps", "1", "--max-prompt-tokens", "1024"]
    assert train.main(fast_args(bench, tmp_path, *one, "--name", "a", "--test-splits", "")) == 0
    prompt = lambda name: json.loads((tmp_path / name / "sft" / "prompt.json").read_text())["with_instruction"]
    assert prompt("a") is False
    init = ["--init", str(tmp_path / "a" / "sft")]
    assert train.main(fast_args(bench, tmp_path, *one, *init, "--instruction", "full", "--name", "b")) == 0
    assert prompt("b") is True and (tmp_path / "b" / "eval_sft.json").exists()
    assert "instruction on" in capsys.readouterr().out
    init = ["--init", str(tmp_path / "b" / "sft")]
    assert train.main(fast_args(bench, tmp_path, *one, *init, "--name", "c", "--test-splits", "")) == 0
    assert prompt("c") is True and "instruction on" in capsys.readouterr().out


def test_a_copied_or_renamed_run_resumes_in_its_own_folder(bench, tmp_path):
    import shutil

    common = fast_args(bench, tmp_path, *GENERIC, "--save-every", "100")
    assert train.main([*common, "--name", "xa", "--halt-after", "1"]) == 0
    shutil.copytree(tmp_path / "xa", tmp_path / "xb")
    before = {p: p.read_bytes() for p in sorted((tmp_path / "xa").rglob("*")) if p.is_file()}
    assert train.main([*common, "--name", "xb", "--resume"]) == 0
    # the original is untouched: same files, same bytes; the copy finished in its own folder
    after = {p: p.read_bytes() for p in sorted((tmp_path / "xa").rglob("*")) if p.is_file()}
    assert after == before
    assert (tmp_path / "xb" / "results.json").exists() and not (tmp_path / "xa" / "results.json").exists()
    assert json.loads((tmp_path / "xb" / "config.json").read_text())["name"] == "xb"
    # a renamed folder resumes where it is now, to the same weights as the copy
    (tmp_path / "xa").rename(tmp_path / "xc")
    assert train.main([*common, "--name", "xc", "--resume"]) == 0
    b = load_file(tmp_path / "xb" / "ckpt" / "model.safetensors")
    c = load_file(tmp_path / "xc" / "ckpt" / "model.safetensors")
    assert b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)
    assert not (tmp_path / "xa").exists()


def test_a_non_finite_stop_names_a_checkpoint_a_new_run_can_start_from(bench, tmp_path, capsys):
    # a learning rate that diverges over many steps: the weights stay finite for a while, then a step's gradient is
    # NaN. The last checkpoint holds those very weights (saved every step), so the advice must not name it: it names
    # the model the stage began from, and the advised command (a lower learning rate) runs
    import re

    sft = ["--stages", "sft", "--sft-batch-size", "4", "--save-every", "1", "--lr-schedule", "constant"]
    assert train.main(fast_args(bench, tmp_path, *GENERIC, *sft, "--name", "base", "--sft-steps", "2")) == 0
    start = str(tmp_path / "base" / "sft")
    diverge = ["--init", start, "--sft-steps", "40", "--sft-lr", "10", "--name", "blown"]
    assert train.main(fast_args(bench, tmp_path, *GENERIC, *sft, *diverge)) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and (tmp_path / "blown" / "ckpt").exists(), err
    named = re.search(r"--init (\S+) --stages sft --name <new name>", err).group(1)  # an SFT-only run stays one
    assert named == start, err
    advised = ["--init", named, "--sft-steps", "3", "--sft-lr", "1e-3", "--name", "again"]
    assert train.main(fast_args(bench, tmp_path, *GENERIC, *sft, *advised)) == 0
    # the run's own last checkpoint fails at once with the same advice followed: that is why it is not named
    stuck = ["--init", str(tmp_path / "blown" / "ckpt"), "--sft-steps", "3", "--sft-lr", "1e-3", "--name", "stuck"]
    assert train.main(fast_args(bench, tmp_path, *GENERIC, *sft, *stuck)) == 3
