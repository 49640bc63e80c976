"""The real trainer with one injected fault, for tests/test_faults.py.

    python train_with_fault.py FAULT STEP RANK --config ... [overrides]

FAULT is one of
  nan        the loss of rank RANK is NaN at step STEP
  kill-rank  rank RANK kills itself (SIGKILL) at step STEP
  slow-save  the checkpoint of step STEP stalls half-written (the test SIGKILLs it then);
             a file "saving" appears in the run folder when it does
  slow       every step takes STEP milliseconds more (RANK is ignored), so that a test
             can kill or signal a run mid-epoch; the numbers it computes are unchanged
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from pegasus_dist.training import checkpoint
from pegasus_dist.training import loop as train

fault, step, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
me = int(os.environ.get("RANK", "0"))
calls = {"n": 0}

if fault == "nan":
    real_loss = train.vae_loss

    def vae_loss(*args, **kwargs):
        calls["n"] += 1
        terms = real_loss(*args, **kwargs)
        if calls["n"] == step and me == rank:
            terms.total = terms.total * torch.tensor(float("nan"))
        return terms

    train.vae_loss = vae_loss
elif fault == "kill-rank":
    real_step = train.train_step

    def train_step(p, batch):
        calls["n"] += 1
        if calls["n"] == step and me == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(p, batch)

    train.train_step = train_step
elif fault == "slow-save":
    real_write = checkpoint.write_counters

    def write_counters(folder, state, config_yaml):
        if state.step == step:
            (folder / "model.safetensors").write_bytes(b"half")
            Path(folder.parent.parent / "saving").touch()
            time.sleep(600)
        real_write(folder, state, config_yaml)

    checkpoint.write_counters = write_counters
elif fault == "slow":
    real_step = train.train_step

    def train_step(p, batch):
        time.sleep(step / 1000)
        return real_step(p, batch)

    train.train_step = train_step
else:
    sys.exit(f"unknown fault {fault}")

train.main(sys.argv[4:])
