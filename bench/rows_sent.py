"""Rows the LM-head kernel receives during a train.py run: B x T completion positions vs response tokens.

    python -m bench.rows_sent --name rowcount          # the default main job, counted (any train.py flags)

Runs train.py in this process with `model.sampling.response_logprobs` (SFT steps, the rollouts' old log-probs, RL
updates) wrapped, and prints one JSON line: calls, positions (B x T per call: what the kernel got before only
response rows were sent) and response_rows (what it gets now).
"""

import json
import runpy
import sys
import time
from pathlib import Path

import model.sampling

TRAIN = Path(__file__).resolve().parent.parent / "train.py"


def main(argv=None) -> int:
    counts = {"calls": 0, "positions": 0, "response_rows": 0}
    real = model.sampling.response_logprobs

    def counting(lm, prompt_ids, prompt_mask, completion_ids, response_mask, **kw):
        counts["calls"] += 1
        counts["positions"] += completion_ids.numel()
        counts["response_rows"] += int(response_mask.sum())  # host sync: a measurement tool
        return real(lm, prompt_ids, prompt_mask, completion_ids, response_mask, **kw)

    model.sampling.response_logprobs = counting  # before train.py runs, so that its import takes the wrapper
    saved_argv, sys.argv = sys.argv, [str(TRAIN), *(sys.argv[1:] if argv is None else argv)]
    t0 = time.perf_counter()
    try:
        runpy.run_path(str(TRAIN), run_name="__main__")
        rc = 0
    except SystemExit as exc:  # train.py ends by exiting with its return code
        rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        model.sampling.response_logprobs = real
        sys.argv = saved_argv
    counts.update(rc=rc, wall_s=round(time.perf_counter() - t0, 1))
    saved = 1 - counts["response_rows"] / max(1, counts["positions"])
    print("rows_sent", json.dumps({**counts, "saved_frac": round(saved, 4)}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
