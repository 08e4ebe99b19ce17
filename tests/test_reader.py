"""pretrain.py and runtime/reader.py: the corpus, the count targets, a tiny build that loads, the stale-reader error."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import distill
import pretrain
import train
from data.synthetic import VERSION, make_record
from model.hf import load_model, load_tokenizer, num_parameters
from runtime.reader import (
    DEFAULT_READER,
    DEFAULT_STUDENT,
    READER_FILE,
    check_reader,
    corpus_stream,
    earlier_counts,
    vocabulary_hash,
)
from sam.parse import parse_scores
from sam.prompt import render_gold_reasoning

SIZES = {"sft": 8, "rl": 8, "val": 4, "test_random": 4, "test_longtail": 4}


@pytest.fixture(scope="module")
def bench(make_bench):
    return make_bench(SIZES)


@pytest.fixture(scope="module")
def reader(bench, tmp_path_factory):
    """A reader built by the real recipe at a tiny size (seconds)."""
    out = tmp_path_factory.mktemp("reader") / "reader"
    argv = ["--data-dir", str(bench), "--out", str(out), "--preset", "nano", "--steps", "4", "--batch-size", "4"]
    assert pretrain.main([*argv, "--eval-every", "2", "--eval-texts", "4", "--no-progress"]) == 0
    return out


def test_earlier_counts_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (3, 17), generator=gen)
    where = torch.rand(3, 17, generator=gen) < 0.6
    got = earlier_counts(ids, where, cap=3)
    for b in range(3):
        for i in range(17):
            n = sum(int(ids[b, j] == ids[b, i] and where[b, j]) for j in range(i))
            assert got[b, i] == min(n, 3)


def test_corpus_holds_no_label_score_case_or_trace(bench):
    tok = load_tokenizer(bench / "tokenizer")
    stream = corpus_stream(0)
    # trace words, step values (need, coverage levels, category verdicts) and every business-rule case name
    banned = ("Step", "boxed", "coverage", "initial", "calibrat", "final", "match", "differ", "label", "need")
    banned += ("broad", "precise", "large", "partial", "mention", "none", "kept", "dropped", "one side", "short")
    banned += ("answered", " off", "guide", "other place", "details", "other model", "exact")
    for _ in range(200):
        text, (lo, hi) = next(stream)
        assert not any(word in text for word in banned), text
        assert text.endswith("Answer:\n") and text[lo:hi].endswith(".")  # the span is the content line
        assert text[:lo].endswith("\nNote content: ") and text[hi:].startswith("\nNote tags:")
    # the mention count at the query subject line is the number of content sentences naming the subject
    rng = random.Random(1)
    for i in range(30):
        record = make_record(rng, "pretrain", i, "random")
        items = [pretrain_item(record)]
        ids, _, counts = pretrain.encode_batch(items, tok, 7, "cpu")
        subject = tok(" " + record.query_extra["subject"], add_special_tokens=False)["input_ids"]
        assert len(subject) == 1
        at = (ids[0] == subject[0]).nonzero().flatten()[-1]  # the `Query subject:` line's word
        level = {0: "none", 1: "mention", 2: "partial", 3: "partial"}.get(int(counts[0, at, 1]), "large")
        assert level == record.gold["coverage"]


def pretrain_item(record):
    from sam.prompt import render_prompt

    text = render_prompt(record, with_instruction=False)
    lo = text.index(record.note["content"])
    return text, (lo, lo + len(record.note["content"]))


def test_reader_builds_loads_and_trains(reader, bench, tmp_path):
    info = json.loads((reader / READER_FILE).read_text())
    assert info["world_version"] == VERSION and info["recipe"]["steps"] == 4 and len(info["history"]) == 2
    assert info["vocabulary"] == vocabulary_hash(load_tokenizer(bench / "tokenizer"))
    model = load_model(reader)  # a plain causal LM (load_model refuses unexpected tensors): no probe head saved
    assert type(model).__name__ == "Qwen2ForCausalLM" and num_parameters(model) == info["parameters"]
    with safe_open(reader / "model.safetensors", "pt") as f:
        assert set(f.keys()) <= set(model.state_dict()) and not any("probe" in k for k in f.keys())
    assert json.loads((reader / "prompt.json").read_text())["with_instruction"] is False
    check_reader(reader, bench)
    argv = ["--data-dir", str(bench), "--out-dir", str(tmp_path), "--model", str(reader), "--no-progress"]
    argv += ["--stages", "sft", "--sft-steps", "2", "--sft-batch-size", "2", "--val-limit", "2", "--test-splits", ""]
    assert train.main(argv) == 0


def test_stale_reader_is_refused_in_one_line(reader, bench, tmp_path, capsys, make_teacher):
    stale = tmp_path / "stale"
    stale.mkdir()
    for f in reader.iterdir():
        (stale / f.name).write_bytes(f.read_bytes())
    argv = ["--data-dir", str(bench), "--out-dir", str(tmp_path), "--model", str(stale), "--no-progress"]
    argv += ["--stages", "sft", "--sft-steps", "1", "--test-splits", ""]
    info = json.loads((reader / READER_FILE).read_text())
    for change, message in (
        ({"world_version": VERSION - 1}, f"world version {VERSION - 1}"),
        ({"vocabulary": "0" * 12}, "vocabulary"),
        ({"world_version": "2"}, "not a readable reader record"),
    ):
        (stale / READER_FILE).write_text(json.dumps({**info, **change}))
        capsys.readouterr()
        assert train.main([*argv, "--name", "s"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s" / "sft").exists()  # refused before training
    # distill.py checks its student the same way
    teacher = make_teacher(bench)
    argv = ["--data-dir", str(bench), "--out-dir", str(tmp_path), "--teacher", str(teacher), "--student", str(stale)]
    assert distill.main([*argv, "--name", "d", "--no-progress"]) == 2
    assert "not a readable reader record" in capsys.readouterr().err


def test_shipped_readers_match_this_world(bench):
    # editing the generator's texts (the instruction, the templates) can change the benchmark tokenizer's
    # vocabulary: the shipped readers must then be rebuilt (README), and this test says so first
    for folder in (DEFAULT_READER, DEFAULT_STUDENT):
        check_reader(folder, bench)
        assert json.loads((Path(folder) / READER_FILE).read_text())["world_version"] == VERSION


def test_pretrain_refuses_bad_flags(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    for argv, message in (
        (["--out", str(tmp_path / "file")], "not a folder"),
        (["--out", str(tmp_path / "run")], "not a reader"),  # a build never replaces a folder it did not write
        (["--steps", "0"], "--steps"),
        (["--preset", "huge"], "--preset"),
        (["--lr", "nan"], "finite"),
    ):
        with pytest.raises(SystemExit) as exc:
            pretrain.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_grounded_trace_names_the_subject_and_category(bench):
    from data.schema import read_jsonl

    for r in read_jsonl(bench / "sft.jsonl"):
        for trace in (r.reasoning, render_gold_reasoning(r)):
            lines = trace.splitlines()
            assert lines[1].startswith(f"Step 2: coverage {r.query_extra['subject']} ")
            assert lines[2].startswith(f"Step 3: category {r.query_extra['category']} ")
            assert parse_scores(trace).ok
