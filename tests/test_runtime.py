"""runtime/: flat CLI flags from a config dataclass, atomic checkpoint swaps, RNG state round trip."""

import json
import os
import random
from dataclasses import dataclass

import pytest
import torch

from runtime.checkpoint import _swap_in, recover, rng_states, set_rng_states
from runtime.config import ConfigError, from_dict, parse_config
from runtime.configs import TrainConfig as Config
from runtime.loop import batch_indices, lr_lambda


@dataclass
class Toy:
    group_size: int = 8  # samples per prompt
    lr: float = 1e-3  # learning rate
    name: str = "x"  # run name
    exception: bool = True  # a switch

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError("--group-size must be >= 2")


def test_flags_parse_and_report_what_was_given():
    cfg, given = parse_config(Toy, ["--group-size", "4", "--no-exception", "--lr=0.5"])
    assert cfg == Toy(group_size=4, lr=0.5, exception=False)
    assert given == {"group_size", "exception", "lr"}


@pytest.mark.parametrize("argv", [["--group-size", "1"], ["--group-size", "x"], ["--unknown", "1"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(Toy, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "usage" not in err and len(err.strip().splitlines()) == 1  # one line, no usage block


def test_help_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--help"])
    assert "samples per prompt" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])  # a help text with a literal % ("decay to 10%") is not a format error
    assert "cosine decay to 10% after warm-up" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_train_config_round_trip_and_unknown_keys():
    cfg = Config(group_size=4)
    assert from_dict(Config, cfg.__dict__.copy(), where="x") == cfg
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(Config, {**cfg.__dict__, "bogus": 1}, where="x")


def test_checkpoint_swap_and_recovery(tmp_path):
    path, old, tmp = tmp_path / "ckpt", tmp_path / "ckpt.old", tmp_path / "ckpt.tmp"
    tmp.mkdir()
    (tmp / "f").write_text("1")
    _swap_in(tmp, path)
    assert (path / "f").read_text() == "1" and not tmp.exists()
    # a crash between the two renames: only ckpt.old remains; recover puts it back
    os.replace(path, old)
    recover(path)
    assert (path / "f").read_text() == "1" and not old.exists()
    # a crash while writing: a half-written .tmp is dropped, the checkpoint stays
    tmp.mkdir()
    recover(path)
    assert not tmp.exists() and (path / "f").read_text() == "1"


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(3)
    state = rng_states(g)
    first = (random.random(), torch.rand(2), torch.rand(2, generator=g))
    set_rng_states(state, g)
    again = (random.random(), torch.rand(2), torch.rand(2, generator=g))
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_data_order_depends_on_step_only():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=0)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 3, seed=0) == batch_indices(10, 4, 3, seed=0)
    assert batch_indices(10, 4, 0, seed=0) != batch_indices(10, 4, 0, seed=1)


def test_lr_schedule_shapes():
    f = lr_lambda(total=10, warmup=2, kind="cosine")
    assert f(0) < f(1) < f(2) == 1.0
    assert f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
    assert lr_lambda(10, 0, "constant")(9) == 1.0
    assert lr_lambda(10, 0, "linear")(5) == pytest.approx(0.55)


def test_builtin_benchmark_is_regenerated_when_missing_or_of_another_version(tmp_path, monkeypatch):
    import data.synthetic
    from runtime.data import ensure_builtin

    calls = []

    def fake_write(out, seed):  # what write_benchmark leaves behind, in the order it writes it
        calls.append(out)
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        (out / "tokenizer" / "tokenizer.json").write_text("{}")
        (out / "rl.jsonl").write_text("")
        stats = {"version": data.synthetic.VERSION, "generator": data.synthetic.fingerprint()}
        (out / "stats.json").write_text(json.dumps(stats))

    monkeypatch.setattr(data.synthetic, "write_benchmark", fake_write)
    assert ensure_builtin(tmp_path) and len(calls) == 1  # missing
    assert not ensure_builtin(tmp_path) and len(calls) == 1  # current: kept
    (tmp_path / "stats.json").write_text('{"seed": 0}')  # version 1 wrote no version
    assert ensure_builtin(tmp_path) and len(calls) == 2
    (tmp_path / "stats.json").write_text("not json")  # an interrupted write: regenerate, never trust
    assert ensure_builtin(tmp_path) and len(calls) == 3
    stats = {"version": data.synthetic.VERSION, "generator": "older code"}  # same version, other generator code
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert ensure_builtin(tmp_path) and len(calls) == 4
    (tmp_path / "stats.json").write_text("[1, 2]")  # valid JSON, not an object
    assert ensure_builtin(tmp_path) and len(calls) == 5


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../../elsewhere/x", "/tmp/absolute", "a/b", ".hidden", "a\\b", "x" * 256]
)
def test_run_names_stay_inside_the_runs_folder(name, tmp_path, capsys):
    import ablate
    import distill
    import train

    for script in (train, distill, ablate):
        with pytest.raises(SystemExit) as exc:
            script.main(["--name", name, "--out-dir", str(tmp_path / "runs")])
        assert exc.value.code == 2 and "--name must be a plain folder name" in capsys.readouterr().err, script
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_numeric_flags_are_refused_at_parse_time(value, tmp_path, capsys):
    import ablate
    import distill
    import eval as eval_script
    import train

    calls = (
        (train, [f"--rl-lr={value}"]),
        (distill, [f"--lr={value}"]),
        (eval_script, [f"--temperature={value}"]),
        (ablate, [f"--base=--rl-lr={value}", "--out-dir", str(tmp_path)]),
    )
    for script, argv in calls:
        try:
            code = script.main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2 and "must be a finite number" in capsys.readouterr().err, (script, argv)
    assert not any(tmp_path.iterdir())  # nothing written


def test_checkpoint_files_follow_the_umask(tmp_path):
    from runtime.checkpoint import atomic_folder

    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "ckpt") as tmp:
            fd = os.open(tmp / "weights", os.O_CREAT | os.O_WRONLY, 0o600)  # as a private-file writer would
            os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt" / "weights").stat().st_mode & 0o777 == 0o644


def test_log_truncation_on_resume(tmp_path):
    from runtime.loop import Logger
    from runtime.parallel import Dist

    log = Logger(tmp_path, tensorboard=False)
    rows = [{"stage": "sft", "step": s} for s in (1, 2, 3)]
    keep = lambda row: row["step"] <= 2  # noqa: E731
    log.path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "sft", "st')  # torn by a kill
    log.resume(keep, Dist())
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    for damaged in ("not json\n", "[1, 2]\n", '{"step": "x"}\n'):  # invalid, or JSON that is not one of our rows
        log.path.write_text(damaged + json.dumps(rows[0]) + "\n")
        with pytest.raises(ConfigError, match="metrics.jsonl:1: not a"):
            log.resume(lambda row: row["stage"] == "sft" and row["step"] <= 2, Dist())


@pytest.mark.parametrize(
    "data,message",
    [
        ({"rules": "x"}, "'rules': business rules must be a non-empty JSON object"),
        ({"rules": {"a": 3}}, "'rules': rule 'a' must have a non-empty string description"),
        ({"with_instruction": "no"}, "'with_instruction' must be true or false, got 'no'"),
        ({"with_instruction": 1}, "'with_instruction' must be true or false"),
        ({"fmt": "poem"}, "'fmt' must be one of"),
        ({"fmt": ["criteria"]}, "'fmt' must be one of"),
        ({"colour": "red"}, "not readable prompt settings"),
        ([], "not readable prompt settings"),
    ],
)
def test_prompt_settings_values_are_type_checked(tmp_path, data, message):
    from model.hf import ModelLoadError
    from runtime.checkpoint import PromptSettings, read_prompt_settings

    (tmp_path / "prompt.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError) as info:
        read_prompt_settings(tmp_path)
    assert str(tmp_path / "prompt.json") in str(info.value) and message in str(info.value)
    good = {"fmt": "generic", "with_instruction": False, "rules": {"r": "text"}}
    (tmp_path / "prompt.json").write_text(json.dumps(good))
    assert read_prompt_settings(tmp_path) == PromptSettings(**good)


def test_restart_advice_says_what_was_checked():
    from runtime.loop import restart_advice

    ok = restart_advice("runs/x/sft", extra=" --stages rl")
    assert "--init runs/x/sft --stages rl --name <new name>" in ok
    assert "pass of the failing batch from it is finite" in ok
    unchecked = restart_advice("runs/x/ckpt", checked=False)
    assert "--init runs/x/ckpt --name" in unchecked and "not checked" in unchecked
    assert "from the beginning" in restart_advice(None) and "passes the check" in restart_advice(None)
    assert restart_advice(None, none_why="nothing yet").startswith("nothing yet. ")
    assert "--init" not in restart_advice("runs/x/ckpt", init_flag="")  # distill.py: no starting point
