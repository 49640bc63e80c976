"""The real trainer, noting at which micro-batches DDP all-reduces gradients (tests/test_scaling.py).

    python train_noting_syncs.py OUT_DIR --config ... [overrides]

A DDP communication hook that all-reduces as DDP does by default, and first
notes the rank's ``epoch_plan.done`` (micro-batches taken so far in the
epoch); each rank writes the values it saw to OUT_DIR/rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pegasus_dist.training import loop as train

out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
synced: set[int] = set()
real_setup = train.setup


def setup(cfg):
    phase = real_setup(cfg)

    def hook(process_group, bucket):
        synced.add(phase.epoch_plan.done)
        return default_hooks.allreduce_hook(process_group, bucket)

    phase.model.register_comm_hook(None, hook)
    return phase


train.setup = setup
try:
    train.main(sys.argv[2:])
finally:
    (out / f"rank{rank}.json").write_text(json.dumps(sorted(synced)))
