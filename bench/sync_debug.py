"""``pegasus-dist train`` with CUDA's sync-debug mode on (``python -m bench.sync_debug --config ...``).

``torch.cuda.set_sync_debug_mode("warn")`` makes every CUDA call that makes the host
wait for the device warn ("called a synchronizing CUDA operation"). Python shows a
warning once per place by default; here each one is shown, so that the log holds one
line per synchronising call and bench/gpu-check.sh can count them. The training loop
means to wait only at its sync points (pegasus_dist/training/loop.py): a warning
between them is a wait a step need not make.

A diagnostic of the bench, not an option of the library: this sets the mode, then
runs the training entry point in this process with the same arguments. Without a
CUDA device the mode cannot be set (torch raises) and nothing could warn: it says
so and trains without it.
"""

from __future__ import annotations

import logging
import warnings

import torch

from pegasus_dist.training.loop import main as train_main

log = logging.getLogger("bench.sync_debug")
SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda's text, what the log is searched for


def main(argv: list[str] | None = None) -> None:
    """Train with every synchronising CUDA call warned; ``argv`` as ``pegasus-dist train`` takes them
    (``--config`` and overrides), sys.argv[1:] when None."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    else:
        log.warning("no CUDA device: the sync-debug mode is CUDA's, so this trains without it")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=SYNC_WARNING)
            train_main(argv)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    main()
