"""The real trainer, noting at which micro-batches DDP all-reduces gradients (tests/test_scaling.py).

    python train_noting_syncs.py OUT_DIR --config ... [overrides]

Once started (an ``after_start`` hook), the model gets a DDP communication
hook that all-reduces as DDP does by default, and first notes the rank's
``trainer.plan.done`` (micro-batches taken so far in the epoch); each rank
writes the values it saw to OUT_DIR/rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.loop import main

out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
synced: set[int] = set()


def note_syncs(trainer) -> None:
    def all_reduce(process_group, bucket):
        synced.add(trainer.plan.done)
        return default_hooks.allreduce_hook(process_group, bucket)

    trainer.models.model.register_comm_hook(None, all_reduce)


try:
    main(sys.argv[2:], hooks=Hooks(after_start=[note_syncs]))
finally:
    (out / f"rank{rank}.json").write_text(json.dumps(sorted(synced)))
