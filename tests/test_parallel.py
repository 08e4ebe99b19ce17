"""torchrun data parallelism on the CPU (gloo, 2 processes): one GRPO update and one distillation step on 2 ranks
equal one process on the combined batch (loss, grad norm, updated parameters), under FSDP2 and DDP; in the GRPO
update the Triton kernels (interpreted) take the gathered head weight (the distillation step runs the reference
path: the interpreter is too slow for its vocabulary); the 2-rank checkpoint loads in one process; train.py and
distill.py run end to end under torchrun, and a 2-rank run resumes exactly."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from model.hf import build_preset, load_model, load_tokenizer
from runtime.checkpoint import load_trainer_state
from runtime.config import parse_flags
from runtime.configs import TrainConfig
from runtime.parallel import Dist, Sharded, resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
SIZES = {"sft": 16, "rl": 16, "val": 4, "test_random": 4, "test_longtail": 4}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


@pytest.fixture(scope="module")
def bench(make_bench):
    return make_bench(SIZES)


@pytest.fixture(scope="module")
def teacher(bench, make_teacher):
    return make_teacher(bench)


def torchrun(*args, nproc=2, timeout=300):
    """A torchrun launch on this machine; each rank gets one CPU thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *map(str, args),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def single(bench, teacher, tmp_path_factory):
    """The worker as one process on the combined batch (in this process: world size 1)."""
    import tests.dist_worker as worker

    out = tmp_path_factory.mktemp("single")
    worker.main(str(bench), str(teacher), str(out), "none", "triton", "ref")
    return torch.load(out / "none" / "result.pt", weights_only=False)


def assert_same_params(got: dict, want: dict, lr: float = 1e-2):
    """Equal within fp32 rounding of the summed gradients. Adam divides by the root of the second moment, which
    magnifies rounding where a gradient is tiny, so a few weights may differ by a little more: every weight within
    1% of one step (lr), and 99.9% of all weights within 1e-6."""
    assert got.keys() == want.keys()
    close = total = 0
    for k in want:
        if "k_proj.bias" in k:
            # the gradient of a key bias is 0 in exact arithmetic (it shifts all of a query's scores alike, which
            # softmax ignores): what remains is fp32 noise, which Adam turns into steps of any sign. Not comparable.
            continue
        diff = (got[k] - want[k]).abs()
        assert float(diff.max()) <= 1e-2 * lr, f"{k}: max |diff| {float(diff.max()):.3g}"
        close, total = close + int((diff <= 1e-6).sum()), total + diff.numel()
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ by more than 1e-6"


@pytest.fixture(scope="module")
def launched(bench, teacher, tmp_path_factory):
    """One 2-rank launch of the worker that runs FSDP2, then DDP, in the same process group."""
    out = tmp_path_factory.mktemp("two")
    torchrun(WORKER, bench, teacher, out, "fsdp,ddp", "triton", "ref")
    return out


@pytest.fixture(scope="module", params=["fsdp", "ddp"])
def two_ranks(request, launched):
    out = launched / request.param
    result = torch.load(out / "result.pt", weights_only=False)
    assert result["strategy"] == request.param
    return out, result


def test_two_ranks_take_the_step_of_one_process_on_the_combined_batch(bench, single, two_ranks):
    two = two_ranks[1]
    assert two["world"] == 2 and single["world"] == 1
    # GRPO + SAM update: 2 inner epochs, so the second epoch's ratios depend on the first update being identical
    assert two["rl"]["loss"] == pytest.approx(single["rl"]["loss"], rel=1e-5, abs=1e-7)
    assert two["rl"]["grad_norms"] == pytest.approx(single["rl"]["grad_norms"], rel=1e-5)
    # the KL term to the frozen reference was live (the second epoch starts away from the reference)
    assert two["rl"]["metrics"]["ref_kl"] > 0 and single["rl"]["metrics"]["ref_kl"] > 0
    assert_same_params(two["rl"]["params"], single["rl"]["params"])
    moved = max(float((single["rl"]["params"][k] - p).abs().max()) for k, p in fresh_params().items())
    assert moved > 1e-3  # the step did move the weights (the comparison is not of two untouched models)
    # distillation: both students; rank 1 had no usable label rows and ran zero-weighted micro-batches
    for kind in ("reasoning", "label"):
        got, want = two["distill"][kind], single["distill"][kind]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and want["loss"] > 0
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["counts"] == want["counts"]
        assert_same_params(got["params"], want["params"])
    assert single["distill"]["label"]["counts"] == {"label/used": 0.5}


def fresh_params():
    import tests.dist_worker as worker

    return {k: v.detach() for k, v in worker.small_model().named_parameters()}


def test_the_two_rank_checkpoint_loads_in_one_process(single, two_ranks):
    out, two = two_ranks
    model = load_model(out / "ckpt", device="cpu", dtype=torch.float32)
    loaded = {k: v.detach() for k, v in model.named_parameters()}
    assert loaded.keys() == single["rl"]["params"].keys()
    assert all(torch.equal(loaded[k], two["rl"]["params"][k]) for k in loaded)  # exactly what the ranks held
    assert_same_params(loaded, single["rl"]["params"])
    state = load_trainer_state(out / "ckpt")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    moments = state["optimizer"]["state"]
    if two["strategy"] == "fsdp":  # the full optimizer state, keyed by parameter name, of the full shapes
        assert moments["model.embed_tokens.weight"]["exp_avg"].shape == loaded["model.embed_tokens.weight"].shape
    else:  # DDP: every rank holds the whole optimizer; rank 0's state_dict as a single process saves it
        assert moments[0]["exp_avg"].shape == loaded["model.embed_tokens.weight"].shape


# a tiny label-only run that checkpoints every step: 2 RL steps of 2 prompts x 2 samples, no masking
TRAIN = "--no-progress --sft-epochs 0.5 --sft-batch-size 4 --rl-steps 2 --prompts-per-step 2 --group-size 2"
TRAIN += " --val-limit 4 --test-limit 3 --eval-every 1 --micro-batch 3 --save-every 1 --fmt label --policy none"
TRAIN += " --segmenter none --max-new-tokens 8 --eval-batch-size 3"


def train_args(bench, out, *extra):
    return ["--data-dir", str(bench), "--out-dir", str(out), *TRAIN.split(), *extra]


def metric_rows(run_dir):
    drop = ("_s", "tokens_per_s")  # wall-clock fields differ between runs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in rows]


def test_train_and_distill_under_torchrun_and_an_exact_two_rank_resume(bench, teacher, tmp_path):
    torchrun(ROOT / "train.py", *train_args(bench, tmp_path, "--name", "full"))
    out = torchrun(ROOT / "train.py", *train_args(bench, tmp_path, "--name", "cut", "--halt-after", "3"))
    assert out.stdout.count("halted after 3 steps") == 1  # rank 0 speaks, the others do not
    torchrun(ROOT / "train.py", *train_args(bench, tmp_path, "--name", "cut", "--resume"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert metric_rows(cut) == metric_rows(full)
    assert [r["stage"] for r in metric_rows(full)] == ["sft"] * 2 + ["rl"] * 3
    assert (cut / "predictions_rl.jsonl").read_text() == (full / "predictions_rl.jsonl").read_text()
    timing = ("seconds", "examples_per_s", "generated_tokens_per_s")
    for name in ("eval_sft.json", "eval_rl.json"):
        a, b = (json.loads((run / name).read_text()) for run in (cut, full))
        assert a.keys() == b.keys() and all(
            {k: v for k, v in a[s].items() if k not in timing} == {k: v for k, v in b[s].items() if k not in timing}
            for s in a
        )
    assert load_model(full / "best", device="cpu") is not None
    # distill.py: the 2-rank run's students load in one process
    torchrun(
        ROOT / "distill.py",
        "--teacher",
        teacher,
        "--data-dir",
        bench,
        "--out-dir",
        tmp_path,
        "--name",
        "d",
        "--no-progress",
        "--steps",
        "2",
        "--prompts-per-step",
        "4",
        "--max-new-tokens",
        "24",
        "--micro-batch",
        "1",
        "--loss",
        "jsd",
        "--on-policy",
        "0.5",
        "--val-limit",
        "2",
        "--test-limit",
        "2",
        "--eval-every",
        "2",
        "--latency-examples",
        "2",
    )
    assert len(metric_rows(tmp_path / "d")) == 2 and (tmp_path / "d" / "report.json").exists()
    assert load_model(tmp_path / "d" / "label", device="cpu") is not None


def test_resume_under_another_world_size_is_a_clear_error(bench, tmp_path, monkeypatch):
    import train
    from runtime.config import ConfigError
    from runtime.loop import setup_run_dir

    assert train.main(train_args(bench, tmp_path, "--name", "one", "--halt-after", "1")) == 0
    monkeypatch.setattr(Dist, "barrier", lambda self: None)  # no process group here: rank 0 of 2 alone
    cfg, given = parse_flags(TrainConfig, train_args(bench, tmp_path, "--name", "one", "--resume"))
    with pytest.raises(ConfigError, match="was written by 1 process.*this run has 2"):
        setup_run_dir(cfg, given, ("ckpt",), Dist(rank=0, world=2))


def test_indivisible_batches_are_refused(bench, tmp_path, capsys, monkeypatch):
    import runtime.session
    import train

    monkeypatch.setattr(runtime.session, "process_group", lambda device: nullcontext(Dist(rank=0, world=2)))
    monkeypatch.setattr(Dist, "barrier", lambda self: None)
    assert train.main(train_args(bench, tmp_path, "--prompts-per-step", "3")) == 2
    assert "--prompts-per-step 3 is not divisible by the world size 2" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


def test_one_process_sharded_is_the_model_itself(bench):
    tok = load_tokenizer(bench / "tokenizer")
    model = build_preset("nano", tok)
    policy = Sharded(model, Dist(), resolve_strategy("fsdp", 1))
    assert policy.strategy == "none" and policy.full_state_dict() is None
    assert policy(lambda m, x: (m, x), 3) == (model, 3)
    with policy.gathered(), policy.full_head() as w:
        assert w is model.lm_head.weight
