"""ablate.py end to end on a slice of the built-in benchmark (CPU): a 2-arm x 2-seed sweep with tiny runs, its
report files, the skip of finished runs, resuming an interrupted run, refusing changed flags, the bad-input table,
and the statistics against hand computations."""

import csv
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ablate
from sam import metrics
from sam.metrics import relevance_metrics

SIZES = {"sft": 24, "rl": 16, "val": 6, "test_random": 8, "test_longtail": 8}
TINY = (
    "--model nano --sft-epochs 0.33 --sft-batch-size 4 --rl-steps 2 --prompts-per-step 2 --group-size 2 "
    "--val-limit 4 --eval-every 1 --micro-batch 4 --max-new-tokens 136 --test-limit 6"
)


@pytest.fixture(scope="module")
def bench(make_bench):
    return make_bench(SIZES)


def arms_file(tmp_path, arms):
    path = tmp_path / "arms.json"
    path.write_text(json.dumps(arms))
    return str(path)


ARMS = {
    "warm": {"warmup": [], "rl": None, "about": "warm-up only"},
    "outcome": {"rl": ["--policy", "none"]},
    "sam": {"rl": "--policy sam"},
}


def sweep_args(bench, tmp_path, *extra):
    return [
        "--preset",
        "none",
        "--arms-file",
        arms_file(tmp_path, ARMS),
        "--out-dir",
        str(tmp_path),
        "--seeds",
        "0,1",
        "--base",
        f"{TINY} --data-dir {bench}",
        "--bootstrap",
        "200",
        "--no-progress",
        "--gate",
        "-1",  # a nano model on a tiny bench learns nothing; test_sweep_end_to_end_resumable checks the gate
        *extra,
    ]


def test_sweep_end_to_end_resumable(bench, tmp_path, capsys):
    # the gate: the warm-ups run first; one that does not beat the majority label by --gate starts no RL run
    assert ablate.main(sweep_args(bench, tmp_path, "--jobs", "2", "--gate", "0.99")) == 4
    d = tmp_path / "ablation"
    assert sorted(p.name for p in (d / "runs").iterdir()) == ["warmup-base-s0", "warmup-base-s1"]
    closed = json.loads((d / "gate.json").read_text())["failed"]
    rows = [json.loads(x) for x in (d / "runs/warmup-base-s0/metrics.jsonl").read_text().splitlines()]
    assert len(closed) == 2 and f"validation accuracy {rows[-1]['val/accuracy']:.3f}" in closed[0]
    assert "gate: no run from a warm-up was started" in capsys.readouterr().err
    # without the gate the same warm-ups are reused and the arms run
    assert ablate.main(sweep_args(bench, tmp_path, "--jobs", "2", "--gate", "-1")) == 0
    runs = sorted(p.name for p in (d / "runs").iterdir())
    # one warm-up per seed, shared by every arm of that seed
    assert runs == ["outcome-s0", "outcome-s1", "sam-s0", "sam-s1", "warmup-base-s0", "warmup-base-s1"]
    for seed in (0, 1):
        cfg = json.loads((d / f"runs/sam-s{seed}/config.json").read_text())
        assert cfg["init"].endswith(f"warmup-base-s{seed}/sft") and cfg["seed"] == seed and cfg["stages"] == "rl"
        assert cfg["policy"] == "sam" and cfg["rl_steps"] == 2 and cfg["model"] == "nano"
    rows = list(csv.DictReader((d / "ablation.csv").open()))
    keys = {(r["arm"], r["seed"], r["split"], r["metric"]) for r in rows}
    for arm in ARMS:
        for seed in ("0", "1"):
            for split in ("test_random", "test_longtail"):
                for metric in ("accuracy", "macro_f1", "binary_f1", "malformed_rate"):
                    assert (arm, seed, split, metric) in keys
    # the csv holds what the run's own evaluation file says
    ev = json.loads((d / "runs/outcome-s1/eval_rl.json").read_text())
    got = [
        float(r["value"])
        for r in rows
        if (r["arm"], r["seed"], r["split"], r["metric"]) == ("outcome", "1", "test_longtail", "macro_f1")
    ]
    assert got == [pytest.approx(ev["test_longtail"]["macro_f1"])]
    curves = list(csv.DictReader((d / "curves.csv").open()))
    steps = sorted({int(r["step"]) for r in curves if r["arm"] == "sam" and r["metric"] == "val/accuracy"})
    assert steps == [0, 1, 2]
    assert {r["metric"] for r in curves} == set(ablate.DIAGNOSTICS)
    cmps = json.loads((d / "comparisons.json").read_text())
    assert {(c["arm"], c["split"], c["metric"]) for c in cmps} == {
        (a, s, m) for a in ("warm", "sam") for s in ("test_random", "test_longtail") for m in ablate.BOOTSTRAP_METRICS
    }
    md = (d / "ablation.md").read_text()
    assert "Paired comparison with `outcome`" in md and "| sam | 2 |" in md and "Sample efficiency" in md
    assert "RL diagnostics" in md and "| outcome | " in md.split("RL diagnostics")[1]
    # the table's columns are in HEADLINE's order: the last cell of an arm is its mean step agreement
    header = next(line for line in md.splitlines() if line.startswith("| arm | seeds |"))
    assert header.split("|")[-3:-1] == [" malformed ", " step agreement "]
    bad = [
        float(r["value"])
        for r in rows
        if (r["arm"], r["split"], r["metric"]) == ("sam", "test_random", "malformed_rate")
    ]
    assert len(bad) == 2
    row = next(line for line in md.split("## test_random")[1].splitlines() if line.startswith("| sam |"))
    assert row.split("|")[-3].strip().startswith(f"{np.mean(bad):.3f} ±")
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("accuracy.png", "curves.png", "efficiency.png"):
            assert (d / plot).stat().st_size > 0
    # every validation logs each record's verdicts; the report counts their flips between validations
    logged = [json.loads(x) for x in (d / "runs/sam-s0/metrics.jsonl").read_text().splitlines()]
    verdicts = [r["val/verdicts"] for r in logged if "val/verdicts" in r]
    assert len(verdicts) == 3 and all(len(v) == 4 and all(len(x) == 9 for x in v) for v in verdicts)
    flips = list(csv.DictReader((d / "flips.csv").open()))
    mine = [f for f in flips if (f["arm"], f["seed"]) == ("sam", "0")]
    assert [(int(f["step"]), f["verdict"]) for f in mine] == [(s, v) for s in (1, 2) for v in ablate.VERDICTS]
    for f in mine:  # the counts are the logged strings' differences
        k, (a, b) = ablate.VERDICTS.index(f["verdict"]), verdicts[int(f["step"]) - 1 : int(f["step"]) + 1]
        known = [(x[k], y[k]) for x, y in zip(a, b) if x[k] in "01" and y[k] in "01"]
        assert int(f["known"]) == len(known) and int(f["flips"]) == sum(x != y for x, y in known)
        assert int(f["to_right"]) == sum(x + y == "01" for x, y in known)
    assert "## Verdict flips during RL" in md  # (the nano model's completions are malformed: nothing known, "-")
    assert "Highest of the RL arms: **" in md and "Busy wall time" in md

    # a rerun skips every finished run and rewrites the same tables
    before = (d / "ablation.csv").read_text()
    mtime = (d / "runs/sam-s0/results.json").stat().st_mtime_ns
    assert ablate.main(sweep_args(bench, tmp_path)) == 0
    assert (d / "runs/sam-s0/results.json").stat().st_mtime_ns == mtime
    assert (d / "ablation.csv").read_text() == before

    # an interrupted run (checkpoint left, no results) continues with --resume; a run that never checkpointed restarts
    (d / "runs/sam-s1/results.json").unlink()
    (d / "runs/sam-s1/eval_rl.json").unlink()
    (d / "runs/outcome-s0/ckpt").rename(d / "runs/outcome-s0/ckpt-gone")
    (d / "runs/outcome-s0/results.json").unlink()
    assert ablate.main(sweep_args(bench, tmp_path)) == 0
    commands = [line for line in (d / "logs/sam-s1.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith("--resume --no-progress")
    commands = [line for line in (d / "logs/outcome-s0.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[1]
    assert not (d / "runs/outcome-s0/ckpt-gone").exists() and (d / "runs/outcome-s0/results.json").exists()
    assert (d / "ablation.csv").read_text() == before  # evaluation is seeded: the same numbers again

    # changed flags for an existing run are refused, and nothing is run or rewritten
    argv = sweep_args(bench, tmp_path)
    argv[argv.index("--base") + 1] += " --rl-lr 1e-3"
    assert ablate.main(argv) == 2
    assert "already exists with other flags" in capsys.readouterr().err
    assert (d / "ablation.csv").read_text() == before


def _wait_for(proc, ready, what: str, timeout: float = 180.0) -> None:
    """Poll until ready() holds; fail if the sweep ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _untimed(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("_per_s"))} for r in rows]


def _rows(run_dir, stage):
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return sum(json.loads(x)["stage"] == stage for x in text.splitlines() if x.endswith("}"))


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_kill_9_in_a_warmup_and_in_an_arm_resumes_to_the_uninterrupted_result(bench, tmp_path, capsys, request):
    # each run checkpoints every step and is long enough to be caught in the middle
    arms = {"outcome": {"rl": ["--policy", "none"]}}
    base = f"{TINY} --data-dir {bench} --sft-steps 24 --rl-steps 10 --eval-every 5 --save-every 1"
    argv = ["--preset", "none", "--arms-file", arms_file(tmp_path, arms), "--out-dir", str(tmp_path), "--seeds", "0"]
    argv += ["--base", base, "--bootstrap", "200", "--no-progress", "--gate", "-1"]
    assert ablate.main([*argv, "--name", "whole"]) == 0
    capsys.readouterr()
    d = tmp_path / "cut"
    warm, arm = d / "runs/warmup-base-s0", d / "runs/outcome-s0"

    started = []  # whatever happens, no sweep of this test outlives it (frozen or running)
    request.addfinalizer(lambda: [_kill_group(p) for p in started])

    def start():
        command = [sys.executable, str(ablate.ROOT / "ablate.py"), *argv, "--name", "cut"]
        started.append(subprocess.Popen(command, cwd=ablate.ROOT, start_new_session=True, stdout=subprocess.DEVNULL))
        return started[-1]

    # 1. SIGKILL to the whole sweep (ablate.py and its run) in the middle of the warm-up, after a checkpoint
    proc = start()
    _wait_for(proc, lambda: (warm / "ckpt").exists() and _rows(warm, "sft") >= 3, "a checkpointed warm-up step")
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen, so what is checked below is what the kill leaves
    assert not ablate.finished(warm, "sft") and _rows(warm, "sft") < 24
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # 2. the rerun resumes the warm-up and starts the arm; SIGKILL to ablate.py alone in the middle of the arm: its
    #    run lives on (frozen here), holds the sweep's lock, and a third ablate.py refuses to run beside it
    proc = start()
    _wait_for(proc, lambda: (arm / "ckpt").exists() and _rows(arm, "rl") >= 3, "a checkpointed RL step")
    os.killpg(proc.pid, signal.SIGSTOP)
    assert not ablate.finished(arm, "rl") and _rows(arm, "rl") < 11
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ablate.main([*argv, "--name", "cut"]) == 2
    assert "is in use: another ablate.py, or a train.py run" in capsys.readouterr().err
    os.killpg(proc.pid, signal.SIGKILL)  # the orphaned run
    deadline = time.monotonic() + 30
    with open(d / ablate.LOCK) as held:  # the lock is free once the killed run is gone
        while True:
            try:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed run still holds the sweep's lock"
                time.sleep(0.05)

    # 3. the third sitting finishes the sweep, both runs resumed from their checkpoints, with the uninterrupted numbers
    assert ablate.main([*argv, "--name", "cut"]) == 0
    for log in ("warmup-base-s0", "outcome-s0"):
        commands = [x for x in (d / f"logs/{log}.log").read_text().splitlines() if x.startswith("$ ")]
        assert len(commands) >= 2 and commands[-1].endswith("--resume --no-progress"), log
    for name in ("ablation.csv", "curves.csv", "flips.csv", "runs/outcome-s0/predictions_rl.jsonl"):
        assert (d / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    # the nano model's answers hardly move, so the training itself is compared: every logged loss, gradient norm
    # and reward of both runs, and the final weights
    for run in ("warmup-base-s0", "outcome-s0"):
        rows = [_untimed(tmp_path / sweep / f"runs/{run}/metrics.jsonl") for sweep in ("whole", "cut")]
        assert rows[0] == rows[1] and len(rows[0]) > 10, run
    weights = [(tmp_path / s / "runs/outcome-s0/ckpt/model.safetensors").read_bytes() for s in ("whole", "cut")]
    assert weights[0] == weights[1]


def test_report_tables_by_hand(tmp_path):
    cfg = ablate.AblateConfig(preset="none", arms_file="x", out_dir=str(tmp_path), seeds="0,1")
    arms = {"outcome": ablate.Arm(rl=("--policy", "none")), "sam": ablate.Arm(rl=("--policy", "sam"))}
    rows = [
        {"arm": a, "seed": s, "split": "test_random", "metric": f"step_agreement_{i}", "value": v}
        for a, base in (("outcome", 0.5), ("sam", 0.7))
        for s in (0, 1)
        for i, v in enumerate([base + 0.1 * s] * 7, 1)
    ]
    curves = [
        {"arm": a, "seed": s, "step": step, "metric": "val/accuracy", "value": v}
        for a, s, step, v in [("outcome", 0, 5, 0.6), ("outcome", 1, 5, 0.7), ("sam", 0, 5, 0.8), ("sam", 1, 5, 0.5)]
        + [("sam", 0, 0, 0.9), ("outcome", 0, 0, 0.1)]  # earlier steps do not count
    ]
    flip = {"step": 5, "verdict": "coverage", "records": 20, "known": 10}
    flips = [
        {"arm": "sam", "seed": 0, **flip, "flips": 4, "to_right": 3, "to_wrong": 1},
        {"arm": "sam", "seed": 1, **flip, "flips": 2, "to_right": 1, "to_wrong": 1},
        {"arm": "outcome", "seed": 0, **dict(flip, known=0), "flips": 0, "to_right": 0, "to_wrong": 0},
    ]
    md = ablate.markdown(cfg, [], (), arms, ablate.Results(rows, curves, {}, [], flips), [], {}, None)
    agreement = md.split("## Per-step agreement")[1].splitlines()
    assert "| test_random | sam | " + " | ".join(["0.750"] * 7) + " |" in agreement
    # each run's last validation (step 5), mean ± std over seeds: outcome (0.6, 0.7), sam (0.8, 0.5)
    assert "outcome 0.650 ± 0.071; sam 0.650 ± 0.212" in md
    table = md.split("## Verdict flips during RL")[1].split("Net flips")
    coverage = ablate.VERDICTS.index("coverage") + 2  # cells after the leading '' and the arm
    sam_flips = next(x for x in table[0].splitlines() if x.startswith("| sam |")).split("|")
    sam_net = next(x for x in table[1].splitlines() if x.startswith("| sam |")).split("|")
    outcome_flips = next(x for x in table[0].splitlines() if x.startswith("| outcome |")).split("|")
    assert sam_flips[coverage].strip() == "30.0"  # (40% + 20%) / 2
    assert sam_net[coverage].strip() == "+5.0"  # per validation record: ((3 - 1) / 20 + (1 - 1) / 20) / 2
    assert outcome_flips[coverage].strip() == "-" and sam_flips[2].strip() == "-"  # nothing known


def test_choose_lr_takes_the_best_finished_tuning_run(tmp_path):
    cfg = ablate.AblateConfig(preset="fair", out_dir=str(tmp_path), seeds="0", tune_lr="1e-4,3e-4,1e-3")
    base, arms = ablate.select_arms(cfg)
    tune = ablate.tuning_jobs(cfg, base, arms)
    # the last validation counts, not the best one along the way; 1e-3 "diverged" (its run failed)
    for name, accs in zip(tune, [(0.9, 0.5), (0.4, 0.6), (0.2, 0.8)]):
        run = tmp_path / "ablation/runs" / name
        run.mkdir(parents=True)
        rows = [{"stage": "rl", "step": 5 * i, "val/accuracy": a} for i, a in enumerate(accs)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ablate.choose_lr(cfg, tune) == "1e-3"
    assert ablate.choose_lr(cfg, tune, failed=["tune-outcome-lr1e-3-s0"]) == "3e-4"
    saved = json.loads((tmp_path / "ablation/tune.json").read_text())
    assert saved["failed"] == ["1e-3"] and saved["val_accuracy"] == {"1e-4": 0.5, "3e-4": 0.6}
    assert ablate.tuned_lr(cfg, tune) == "3e-4"
    assert ablate.choose_lr(cfg, tune, failed=list(tune)) is None
    # a baseline that sets its own rate would make every grid point the same run
    with pytest.raises(ablate.ConfigError, match="leave --rl-lr out"):
        ablate.tuning_jobs(cfg, (*base, "--rl-lr", "1e-4"), arms)


def test_verdict_flips_and_busy_time_by_hand():
    rows = [
        {"stage": "rl", "step": 0, "val/verdicts": ["1" * 9, "0" * 9, "." * 9]},
        {"stage": "rl", "step": 1, "loss": 0.5},
        {"stage": "rl", "step": 5, "val/verdicts": ["0" + "1" * 8, "1" * 9, "0" * 9]},
    ]
    flips = ablate.verdict_flips(rows, "here")
    assert [f["step"] for f in flips] == [5] * 9
    need, coverage = flips[0], flips[1]
    # record 3 was unknown before: not counted; record 1 flips to wrong on `need`, record 2 to right on both
    assert (need["known"], need["flips"], need["to_right"], need["to_wrong"]) == (2, 2, 1, 1)
    assert (coverage["known"], coverage["flips"], coverage["to_right"], coverage["to_wrong"]) == (2, 1, 1, 0)
    with pytest.raises(ablate.DataError, match="same ones"):
        ablate.verdict_flips([rows[0], {"step": 5, "val/verdicts": ["1" * 9]}], "here")
    assert ablate.busy_seconds([[0, 10], [5, 12], [20, 21], [11, 11.5]]) == 13
    assert ablate.busy_seconds([]) == 0


def test_failed_warmup_skips_its_arms_and_exits_1(bench, tmp_path, capsys):
    arms = {
        "warm": {"warmup": ["--sft-split", "no-such-split"], "rl": None},
        "rl": {"warmup": ["--sft-split", "no-such-split"], "rl": []},
    }
    argv = [
        "--preset",
        "none",
        "--arms-file",
        arms_file(tmp_path, arms),
        "--baseline",
        "warm",
        "--out-dir",
        str(tmp_path),
        "--seeds",
        "0",
        "--base",
        f"{TINY} --data-dir {bench}",
        "--no-progress",
    ]
    assert ablate.main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED warmup-sft-split-no-such-split-s0" in err and "no-such-split" in err
    assert "rl-s0" in err.splitlines()[-1]  # skipped, never started
    # the gate's second phase does not run the failed warm-up again (nor name it twice)
    assert (tmp_path / "ablation/logs/warmup-sft-split-no-such-split-s0.log").read_text().count("$ ") == 1
    assert err.splitlines()[-1].count("warmup-sft-split-no-such-split-s0") == 1
    assert not (tmp_path / "ablation/runs/rl-s0").exists()
    assert "Missing (not finished): warm seed 0, rl seed 0" in (tmp_path / "ablation/ablation.md").read_text()


BAD = [
    (["--tune-lr", "1e-3,x"], "--tune-lr must be a comma list"),
    (["--tune-lr", "1e-3,1e-3"], "distinct learning rates"),
    (["--tune-lr", "1e-3", "--baseline", "sft-reasoning"], "'sft-reasoning' has none"),
    (["--gpus", "0,a"], "--gpus must be a comma list"),
    (["--arms", "nope"], "unknown arm"),
    (["--arms", ",,"], "--arms ',,' names no arm"),
    (["--baseline", "nope"], "--baseline 'nope' is not among the arms"),
    (["--base", "--seed 3"], "leave out --seed"),
    (["--base", "--stages rl"], "leave out --stages"),
    (["--base", "--policy tok"], "--policy must be one of"),
    (["--base", "--no-such-flag 1"], "unrecognized arguments"),
    (["--seeds", "0,x"], "--seeds must be a comma list"),
    (["--seeds", "1,1"], "distinct"),
    (["--preset", "none"], "--preset none needs --arms-file"),
    (["--arms-file", "/no/such.json"], "no such file"),
    (["--name", "a/b"], "plain folder name"),
    (["--report-only"], "--report-only: no sweep in"),
    (["--base", "--data-dir /no/such/dir"], "--data-dir /no/such/dir: no such folder"),
]


def exit_code(argv) -> int:
    """ablate.main's exit code, whether it returns it or exits while parsing its own flags."""
    try:
        return ablate.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert exit_code(["--out-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ablation").exists()  # nothing written


@pytest.mark.parametrize("blocked", ["out_dir", "sweep"])
def test_a_file_where_the_sweep_folder_goes_is_one_line(tmp_path, capsys, blocked):
    # --out-dir is a file, or <out-dir>/<name> is one: one line and exit 2, the file untouched
    out = tmp_path / "out"
    if blocked == "out_dir":
        out.write_text("x")
        path = out
    else:
        out.mkdir()
        path = out / "ablation"
        path.write_text("x")
    assert exit_code(["--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot create or read the sweep folder" in err and "Traceback" not in err
    assert path.read_text() == "x"


@pytest.mark.parametrize(
    "arms,message",
    [
        ({"a": {"warmup": [], "rl": 3}}, "expected a list of flag strings"),
        ({"a b": {"rl": []}}, "arm name 'a b'"),
        ({"a": {"rl": [], "extra": 1}}, "expected an object with keys"),
        ([], "non-empty object"),
        ({"a": {"rl": ["--init", "x"]}}, "leave out --init"),
    ],
)
def test_bad_arms_file(tmp_path, capsys, arms, message):
    argv = ["--preset", "none", "--arms-file", arms_file(tmp_path, arms), "--baseline", "a", "--out-dir", str(tmp_path)]
    assert ablate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_granularity_preset_plan():
    cfg = ablate.AblateConfig(preset="granularity", seeds="0,1,2")
    base, arms = ablate.select_arms(cfg)
    jobs, result_of = ablate.plan(cfg, base, arms)
    ablate.check_plan(base, arms, jobs)  # every arm's flags are valid train.py flags
    assert len(arms) == 10 and len(jobs) == 3 * 3 + 8 * 3  # 3 warm-ups and 8 RL arms per seed
    # every criteria RL arm of a seed starts from the same warm-up; equal budgets (same base flags)
    for seed in (0, 1, 2):
        inits = {jobs[result_of[a, seed]].argv[-1] for a in arms if arms[a].rl is not None and not arms[a].warmup}
        assert inits == {f"runs/ablation/runs/warmup-base-s{seed}/sft"}
    assert list(jobs)[0] == "warmup-base-s0"  # the warm-up that unlocks the most runs goes first


def test_fair_preset_plan():
    cfg = ablate.AblateConfig(preset="fair", seeds="0,1,2,3,4")
    base, arms = ablate.select_arms(cfg)
    jobs, result_of = ablate.plan(cfg, base, arms)
    ablate.check_plan(base, arms, jobs)
    seeds = {a: sorted(s for (b, s) in result_of if b == a) for a in arms}
    assert all(seeds[a] == [0, 1, 2, 3, 4] for a in ("outcome", "sam", "random", "gold-box"))
    assert all(len(seeds[a]) >= 3 for a in arms)
    # the amended protocol's budget (docs/ablation.md, 2026-12-07): 100 RL steps, validation of 200 records every 5
    rl = jobs[result_of["sam", 0]].argv
    assert [rl[rl.index(f) + 1] for f in ("--rl-steps", "--eval-every", "--val-limit", "--test-limit")] == [
        "100",
        "5",
        "200",
        "0",
    ]
    # more SFT instead of RL: SFT continued from the same warm-up for as many optimizer steps as RL takes (100 x 1)
    more = jobs[result_of["more-sft", 0]].argv
    assert more[more.index("--stages") + 1] == "sft" and more[more.index("--sft-steps") + 1] == "100"
    assert more[-1] == jobs[result_of["sam", 0]].argv[-1] == "runs/ablation/runs/warmup-base-s0/sft"


def test_fair_smol_preset_plan_with_tuning(capsys):
    cfg = ablate.AblateConfig(preset="fair-smol", seeds="0,1,2,3,4", tune_lr="3e-6,1e-5")
    base, arms = ablate.select_arms(cfg)
    assert arms == ablate.PRESETS["fair"][1]  # the same study: arms and seeds
    tune = ablate.tuning_jobs(cfg, base, arms)
    jobs, result_of = ablate.plan(cfg, base, arms, ("--rl-lr", "1e-5"))
    ablate.check_plan(base, arms, {**jobs, **tune})
    warm = jobs["warmup-base-s0"].argv
    # the warm-up docs/LOG.md found for SmolLM2-135M (150 SFT steps of 8 at lr 1e-4, no instruction)
    for flag, value in [("--model", "models/smollm2-135m"), ("--sft-steps", "150"), ("--sft-lr", "1e-4")]:
        assert warm[warm.index(flag) + 1] == value
    assert "--rl-lr" not in warm  # the tuned rate is the RL stage's: warm-ups are planned before it is known
    # tuning: the baseline arm from seed 0's warm-up at each rate, validation only
    assert list(tune) == ["tune-outcome-lr3e-6-s0", "tune-outcome-lr1e-5-s0"]
    t = tune["tune-outcome-lr1e-5-s0"].argv
    assert t[t.index("--rl-lr") + 1] == "1e-5" and t[t.index("--test-splits") + 1] == ""
    assert t[t.index("--policy") + 1] == "none" and t[-1] == "runs/ablation/runs/warmup-base-s0/sft"
    sam = jobs[result_of["sam", 3]].argv
    assert sam[sam.index("--rl-lr") + 1] == "1e-5" and "--test-splits" not in sam
    more = jobs[result_of["more-sft", 0]].argv
    steps = [more[i + 1] for i, flag in enumerate(more) if flag == "--sft-steps"]
    assert "--rl-lr" not in more and steps == ["150", "100"]  # the warm-up's, then the control's (the later wins)
    # the dry run prints the plan, the tuning before the RL runs, and changes nothing
    assert (
        ablate.main(["--preset", "fair-smol", "--tune-lr", "3e-6,1e-5", "--dry-run", "--out-dir", "/nonexistent"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    names = [line.split(":")[0] for line in out if ": python train.py" in line]
    assert names.index("tune-outcome-lr1e-5-s0") < names.index("outcome-s0") and len(names) == 52 + 2
    assert "--rl-lr TUNED" in next(line for line in out if line.startswith("sam-s0:"))


def test_tuning_on_the_baseline_then_every_arm_at_the_chosen_rate_one_run_per_gpu(bench, tmp_path, capsys):
    argv = sweep_args(bench, tmp_path, "--seeds", "0", "--tune-lr", "1e-3,3e-4", "--gpus", "3,5", "--name", "tuned")
    assert ablate.main(argv) == 0
    d = tmp_path / "tuned"
    tuned = json.loads((d / "tune.json").read_text())
    scores = {lr: ablate.last_val_accuracy(d / f"runs/tune-outcome-lr{lr}-s0") for lr in ("1e-3", "3e-4")}
    assert tuned["val_accuracy"] == scores and tuned["chosen"] == max(["1e-3", "3e-4"], key=scores.get)
    for run in ("outcome-s0", "sam-s0"):
        cfg = json.loads((d / f"runs/{run}/config.json").read_text())
        assert cfg["rl_lr"] == float(tuned["chosen"])
    # the tuning runs read no test split
    assert not (d / "runs/tune-outcome-lr1e-3-s0/predictions_rl.jsonl").read_text()
    # each run saw one GPU of the pool
    for log in (d / "logs").iterdir():
        assert log.read_text().startswith(("$ CUDA_VISIBLE_DEVICES=3 ", "$ CUDA_VISIBLE_DEVICES=5 ")), log.name
    assert f"every RL arm runs at **{tuned['chosen']}**" in (d / "ablation.md").read_text()
    # a rerun reuses the tuning; another grid on the same sweep is refused
    capsys.readouterr()
    assert ablate.main(argv) == 0 and "tuned:" not in capsys.readouterr().out
    argv[argv.index("--tune-lr") + 1] = "1e-3"
    assert ablate.main(argv) == 2 and "was tuned over --tune-lr 1e-3,3e-4" in capsys.readouterr().err
    # a sweep whose RL runs were planned without tuning refuses a tuning before spending a run on it
    plain = sweep_args(bench, tmp_path, "--seeds", "0", "--name", "plain", "--gate", "0.99")
    assert ablate.main(plain) == 4  # the gate closes: the warm-up ran, the RL runs are planned, none started
    assert ablate.main([*plain, "--gate", "-1", "--tune-lr", "1e-3"]) == 2
    assert "is planned already" in capsys.readouterr().err
    assert not list((tmp_path / "plain/runs").glob("tune-*"))


def test_metric_on_matches_sam_metrics():
    rng = np.random.default_rng(0)
    gold = rng.integers(-1, 4, size=50)
    pred = np.where(rng.random(50) < 0.1, 99, np.where(rng.random(50) < 0.6, gold, rng.integers(-1, 4, size=50)))
    idx = rng.integers(0, 50, size=(5, 50))
    for r in range(5):
        ref = relevance_metrics([None if p == 99 else int(p) for p in pred[idx[r]]], [int(g) for g in gold[idx[r]]])
        assert metrics.metric_on(gold, pred, idx[r : r + 1], "accuracy")[0] == pytest.approx(ref["accuracy"])
        assert metrics.metric_on(gold, pred, idx[r : r + 1], "macro_f1")[0] == pytest.approx(ref["macro_f1"])


def test_paired_bootstrap_detects_a_real_difference_and_not_noise():
    rng = np.random.default_rng(1)
    gold = rng.integers(-1, 4, size=400)

    def model(p_right, seed):
        r = np.random.default_rng(seed)
        return gold, np.where(r.random(400) < p_right, gold, (gold + 2) % 5 - 1)  # a wrong label

    better = [model(0.8, s) for s in range(3)]
    worse = [model(0.6, s + 10) for s in range(3)]
    same = [model(0.6, s + 20) for s in range(3)]
    c = metrics.paired_bootstrap(better, worse, "accuracy", 1000)
    assert c["lo"] > 0 and 0.15 < c["diff"] < 0.25 and len(c["per_seed"]) == 3 and c["p_le_0"] == 0
    c = metrics.paired_bootstrap(same, worse, "accuracy", 1000)
    assert c["lo"] < 0 < c["hi"]
    c = metrics.paired_bootstrap(worse, better, "macro_f1", 1000)
    assert c["hi"] < 0
