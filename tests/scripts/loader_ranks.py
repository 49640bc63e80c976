"""Run by tests/test_ddp.py on 2 ranks: each rank iterates its ShardLoader for 2 epochs.

Once per number of loader workers given, writes per rank and epoch the keys
of every batch in order, so the test can check equal batch counts and that
each sample is seen exactly once per epoch, with and without workers.
"""

import json
import os
import sys

from pegasus_dist.data.loader import ShardLoader

shard_set, out_dir, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
for workers in map(int, sys.argv[4:]):
    loader = ShardLoader(shard_set, batch_size=batch_size, rank=rank, world_size=world,
                         num_workers=workers, seed=0, image_size=32)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([list(batch.keys) for batch in loader])
    with open(os.path.join(out_dir, f"workers{workers}-rank{rank}.json"), "w") as f:
        json.dump({"len": len(loader), "epochs": epochs}, f)
