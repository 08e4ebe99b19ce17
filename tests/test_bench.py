"""The benchmark scripts run end to end in smoke mode (tiny shapes; Triton in the interpreter without CUDA)."""

import csv

import pytest

from bench import bench_logprob


def test_bench_logprob_smoke(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert (
        bench_logprob.main(["--smoke", "--modes", "fwd+bwd", "--tokens", "20", "--vocab", "130", "--csv", str(out)])
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["naive", "ours"]
    assert all(r["status"] == "ok" and r["commit"] for r in rows)
    # ours keeps fp32 logits on-chip: its logp error is far below the naive bf16-logits path
    assert float(rows[1]["max_err"]) < 1e-4
    assert "appended 2 rows" in capsys.readouterr().out


def test_bench_logprob_rejects_unknown_provider():
    with pytest.raises(SystemExit) as exc:
        bench_logprob.parse_args(["--smoke", "--providers", "naive,nope"])
    assert exc.value.code == 2


def test_bench_policy_loss_smoke(tmp_path):
    from bench import bench_policy_loss

    out = tmp_path / "rows.csv"
    assert bench_policy_loss.main(["--smoke", "--tokens", "500", "--rollouts", "8", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["provider"], r["mode"]) for r in rows] == [
        ("ref", "fwd"),
        ("ref", "fwd+bwd"),
        ("ours", "fwd"),
        ("ours", "fwd+bwd"),
    ]
    assert all(r["status"] == "ok" and float(r["loss_err"]) < 1e-5 for r in rows)


def test_bench_distill_kl_smoke(tmp_path):
    from bench import bench_distill_kl

    out = tmp_path / "rows.csv"
    argv = [
        "--smoke",
        "--providers",
        "matmul,naive,ours",
        "--kinds",
        "rkl",
        "--modes",
        "fwd+bwd",
        "--tokens",
        "20",
        "--vocab",
        "130",
        "--csv",
        str(out),
    ]
    assert bench_distill_kl.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["provider"], r["kind"]) for r in rows] == [("matmul", "-"), ("naive", "rkl"), ("ours", "rkl")]
    assert all(r["status"] == "ok" for r in rows)
    assert float(rows[2]["max_err"]) < 1e-5  # fp32 logits on-chip vs the naive bf16 logits


def test_compile_check_for_sm90_passes(tmp_path):
    """Every kernel compiles ahead of time for an H100 (sm_90) without a GPU: no 16-bit spills, shared memory within
    the limit, one binary for N = 1, 37 and 4096 rows. Run in a subprocess: this one has TRITON_INTERPRET=1, under
    which kernels are interpreted functions that cannot be compiled."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cc.csv"
    cmd = [sys.executable, "-m", "bench.compile_check", "--targets", "90", "--quick", "--csv", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    kernels = {r["kernel"] for r in rows}
    assert {
        "_logprob_fwd_kernel",
        "_logprob_merge_kernel",
        "_logprob_bwd_dz_kernel",
        "_matmul_kernel",
        "_distill_fwd_kernel",
        "_distill_merge_kernel",
        "_distill_jsd_kernel",
        "_distill_jsd_merge_kernel",
        "_distill_bwd_dz_kernel",
        "_policy_loss_fwd_kernel",
        "_policy_loss_bwd_kernel",
    } <= kernels
    # the kernels with a dot product (the merges have none)
    bf16 = [
        r for r in rows if "bfloat16" in r["case"] and r["kernel"] != "_matmul_kernel" and "merge" not in r["kernel"]
    ]
    assert bf16 and all(r["mma"] == "wgmma" for r in bf16 if "float32" not in r["case"])
    assert all(int(r["local_bytes"]) == 0 for r in bf16)


def test_gpu_check_script_smoke_mode(tmp_path):
    """bench/gpu_check.sh in its CPU smoke mode: every stage runs, rows and a summary land under OUT; with no time
    left every stage is skipped cleanly; a bad option is refused."""
    import os
    import subprocess

    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out), "--smoke"],
        capture_output=True,
        text=True,
        env=dict(env, GPU_CHECK_LIMIT_S="400"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    for stage in ("tests", "bench_logprob", "bench_policy_loss", "bench_distill_kl"):
        assert f"| {stage} | ok |" in summary, summary
    for name in ("bench_logprob", "bench_policy_loss", "bench_distill_kl"):
        rows = list(csv.DictReader((out / f"{name}.csv").open()))
        assert rows and all(r["status"] == "ok" for r in rows)
    late = tmp_path / "late"
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(late), "--smoke"],
        capture_output=True,
        text=True,
        env=dict(env, GPU_CHECK_LIMIT_S="0"),
        timeout=120,
    )
    assert proc.returncode == 3 and (late / "summary.md").read_text().count("skipped (time limit)") == 4
    bad = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "x"), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
