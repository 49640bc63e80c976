"""Where a training phase stands, shown on the main process only.

On a terminal a tqdm bar per epoch. Elsewhere (a SLURM log, a pipe), where a bar would write
every redraw into the file, a log line every ``PLAIN_EVERY_S`` seconds and at each epoch's end:

    pretrain: epoch 2/10, batch 40/94, step 134/940, 1,530 images/s, ETA 0:08:47
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TextIO

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PLAIN_EVERY_S = 30.0  # often enough to see a run move, rare enough to keep a week's log short

log = logging.getLogger("pegasus_dist.training.progress")


class Progress:
    """One phase's progress: :meth:`epoch` opens an epoch, then :meth:`update` follows each step."""

    def __init__(self, phase: str, epochs: int, batches_per_epoch: int, max_steps: int,
                 enabled: bool, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, grad_accum_steps: int = 1) -> None:
        self.phase, self.epochs, self.batches = phase, epochs, batches_per_epoch
        # Steps count optimizer steps, each of up to grad_accum_steps batches (micro-batches).
        self.accum = grad_accum_steps
        all_steps = epochs * -(-batches_per_epoch // grad_accum_steps)
        self.last_step = min(all_steps, max_steps or all_steps)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.use_bar = enabled and self.stream.isatty()
        self.clock, self.started = clock, clock()
        self.steps_done = 0  # batches trained by this process, for the ETA
        self.logged_step: int | None = None
        self.window_started, self.window_images = self.clock(), 0

    @contextmanager
    def epoch(self, epoch: int, batches_done: int) -> Iterator[Progress]:
        """Progress within epoch ``epoch`` (0-based), resumed at ``batches_done``."""
        self.current_epoch, self.batches_done = epoch, batches_done
        self.step: int | None = None  # None until a step is taken in this epoch
        if self.use_bar:
            with logging_redirect_tqdm(), tqdm(
                total=self.batches, initial=batches_done, unit="batch", dynamic_ncols=True,
                desc=f"{self.phase} epoch {epoch + 1}/{self.epochs}", file=self.stream,
            ) as self.bar:
                yield self
        else:
            yield self
            # Not reached when the epoch ends by an exception: its own message says why.
            if self.enabled and self.step not in (None, self.logged_step):
                self._log_line()

    def update(self, step: int, images: int) -> None:
        """After each step: ``step`` is the global step now, ``images`` those of all ranks."""
        if not self.enabled:
            return
        self.step = step
        self.batches_done += 1
        self.steps_done += 1
        self.window_images += images
        if self.use_bar:
            self.bar.update()
        elif self.clock() - self.window_started >= PLAIN_EVERY_S:
            self._log_line()

    def _log_line(self) -> None:
        now = self.clock()
        rate = self.window_images / max(now - self.window_started, 1e-9)
        # The ETA: at this process's mean pace so far (sync points and checkpoints included).
        left = max(self.last_step - self.step, 0) * self.accum * (now - self.started) / self.steps_done
        log.info("%s: epoch %d/%d, batch %d/%d, step %d/%d, %s images/s, ETA %s",
                 self.phase, self.current_epoch + 1, self.epochs, self.batches_done, self.batches,
                 self.step, self.last_step, f"{rate:,.0f}", timedelta(seconds=round(left)))
        self.logged_step = self.step
        self.window_started, self.window_images = self.clock(), 0
