#!/usr/bin/env bash
# The one prepared GPU check, for the day a session is lent a GPU (issue 18). Installs nothing.
#
#   bash bench/gpu_check.sh OUT            # on one H100/H200: the CUDA tests, then every kernel benchmark at full shapes
#   bash bench/gpu_check.sh OUT --smoke    # anywhere (CPU: Triton interpreter): tiny shapes, checks the wiring only
#
# Writes under OUT: env.txt (device, versions, commit), one log per stage, the benchmarks' CSV rows and summary.md
# (each stage's status, seconds and the tail of its output). GPU_CHECK_LIMIT_S (default 450) bounds the whole run:
# each stage gets the time that is left (less 10 s of grace to stop) and is stopped cleanly (status "timeout") when
# it runs out; a stage that would start with under 20 s left is skipped. Exit status: 0 when every stage ran and
# passed, 1 when one failed or timed out, 3 when none failed but some were skipped, 2 on bad arguments.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUT [--smoke]}
SMOKE=0
if [ "${2:-}" = "--smoke" ]; then SMOKE=1; elif [ -n "${2:-}" ]; then echo "error: unknown option $2" >&2; exit 2; fi
LIMIT=${GPU_CHECK_LIMIT_S:-450}
case "$LIMIT" in ''|*[!0-9]*) echo "error: GPU_CHECK_LIMIT_S must be a whole number of seconds" >&2; exit 2;; esac
LIMIT=$((10#$LIMIT))  # "09" is nine seconds, not a bad octal number
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)  # resolved before leaving the caller's directory
cd "$(dirname "$0")/.."
rm -f "$OUT"/*.log "$OUT"/*.csv "$OUT/summary.md"  # a summary of this run only
shopt -s nullglob
START=$(date +%s)
FAILED=0
SKIPPED=0
SUMMARY="$OUT/summary.md"

python - > "$OUT/env.txt" 2>&1 <<'EOF'
import subprocess, torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")
try:
    print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
except OSError:
    print("commit unknown")
EOF
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  sed 's/^/    /' "$OUT/env.txt"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

stage() {  # stage NAME COMMAND...: run with the time left, record status and duration
  local name=$1; shift
  local left=$(( LIMIT - ($(date +%s) - START) - 10 ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped (time limit) | 0 |" >> "$SUMMARY"
    SKIPPED=1
    return
  fi
  local t0=$(date +%s) status rc
  timeout --signal=INT --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - t0 )) |" >> "$SUMMARY"
}

if [ "$SMOKE" = 1 ]; then
  # the wiring only, at the least each stage runs (the tests and every benchmark's own smoke run in the suite)
  stage tests python -m pytest -q -rs tests/test_logprob.py -k strided
  stage bench_logprob python -m bench.bench_logprob --smoke --modes fwd+bwd --tokens 20 --vocab 130 --csv "$OUT/bench_logprob.csv"
  stage bench_policy_loss python -m bench.bench_policy_loss --smoke --tokens 500 --rollouts 8 --csv "$OUT/bench_policy_loss.csv"
  stage bench_distill_kl python -m bench.bench_distill_kl --smoke --kinds fkl,jsd --tokens 20 --vocab 130 --csv "$OUT/bench_distill_kl.csv"
else
  # the CUDA tests (test_gpu_*): on a GPU the CPU tests would call the Triton path on CPU tensors without the
  # interpreter, which the kernels refuse
  stage tests python -m pytest -q -rs tests/test_logprob.py tests/test_policy_loss.py tests/test_distill_kl.py -k gpu
  stage bench_logprob python -m bench.bench_logprob --csv "$OUT/bench_logprob.csv"
  stage bench_policy_loss python -m bench.bench_policy_loss --csv "$OUT/bench_policy_loss.csv"
  stage bench_distill_kl python -m bench.bench_distill_kl --csv "$OUT/bench_distill_kl.csv"
fi

{
  echo
  for log in "$OUT"/*.log; do
    echo "## $(basename "$log" .log)"
    echo
    tail -n 15 "$log" | sed 's/^/    /'
    echo
  done
} >> "$SUMMARY"
echo "wrote $SUMMARY ($(( $(date +%s) - START )) s)"
if [ "$FAILED" = 1 ]; then exit 1; elif [ "$SKIPPED" = 1 ]; then exit 3; fi
exit 0
