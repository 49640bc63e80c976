"""Faults that stop a run cleanly: preemption signals and non-finite losses.

Every step the ranks agree, in one small all-reduce, on two facts: did any
rank get a stop signal (SLURM's warning ``SIGUSR1`` before a time limit or
preemption, or ``SIGTERM``), and was any rank's loss NaN or Inf. Agreeing
matters: a rank that checkpoints or skips alone would leave the others
waiting in a collective forever.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
from accelerate import Accelerator

from pegasus_dist.errors import PegasusError

log = logging.getLogger("pegasus_dist.faults")

# sysexits.h EX_TEMPFAIL: "try again later". The SLURM scripts requeue the job on it.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class TrainingError(PegasusError):
    """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite=stop)."""

    exit_code = 3


class Preempted(Exception):  # noqa: N818 (not an error: a requested, clean stop)
    """Raised after the stop checkpoint is written; the process exits with REQUEUE_EXIT_CODE."""


class StopSignals:
    """Records SIGUSR1/SIGTERM instead of dying, so the step in flight can finish."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree(
    accelerator: Accelerator, stop_requested: bool, loss: torch.Tensor
) -> tuple[bool, list[int]]:
    """(any rank asked to stop, ranks whose loss is not finite), the same answer on every rank."""
    stop = torch.tensor(float(stop_requested), device=accelerator.device)
    local = torch.stack([stop, (~torch.isfinite(loss.detach())).float()])
    flags = accelerator.gather(local[None]).view(-1, 2).cpu()  # one row per rank
    bad_ranks = [int(r) for r in torch.nonzero(flags[:, 1]).flatten()]
    return bool(flags[:, 0].any()), bad_ranks
