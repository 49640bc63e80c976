"""The real trainer, noting the samples each rank trains (tests/test_resume_replan.py).

    python train_noting_keys.py OUT_DIR --config ... [overrides]

Before each micro-batch, each rank appends one JSON line to
OUT_DIR/keys-rank<R>.jsonl: the epoch (from 0), the optimizer step the
micro-batch belongs to (from 1) and the keys of its samples. The numbers it
computes are unchanged.
"""

import json
import os
import sys
from pathlib import Path

from pegasus_dist.training import loop as train

out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
real_step = train.train_step


def train_step(p, batch):
    row = {"epoch": p.state.epoch, "step": p.state.step + 1, "keys": list(batch.keys)}
    with (out / f"keys-rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return real_step(p, batch)


train.train_step = train_step
train.main(sys.argv[2:])
