"""The training loop: one phase (pretrain or finetune) of the paper's VAE.

Every process runs it (README.md, "Running distributed"). A step never waits for the device: the ranks read
the losses and agree on faults only at sync points (:meth:`Trainer._sync_point`).
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path
from typing import NoReturn

from pegasus_dist.config import Config, load_config
from pegasus_dist.console import exit_on_user_error, setup_logging
from pegasus_dist.data.loader import global_batch_sizes
from pegasus_dist.errors import REQUEUE_EXIT_CODE, ConfigError, Preempted
from pegasus_dist.training import faults
from pegasus_dist.training.checkpoint import newest_intact_checkpoint, save_checkpoint
from pegasus_dist.training.finish import sample_and_evaluate
from pegasus_dist.training.hooks import Hooks, with_fault_plan
from pegasus_dist.training.launcher_watch import end_with_launcher
from pegasus_dist.training.lock import release_run_lock
from pegasus_dist.training.optim import DivergenceGuard
from pegasus_dist.training.progress import Progress
from pegasus_dist.training.start import RunComplete, batch_description, start_phase
from pegasus_dist.training.state import mark_finished
from pegasus_dist.training.step import EpochPlan, TrainStep
from pegasus_dist.training.window import Window, reduce_windows

log = logging.getLogger("pegasus_dist.training.loop")


def train(cfg: Config, hooks: Hooks | None = None) -> Path:
    """Run one phase to its end and return the run directory; :class:`Preempted` on a stop."""
    try:
        hooks = with_fault_plan(hooks)
    except ConfigError as err:
        faults.fail_with_every_rank(err)
    try:
        trainer = Trainer(cfg, hooks)
    except BaseException as err:  # complete, or a start-up error: no run holds the folder any more
        release_run_lock(cfg.run_dir)
        if isinstance(err, RuntimeError) and (lost := faults.peer_lost(err, "start-up")):
            raise lost from None
        if not isinstance(err, RunComplete):
            raise
        log.info("%s", err)
        return cfg.run_dir
    try:
        trainer.run_epochs()
        trainer.finish()
    except OSError as err:
        if (lost := faults.run_folder_lost(err, cfg.run_dir)) is None:
            raise
        raise lost from None
    except RuntimeError as err:  # a collective of the end of the phase (run_epochs names its steps)
        if (lost := faults.peer_lost(err, f"the end of the phase (step {trainer.state.step})")) is None:
            raise
        raise lost from None
    finally:
        trainer.signals.restore()
        release_run_lock(cfg.run_dir)  # taken by the main process at start-up
    return cfg.run_dir


class Trainer:
    """One phase: started by the constructor, trained by :meth:`run_epochs`, ended by :meth:`finish`."""

    def __init__(self, cfg: Config, hooks: Hooks | None = None) -> None:
        """Start the phase once every rank has passed its start-up checks; :class:`RunComplete` if done."""
        self.hooks = hooks or Hooks()
        started = start_phase(cfg, self.hooks)
        self.cfg, self.accelerator, self.models = started.cfg, started.accelerator, started.models
        self.loader, self.state, self.schedule = started.loader, started.state, started.schedule
        self.metrics = started.metrics
        self.watch = faults.NonfiniteWatch(self.accelerator.device)
        self.train_step = TrainStep(self.cfg, self.accelerator, self.models, self.schedule, self.watch,
                                    self.hooks)
        self.batch_description = batch_description(self.cfg, self.accelerator)  # for the errors
        self.guard = DivergenceGuard(self.schedule, self.batch_description)
        self.plan = EpochPlan([], whole=0)  # of the epoch in progress
        self.window = Window(self.accelerator.device)  # the loss sums since the last log
        self.last_step = self.cfg.train.max_steps  # 0: none
        self.last_save = time.monotonic()  # train.checkpoint_minutes counts from here (main process)
        self.signals = faults.StopSignals()
        try:
            self.stops = faults.StopPoll(self.accelerator, self.signals, self.cfg.train.collective_timeout_s)
            self.hooks.run("after_start", self)
        except BaseException:  # no run to stop: the caller (a notebook, a test) keeps its own handlers
            self.signals.restore()
            raise

    def run_epochs(self, until_step: int | None = None) -> None:
        """Train to the end of the phase, or to ``until_step`` (the benchmark times the loop so)."""
        cfg = self.cfg
        self.last_step = until_step or cfg.train.max_steps
        self.models.model.train()
        self.window = Window(self.accelerator.device)
        progress = Progress(cfg.train.phase, cfg.train.epochs, len(self.loader), self.last_step,
                            enabled=self.accelerator.is_main_process,
                            grad_accum_steps=cfg.train.grad_accum_steps)
        with self.signals.training():
            try:
                while self.state.epoch < cfg.train.epochs and not self._reached_last_step():
                    self._run_epoch(progress)
            except (RuntimeError, MemoryError) as err:
                where = f"step {self.state.step + 1} (epoch {self.state.epoch + 1})"
                oom = faults.out_of_memory(err, where, self.batch_description, cfg.data.batch_size)
                if known := oom or faults.loader_worker_lost(err, where) or faults.peer_lost(err, where):
                    raise known from None
                raise
            if self.window.steps:
                self._sync_point(log_metrics=True, checkpoint=False)
        self.stops.drain()

    def _run_epoch(self, progress: Progress) -> None:
        """Epoch ``state.epoch`` from ``state.samples_done`` on, to its end or the last step."""
        cfg, state, world_size = self.cfg, self.state, self.accelerator.num_processes
        sizes = global_batch_sizes(self.loader.num_samples, world_size, cfg.data.batch_size,
                                   state.samples_done)
        self.plan = EpochPlan(sizes, whole=len(self.loader))
        self.loader.set_epoch(state.epoch, start_sample=state.samples_done)
        with progress.epoch(state.epoch, self.plan.first) as shown:
            for batch in self.loader:
                self.hooks.run("before_micro_batch", self, batch)
                ends_step = self.plan.micro_batch(cfg.train.grad_accum_steps)[1]
                losses, images = self.train_step(batch, state, self.plan)
                state.step += ends_step
                self.plan.advance(state)
                shown.update(state.step, images * world_size)
                self.window.add(losses, images, batch.skipped)
                if ends_step and self._after_step():
                    break
        if self.plan.finished:
            self._sync_point(log_metrics=False, checkpoint=False)
        elif not self._reached_last_step():  # a bug, never a loop: the loader fell short of its plan
            raise RuntimeError(f"the loader ended epoch {state.epoch + 1} after {self.plan.done} of "
                               f"its {len(self.plan.sizes)} planned batches")

    def _after_step(self) -> bool:
        """After each optimizer step: a sync point when one is due. True when the run is at its last step."""
        step, every = self.state.step, self.cfg.train.checkpoint_every
        self.guard.note_step(self.window, step)
        stop_now = self.stops.after_step()  # every step, on every rank
        log_now = step % self.cfg.train.log_every == 0
        save_now = bool(every) and step % every == 0
        if stop_now or log_now or save_now:
            self._sync_point(log_metrics=log_now, checkpoint=save_now)
        return self._reached_last_step()

    def _reached_last_step(self) -> bool:
        return bool(self.last_step) and self.state.step >= self.last_step

    def _sync_point(self, log_metrics: bool, checkpoint: bool) -> None:
        """Agree on faults, then log the window and checkpoint, or stop for a requeue."""
        agreement = self._agree()
        diverged = self.guard.check(self.accelerator, self.window, self.state)  # before the reset
        if log_metrics:
            self._log_window()
        if diverged:  # in the warm-up; before any checkpoint, after logging what diverged
            raise self._agreed(diverged)
        if agreement.stop:
            self._stop_for_requeue()
        elif checkpoint or agreement.save:
            self._save()

    def _agree(self) -> faults.Agreement:
        """Whether to stop or save; raises if a loss was NaN/Inf since the last sync point. Called before
        every checkpoint, so that weights updated after a NaN/Inf are never saved."""
        minutes = self.cfg.train.checkpoint_minutes
        save_due = bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes
        agreement = faults.agree(self.accelerator, self.signals.received is not None, self.watch, save_due)
        self.state.scaler_skipped_steps += self.train_step.dropped_updates()
        if (step := agreement.first_bad_step) is not None:
            last = newest_intact_checkpoint(self.cfg.run_dir / "checkpoints", move_damaged=False)
            where = faults.describe_position(step, *self.watch.positions[step], agreement.bad_ranks)
            raise self._agreed(faults.TrainingError(
                f"non-finite loss at {where} (found at step {self.state.step}); last good checkpoint: "
                f"{last or 'none yet'}; {self.schedule.describe()}; lower optim.lr (a resumed run applies "
                "it) or optim.grad_clip, or set train.on_nonfinite=skip to skip such steps"))
        self.watch.positions.clear()
        return agreement

    def _agreed(self, err: faults.TrainingError) -> faults.TrainingError:
        """``err``, which every rank found at the same sync point: the main process's line says it for all."""
        err.reported = not self.accelerator.is_main_process
        return err

    def _log_window(self) -> None:
        """Reduce the window's sums over all ranks (one all-reduce, one host read) and log per-image means."""
        state, window = self.state, self.window
        sums = reduce_windows(self.accelerator, window)[0]
        state.bad_samples_skipped += int(sums.bad_samples)
        row = {
            "lr": self.models.optimizer.param_groups[0]["lr"],
            "images_per_s": sums.images / (time.perf_counter() - window.started),
            "epoch": state.epoch + state.samples_done / self.loader.num_samples,
            "scaler_skipped_steps": state.scaler_skipped_steps,
            "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
            "bad_samples_skipped": state.bad_samples_skipped,
        } | sums.means(self.cfg.loss)
        if self.accelerator.scaler is not None:  # fp16: the scale beside the updates it dropped
            row["loss_scale"] = self.accelerator.scaler.get_scale()
        self.metrics.log({f"{self.cfg.train.phase}/{k}": v for k, v in row.items()}, step=state.step)
        window.reset()

    def _save(self) -> Path:
        """Every rank checkpoints; call it right after :meth:`_agree`, so that the weights are good."""
        folder = save_checkpoint(self.accelerator, self.state, self.cfg.to_yaml(),
                                 root=self.cfg.run_dir / "checkpoints", keep=self.cfg.train.keep_checkpoints,
                                 before_counters=partial(self.hooks.run, "during_save"),
                                 ema=self.models.ema)
        self.last_save = time.monotonic()
        return folder

    def _stop_for_requeue(self) -> NoReturn:
        """Checkpoint on every rank, then leave with the code the SLURM scripts requeue on."""
        folder = self._save()
        self.signals.checkpointed = True
        log.warning("stopped by signal at step %d; checkpoint %s; exit %d to be requeued",
                    self.state.step, folder, REQUEUE_EXIT_CODE)
        self.metrics.close()
        raise Preempted(folder)

    def finish(self) -> None:
        """Final checkpoint, then the grids and the evaluation on the main process while the others wait."""
        self._agree()  # the end of the run; a stop signal now changes nothing: the final checkpoint follows
        final = self._save()
        if self.accelerator.is_main_process:
            ema = self.models.ema  # the averaged weights, when kept, are the ones saved for sampling
            model = (ema.module if ema is not None
                     else self.accelerator.unwrap_model(self.models.model, keep_torch_compile=False))
            sample_and_evaluate(self.cfg, model, self.metrics, self.state.step, final)
            mark_finished(self.cfg.run_dir, final)
        self.accelerator.wait_for_everyone()
        self.metrics.close()


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are ConfigErrors: one ``error:`` line, the usage, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}\n{self.format_usage().strip()}")


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line's config; a wrong command line or config still ends every rank with one line."""
    parser = _ArgumentParser(prog="pegasus_dist/train.py",
                             description="Train one phase of the winged-horse VAE.",
                             epilog="Overrides: section.key=value, e.g. train.epochs=5 data.batch_size=64")
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    try:
        args = parser.parse_args(argv)
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        faults.fail_with_every_rank(err)


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> None:
    """The entry point of every launcher: ``argv`` as on the command line (sys.argv[1:] when None)."""
    setup_logging()
    end_with_launcher()
    exit_on_user_error(lambda: train(parse_args(argv), hooks))

