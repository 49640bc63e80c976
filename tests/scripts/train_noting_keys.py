"""The real trainer, noting the samples each rank trains (tests/test_resume_replan.py).

    python train_noting_keys.py OUT_DIR --config ... [overrides]

Before each micro-batch (a ``before_micro_batch`` hook), each rank appends one
JSON line to OUT_DIR/keys-rank<R>.jsonl: the epoch (from 0), the optimizer
step the micro-batch belongs to (from 1) and the keys of its samples. The
numbers it computes are unchanged.
"""

import json
import sys
from pathlib import Path

from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.loop import main

out = Path(sys.argv[1])


def note_keys(trainer, batch) -> None:
    row = {"epoch": trainer.state.epoch, "step": trainer.state.step + 1, "keys": list(batch.keys)}
    with (out / f"keys-rank{trainer.accelerator.process_index}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


main(sys.argv[2:], hooks=Hooks(before_micro_batch=[note_keys]))
