"""Rows the LM-head kernel receives during a train.py run: B x T completion positions vs response tokens.

    python -m bench.rows_sent --name rowcount          # the default main job, counted (any train.py flags)

Wraps `train.response_logprobs` (SFT steps, the rollouts' old log-probs, RL updates) and prints one JSON line:
calls, positions (B x T per call: what the kernel got before only response rows were sent) and response_rows
(what it gets now).
"""

import json
import sys
import time

import train


def main(argv=None) -> int:
    counts = {"calls": 0, "positions": 0, "response_rows": 0}
    real = train.response_logprobs

    def counting(model, prompt_ids, prompt_mask, completion_ids, response_mask, **kw):
        counts["calls"] += 1
        counts["positions"] += completion_ids.numel()
        counts["response_rows"] += int(response_mask.sum())  # host sync: a measurement tool
        return real(model, prompt_ids, prompt_mask, completion_ids, response_mask, **kw)

    train.response_logprobs = counting
    t0 = time.perf_counter()
    try:
        rc = train.main(argv)
    finally:
        train.response_logprobs = real
    counts.update(rc=rc, wall_s=round(time.perf_counter() - t0, 1))
    saved = 1 - counts["response_rows"] / max(1, counts["positions"])
    print("rows_sent", json.dumps({**counts, "saved_frac": round(saved, 4)}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
