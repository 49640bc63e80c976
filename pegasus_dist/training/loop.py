"""The training loop: one phase (pretrain or finetune) of the paper's VAE.

    accelerate launch pegasus_dist/train.py --config configs/pretrain.yaml [section.key=value ...]
    python pegasus_dist/train.py --config configs/smoke/pretrain.yaml
    pegasus-dist train --config ...

Every process runs this file; one process is world size 1. Each rank reads
its slice of every global batch from the shards, Accelerate wraps the model
in DDP and handles mixed precision, and only the main process writes the run
directory, the W&B run, the sample grids and checkpoint pruning, with the
other ranks waiting at barriers. A step never waits for the device: losses
stay on it, and the ranks read them and agree on faults only at sync points
(:func:`_sync_point`), every ``train.log_every`` steps and before checkpoints.

A resumed run continues at the sample of its epoch's seeded order where its
checkpoint stopped (``state.json``'s ``samples_done``), whatever its number
of processes, per-process batch or accumulation steps: the rest of the epoch
is planned anew from there (:func:`_resume_position`), so nothing of it is
trained twice or skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from pegasus_dist.config import Config, load_config
from pegasus_dist.console import exit_on_user_error, setup_logging
from pegasus_dist.data.loader import MemoryLoader, ShardLoader, global_batch_sizes, make_loader
from pegasus_dist.errors import REQUEUE_EXIT_CODE, CheckpointError, ConfigError, DataError, Preempted
from pegasus_dist.evaluation.classifier import Classifier, find_classifier
from pegasus_dist.evaluation.heldout import DESCRIPTIVE, evaluate, write_eval
from pegasus_dist.evaluation.quality import flatten, score_run_samples, summary_line
from pegasus_dist.evaluation.sampler import run_sampler
from pegasus_dist.model import acai
from pegasus_dist.model.adversaries import (
    KINDS,
    Adversaries,
    discriminator_loss,
    enabled_adversaries,
    generator_loss,
)
from pegasus_dist.model.loss import kl_weight, vae_loss
from pegasus_dist.model.saved import ADVERSARIES, latest_checkpoint, load_model_weights, resolve_checkpoint
from pegasus_dist.model.vae import VAE, num_parameters
from pegasus_dist.training.checkpoint import (
    check_resumable,
    held_adversaries,
    newest_intact_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from pegasus_dist.training.distributed import (
    build_accelerator,
    convert_sync_batchnorm,
    warn_if_launcher_precision_differs,
)
from pegasus_dist.training.faults import (
    Agreement,
    NonfiniteWatch,
    StopPoll,
    StopSignals,
    TrainingError,
    agree,
    agree_on_start,
    fail_with_every_rank,
    nonfinite_ranks,
)
from pegasus_dist.training.launcher_watch import end_with_launcher
from pegasus_dist.training.lock import hold_run_lock, release_run_lock
from pegasus_dist.training.optim import DivergenceGuard, LrSchedule, apply_on_resume, build_optimizer, set_lr
from pegasus_dist.training.progress import Progress
from pegasus_dist.training.state import TrainState, is_complete, is_finished, mark_finished, read_state
from pegasus_dist.training.tracking import MetricsLog, new_run_id, start_tracking, tracker_names

log = logging.getLogger("pegasus_dist.training.loop")


@dataclass
class _EpochPlan:
    """The global batches of the epoch in progress that this run trains: from where it resumed on."""

    sizes: list[int]  # samples in each global micro-batch, in order
    whole: int  # batches of a whole epoch at this run's batch and world size
    done: int = 0  # of ``sizes``, trained

    @property
    def first(self) -> int:
        """Batches of a whole epoch that the resume position stands for (0 in an epoch begun here)."""
        return self.whole - len(self.sizes)

    @property
    def finished(self) -> bool:
        return self.done == len(self.sizes)

    def batch_number(self) -> int:
        """The batch in progress, counted from 1 in the epoch (for messages)."""
        return self.first + self.done + 1


@dataclass
class Phase:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: ShardLoader | MemoryLoader
    state: TrainState
    metrics: MetricsLog
    signals: StopSignals
    watch: NonfiniteWatch
    schedule: LrSchedule
    guard: DivergenceGuard
    stops: StopPoll
    # train.on_nonfinite=skip: the ranks whose loss was NaN/Inf in the optimizer
    # step in progress; the whole step is skipped at its last micro-batch.
    skip_ranks: list[int] = field(default_factory=list)
    epoch_plan: _EpochPlan = field(default_factory=lambda: _EpochPlan([], 0))
    # ACAI's critic and the patch discriminator (adversaries.Adversaries, prepared: DDP
    # across ranks) and their Adam, when loss.acai_weight or loss.patch_gan_weight > 0.
    adversaries: torch.nn.Module | None = None
    adversary_optimizer: torch.optim.Optimizer | None = None

    @property
    def global_batch(self) -> int:
        return _global_batch(self.cfg, self.accelerator)


class RunComplete(Exception):  # noqa: N818 (not an error: there is nothing left to do)
    """The checkpoint to resume from already ends the phase (:func:`checkpoint.is_complete`)."""


def train(cfg: Config) -> Path:
    """Run one phase to its end and return the run directory.

    A phase whose newest checkpoint is complete says so and returns at once,
    without sampling, evaluating or logging again. Raises :class:`Preempted`
    after checkpointing when a stop signal arrived.
    """
    try:
        phase = setup(cfg)
    except RunComplete as done:
        log.info("%s", done)
        release_run_lock(cfg.run_dir)
        return cfg.run_dir
    try:
        run_epochs(phase)
        finish(phase)
    finally:
        phase.signals.restore()
        release_run_lock(cfg.run_dir)  # taken by the main process in _lock_run_dir
    return cfg.run_dir


def setup(cfg: Config) -> Phase:
    """Everything the loop needs, once every rank has passed its start-up checks.

    Raises :class:`RunComplete` (on every rank) when the checkpoint to resume
    from already ends the phase.
    """
    try:
        accelerator = build_accelerator(cfg, tracker_names(cfg))
    except ConfigError as err:  # e.g. fp16 on a CPU, found before the ranks formed a group
        fail_with_every_rank(err)
    cfg = agree_on_start(accelerator, lambda: _with_batch(cfg, accelerator.num_processes))
    agree_on_start(accelerator, lambda: _lock_run_dir(cfg, accelerator))  # before any rank reads it
    start = agree_on_start(accelerator, lambda: _start(cfg, accelerator))
    state, resume_from, loader = start.state, start.resume_from, start.loader
    if loader is None:
        accelerator.end_training()
        raise RunComplete(
            f"{cfg.train.phase} in {cfg.run_dir} is already complete at step {state.step} "
            f"(train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}; "
            f"checkpoint {resume_from}); raise train.epochs or train.max_steps to train on"
        )
    _prepare_run_dir(accelerator, cfg)
    if accelerator.is_main_process:
        warn_if_launcher_precision_differs(cfg)
    model = torch.compile(start.model) if cfg.train.compile else start.model
    model, optimizer = accelerator.prepare(model, start.optimizer)
    # The adversaries' optimizer stays unprepared: their loss is never scaled by fp16's
    # GradScaler, whose one scale per step belongs to the autoencoder's optimizer.
    adversaries = accelerator.prepare_model(start.adversaries) if start.adversaries is not None else None
    if start.adversary_optimizer is not None:
        accelerator.register_for_checkpointing(start.adversary_optimizer)
    if resume_from is not None:  # after prepare: load_state fills what it prepared
        agree_on_start(accelerator, lambda: restore_checkpoint(accelerator, resume_from))
    global_batch = _global_batch(cfg, accelerator)
    schedule = LrSchedule(cfg.optim, global_batch)
    if resume_from is not None:
        log.info("resumed from %s: epoch %d, %d of its %d samples trained, step %d",
                 resume_from, state.epoch + 1, state.samples_done, loader.num_samples, state.step)
        if accelerator.is_main_process:
            _log_replan(cfg, state, global_batch, loader.num_samples)
        apply_on_resume(optimizer, schedule, state.step, resume_from)
    state.global_batch = global_batch  # what this run's checkpoints record
    start_tracking(accelerator, cfg, state, global_batch, schedule.peak)
    metrics = MetricsLog(accelerator, cfg.run_dir)
    if resume_from is not None:
        metrics.resume(state.step)  # the rows after the checkpoint are recomputed
    log.info(
        "%s: %s parameters, %d samples in %s, world_size=%d, %s, %d batches per epoch; %s, "
        "grad clip %s",
        cfg.train.phase, f"{num_parameters(model):,}", loader.num_samples, loader.path,
        accelerator.num_processes, _batch_description(cfg, accelerator), len(loader),
        schedule.describe(), f"{cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "off",
    )
    signals = StopSignals()
    return Phase(cfg, accelerator, model, optimizer, loader, state, metrics, signals,
                 NonfiniteWatch(accelerator.device), schedule,
                 DivergenceGuard(schedule, _batch_description(cfg, accelerator)),
                 StopPoll(accelerator, signals, cfg.train.collective_timeout_s),
                 adversaries=adversaries, adversary_optimizer=start.adversary_optimizer)


def run_epochs(p: Phase) -> None:
    """Train to the end of the phase; the ranks wait for each other only at sync points.

    Bounded whatever the checkpoint said: each pass of the loop trains the rest
    of one epoch (its position was checked at start-up) or stops at
    ``train.max_steps``, and a stop signal ends it within two steps.
    """
    cfg, state = p.cfg, p.state
    p.model.train()
    window = _Window(p.accelerator.device)
    progress = Progress(cfg.train.phase, cfg.train.epochs, len(p.loader), cfg.train.max_steps,
                        enabled=p.accelerator.is_main_process,
                        grad_accum_steps=cfg.train.grad_accum_steps)
    with p.signals.training():
        while state.epoch < cfg.train.epochs and not _reached_max_steps(p):
            _run_epoch(p, window, progress)
        if window.steps:
            _sync_point(p, window, log_metrics=True, checkpoint=False)
    p.stops.drain()


def _run_epoch(p: Phase, window: _Window, progress: Progress) -> None:
    """Epoch ``state.epoch`` from ``state.samples_done`` on, to its end or ``train.max_steps``."""
    cfg, state = p.cfg, p.state
    p.epoch_plan = _EpochPlan(
        global_batch_sizes(p.loader.num_samples, p.accelerator.num_processes, cfg.data.batch_size,
                           state.samples_done),
        whole=len(p.loader))
    p.loader.set_epoch(state.epoch, start_sample=state.samples_done)
    with progress.epoch(state.epoch, p.epoch_plan.first) as shown:
        for batch in p.loader:
            ends_step = _micro_batch(p)[1]
            terms, count = train_step(p, batch)
            state.step += ends_step
            _advance(p)
            shown.update(state.step, count * p.accelerator.num_processes)
            window.add(terms, count, batch.skipped)
            if not ends_step:  # gradients accumulate: no step yet, nothing to log or save
                continue
            p.guard.note_step(window.sums, state.step)
            stop_now = p.stops.after_step()  # every step, on every rank
            log_now = state.step % cfg.train.log_every == 0
            save_now = bool(cfg.train.checkpoint_every) and (
                state.step % cfg.train.checkpoint_every == 0)
            if stop_now or log_now or save_now:
                _sync_point(p, window, log_metrics=log_now, checkpoint=save_now)
            if _reached_max_steps(p):
                break
    if p.epoch_plan.finished:
        _sync_point(p, window, log_metrics=False, checkpoint=not cfg.train.checkpoint_every)
    elif not _reached_max_steps(p):  # a bug, never a loop: the loader fell short of its plan
        raise RuntimeError(f"the loader ended epoch {state.epoch + 1} after {p.epoch_plan.done} of "
                           f"its {len(p.epoch_plan.sizes)} planned batches")


def _advance(p: Phase) -> None:
    """Count the micro-batch just trained; after the epoch's last one the next epoch begins.

    So a checkpoint taken after the last step of an epoch resumes at the start
    of the next one, and one taken mid-epoch at the first sample not trained.
    """
    plan, state = p.epoch_plan, p.state
    state.samples_done += plan.sizes[plan.done]
    plan.done += 1
    if plan.finished:
        state.epoch += 1
        state.samples_done = 0


def train_step(p: Phase, batch) -> tuple[torch.Tensor, int]:
    """One micro-batch: forward and backward on this rank's share of the global batch.

    An optimizer step takes ``train.grad_accum_steps`` micro-batches (the
    epoch's last step may take fewer); the last of them all-reduces the
    gradients (DDP) and steps at the learning rate of ``p.schedule``.
    Returns the loss terms and the number of images (0 for a skipped one).
    Nothing here waits for the device, so the host queues the next step
    while this one runs; only ``train.on_nonfinite=skip`` reads every loss.
    """
    index, ends_step = _micro_batch(p)
    x = batch.images.to(p.accelerator.device, non_blocking=True).float().div_(255)
    if p.cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps, alpha = _batch_noise(p, batch, x.shape[0], index)
    weight = _loss_weight(p, x.shape[0], index)
    loss = p.cfg.loss
    pairs = acai.partners(x.shape[0], batch.offset, x.device) if loss.acai_weight else None
    # DDP all-reduces the gradients only in the backward of the step's last micro-batch.
    with contextlib.nullcontext() if ends_step else p.accelerator.no_sync(p.model):
        # Accelerate's prepare() already runs forward under autocast.
        out = p.model(x, eps, None if pairs is None else lambda mu: acai.mix_latents(mu, pairs, alpha))
        terms = vae_loss(out.logits, x, out.mu, out.logvar,
                         beta=kl_weight(loss.beta, loss.kl_warmup_steps, p.state.step),
                         free_bits=loss.free_bits, log_scale=out.log_scale)
        fooling = critic_terms = generator = discriminator = torch.zeros((), device=x.device)
        if p.adversaries is not None:
            # The decodes both adversaries see: interpolants (ACAI) and reconstructions.
            mixed = None if pairs is None else torch.sigmoid(out.mixed_logits)
            decoded = torch.sigmoid(out.logits)
            predicted_mix, patches = _frozen_adversaries(p, mixed,
                                                         decoded if loss.patch_gan_weight else None)
            if pairs is not None:
                fooling = acai.fooling_loss(predicted_mix, acai.interpolation_mask(pairs))
                terms.total = terms.total + loss.acai_weight * fooling
            if patches is not None:
                generator = generator_loss(patches)
                terms.total = terms.total + loss.patch_gan_weight * generator
        p.accelerator.backward(terms.total * weight)
    if p.adversaries is not None:
        critic_terms, discriminator = _adversaries_backward(p, x, mixed, decoded, alpha, pairs, weight,
                                                            ends_step)
    stacked = torch.stack([terms.total, terms.recon, terms.kl, critic_terms, fooling,
                           discriminator, generator]).detach()
    count = x.shape[0]
    if p.cfg.train.on_nonfinite == "skip":
        # The opt-in price of skipping: one host sync per micro-batch, so that every
        # rank skips the update at exactly the bad step.
        bad_ranks = nonfinite_ranks(p.accelerator, terms.total)
        if bad_ranks:
            p.skip_ranks = p.skip_ranks or bad_ranks
            stacked, count = torch.zeros_like(stacked), 0
    else:
        # With accumulation the batch named in an error is the step's last one.
        p.watch.record(p.state.step + 1, p.state.epoch + 1, p.epoch_plan.batch_number(), terms.total)
    if not ends_step:
        return stacked, count
    if p.skip_ranks:
        _skip_update(p, p.skip_ranks)
        p.skip_ranks = []
        return stacked, count
    set_lr(p.optimizer, p.schedule.at(p.state.step))
    if p.cfg.optim.grad_clip:
        p.accelerator.clip_grad_norm_(p.model.parameters(), p.cfg.optim.grad_clip)
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    if p.adversary_optimizer is not None:
        set_lr(p.adversary_optimizer, p.schedule.at(p.state.step))
        p.adversary_optimizer.step()
        p.adversary_optimizer.zero_grad(set_to_none=True)
    # A host flag set by fp16's GradScaler (which syncs in its step anyway); False otherwise.
    if p.accelerator.optimizer_step_was_skipped:
        p.state.scaler_skipped_steps += 1
    return stacked, count


def _frozen_adversaries(p: Phase, mixed: torch.Tensor | None,
                        decoded: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """C(x_a) and D(x_hat) for the autoencoder's terms: gradients reach the images, never the adversaries.

    Their own module with detached parameters, outside DDP: the adversaries are
    updated only by their own losses (:func:`_adversaries_backward`).
    """
    adversaries = p.accelerator.unwrap_model(p.adversaries)
    frozen = {name: value.detach() for name, value in adversaries.named_parameters()}
    with p.accelerator.autocast():
        return torch.func.functional_call(adversaries, frozen, (mixed, decoded))


def _adversaries_backward(p: Phase, x: torch.Tensor, mixed: torch.Tensor | None, decoded: torch.Tensor,
                          alpha: torch.Tensor | None, pairs: torch.Tensor | None, weight: float,
                          ends_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's and the discriminator's losses on detached decodes, backpropagated into them alone.

    One forward of the prepared adversaries per micro-batch (the critic over
    interpolants and blends, the discriminator over real images and
    reconstructions), so that DDP sees one use of them and all-reduces their
    gradients with the step's last one, like the autoencoder's. Returns both
    losses (0 for one that is off).
    """
    decoded = decoded.detach()
    critic_input = discriminator_input = None
    if mixed is not None:
        blends = acai.blend(x, decoded, p.cfg.loss.acai_gamma)
        critic_input = torch.cat([mixed.detach(), blends])
    if p.cfg.loss.patch_gan_weight:
        discriminator_input = torch.cat([x, decoded])
    critic_terms = discriminator_terms = torch.zeros((), device=x.device)
    with contextlib.nullcontext() if ends_step else p.accelerator.no_sync(p.adversaries):
        predicted, patches = p.adversaries(critic_input, discriminator_input)
        if predicted is not None:
            predicted_mix, predicted_blend = predicted.split(x.shape[0])
            critic_terms = acai.critic_loss(predicted_mix, alpha, predicted_blend,
                                            acai.interpolation_mask(pairs))
        if patches is not None:
            discriminator_terms = discriminator_loss(*patches.split(x.shape[0]))
        ((critic_terms + discriminator_terms) * weight).backward()
    return critic_terms, discriminator_terms


def _micro_batch(p: Phase) -> tuple[int, bool]:
    """(index of the next micro-batch within its optimizer step, whether it ends the step).

    Steps start at every train.grad_accum_steps-th batch of the epoch's plan
    (from the position this run resumed at, where a step began), and the
    epoch's last batch always ends one: checkpoints (taken only after a step)
    then resume at a step's start, and every epoch ends with its own step.
    """
    k, plan = p.cfg.train.grad_accum_steps, p.epoch_plan
    return plan.done % k, (plan.done + 1) % k == 0 or plan.done + 1 == len(plan.sizes)


def _loss_weight(p: Phase, count: int, index: int) -> float:
    """The factor on this micro-batch's per-image mean loss in the step's gradient.

    count * world_size / (images in the step's global batch): DDP then averages
    over the ranks, so the gradient is the mean over every image of the step
    (1.0 for a full batch without accumulation). A step of K micro-batches of
    B thus takes the gradient of one batch of K*B; the epoch's last step,
    with fewer or shorter micro-batches, is still the mean over its images.
    """
    first = p.epoch_plan.done - index
    images = sum(p.epoch_plan.sizes[first : first + p.cfg.train.grad_accum_steps])
    return count * p.accelerator.num_processes / images


def _global_batch(cfg: Config, accelerator: Accelerator) -> int:
    """Images per optimizer step: per-process batch x processes x accumulation steps."""
    return cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps


def _with_batch(cfg: Config, world_size: int) -> Config:
    """``cfg`` whose data.batch_size is the per-process share of data.global_batch_size, when set.

    The global batch then stays what the config says on any number of
    processes; data.batch_size is not used (the start-up line states the batch).
    """
    wanted, k = cfg.data.global_batch_size, cfg.train.grad_accum_steps
    if not wanted:
        return cfg
    if wanted % (world_size * k):
        raise ConfigError(
            f"data.global_batch_size={wanted} does not split evenly over {world_size} process(es) x "
            f"train.grad_accum_steps={k}; use a multiple of {world_size * k}"
        )
    data = cfg.data.model_copy(update={"batch_size": wanted // (world_size * k)})
    return cfg.model_copy(update={"data": data})


def _batch_description(cfg: Config, accelerator: Accelerator) -> str:
    source = " (data.global_batch_size)" if cfg.data.global_batch_size else ""
    return (f"global batch {_global_batch(cfg, accelerator)}{source} = per-process batch "
            f"{cfg.data.batch_size} x {accelerator.num_processes} process(es) x "
            f"{cfg.train.grad_accum_steps} accumulation step(s)")


def _skip_update(p: Phase, bad_ranks: list[int]) -> None:
    """train.on_nonfinite=skip: drop this step's gradients on every rank alike, and count it."""
    p.optimizer.zero_grad(set_to_none=True)
    if p.adversary_optimizer is not None:
        p.adversary_optimizer.zero_grad(set_to_none=True)
    p.state.nonfinite_skipped_steps += 1
    where = _where(p.state.step + 1, p.state.epoch + 1, p.epoch_plan.batch_number(), bad_ranks)
    log.warning("non-finite loss at %s: update skipped (%d so far)",
                where, p.state.nonfinite_skipped_steps)


def _sync_point(p: Phase, window: _Window, log_metrics: bool, checkpoint: bool) -> None:
    """Agree on faults, then log the window and checkpoint, or stop for a requeue.

    Sync points come every train.log_every steps, at checkpoint steps, at
    epoch ends, at the end of the run, and at the step where the ranks learn
    of a stop signal (:class:`StopPoll`, at most two steps after it).
    """
    stop = _agree(p)
    diverged = p.guard.check(p.accelerator, window.sums, p.state.step)  # before the window resets
    if log_metrics:
        _log_window(p, window)
    if diverged:  # in the warm-up; before any checkpoint, after logging what diverged
        raise diverged
    if stop:
        _stop_for_requeue(p)
    elif checkpoint:
        _save(p)


def _agree(p: Phase) -> bool:
    """Whether any rank asked to stop; raises if a loss was NaN/Inf since the last sync point.

    Checking before every checkpoint keeps the last one good: weights updated
    after a non-finite step are never saved.
    """
    agreement = agree(p.accelerator, p.signals.received is not None, p.watch)
    if agreement.first_bad_step is not None:
        raise _nonfinite_error(p, agreement)
    p.watch.clear()
    return agreement.stop


def _nonfinite_error(p: Phase, agreement: Agreement) -> TrainingError:
    step = agreement.first_bad_step
    epoch, batch = p.watch.position(step)
    last = latest_checkpoint(p.cfg.run_dir / "checkpoints")
    return TrainingError(
        f"non-finite loss at {_where(step, epoch, batch, agreement.bad_ranks)} "
        f"(found at step {p.state.step}); last good checkpoint: {last or 'none yet'}; "
        f"{p.schedule.describe()}; lower optim.lr (a resumed run applies it) or optim.grad_clip, "
        "or set train.on_nonfinite=skip to skip such steps"
    )


def _where(step: int, epoch: int, batch: int, ranks: list[int]) -> str:
    return f"step {step} (epoch {epoch}, batch {batch}) on rank(s) {ranks}"


def _stop_for_requeue(p: Phase) -> None:
    """Checkpoint on every rank, then leave with the code the SLURM scripts requeue on."""
    folder = _save(p)
    log.warning("stopped by signal at step %d; checkpoint %s; exit %d to be requeued",
                p.state.step, folder, REQUEUE_EXIT_CODE)
    p.accelerator.end_training()
    raise Preempted(folder)


def _batch_noise(p: Phase, batch, size: int,
                 index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reparameterisation noise of this rank's rows of micro-batch ``index`` of the step,
    and with ACAI their mixing coefficients in [0, 1/2].

    Drawn for the whole global batch of the optimizer step from a generator
    seeded by the step, then sliced at the rows' position in it: the noise
    each image gets does not depend on how many processes share the batch or
    how many micro-batches it takes, so N processes of batch B with K
    accumulation steps train exactly like one process of batch N*B*K, and a
    resumed run draws the same.
    """
    device = p.accelerator.device
    generator = torch.Generator(device=device).manual_seed(
        p.cfg.train.seed * 1_000_003 + p.state.step
    )
    # Twice the global batch covers a last batch of batch_size + 1 per rank, and
    # the shape, like the global batch, does not depend on the world size.
    rows = 2 * p.global_batch
    noise = torch.randn(rows, p.cfg.model.latent_dim, generator=generator, device=device)
    # Drawn after the noise, so that turning ACAI on leaves the noise as it was.
    alpha = (acai.ALPHA_MAX * torch.rand(rows, generator=generator, device=device)
             if p.cfg.loss.acai_weight else None)
    # The micro-batches before this one in the step are full global batches.
    start = index * p.cfg.data.batch_size * p.accelerator.num_processes + batch.offset
    rows_here = slice(start, start + size)
    return noise[rows_here], None if alpha is None else alpha[rows_here]


class _Window:
    """Loss sums since the last log, kept on the device so steps never wait for the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # total, recon, kl (image-weighted), images, bad samples skipped,
        # then ACAI's critic loss and fooling term, the patch discriminator's loss and
        # the autoencoder's term against it (image-weighted; 0 for an adversary that is off)
        self.sums = torch.zeros(9, device=self.device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, terms: torch.Tensor, count: int, skipped: int) -> None:
        self.sums[:3] += terms[:3] * count
        self.sums[3] += count
        self.sums[4] += skipped
        self.sums[5:] += terms[3:] * count
        self.steps += 1


def _log_window(p: Phase, window: _Window) -> None:
    """Reduce the window's sums over all ranks (one host sync) and log per-image means."""
    total, recon, kl, images, skipped, critic, fooling, discriminator, generator = p.accelerator.reduce(
        window.sums, reduction="sum").tolist()
    p.state.bad_samples_skipped += int(skipped)
    seconds = time.perf_counter() - window.started
    row = {
        "lr": p.optimizer.param_groups[0]["lr"],
        "images_per_s": images / seconds,
        "epoch": p.state.epoch + p.state.samples_done / p.loader.num_samples,
        "scaler_skipped_steps": p.state.scaler_skipped_steps,
        "nonfinite_skipped_steps": p.state.nonfinite_skipped_steps,
        "bad_samples_skipped": p.state.bad_samples_skipped,
    }
    if images:  # a window of skipped steps only has no loss to report
        row |= {"loss": total / images, "recon": recon / images, "kl": kl / images}
        if p.cfg.loss.acai_weight:
            row |= {"acai_critic": critic / images, "acai_fooling": fooling / images}
        if p.cfg.loss.patch_gan_weight:
            row |= {"patch_gan_discriminator": discriminator / images,
                    "patch_gan_generator": generator / images}
    p.metrics.log({f"{p.cfg.train.phase}/{k}": v for k, v in row.items()}, step=p.state.step)
    window.reset()


def _save(p: Phase) -> Path:
    """Every rank checkpoints; call it right after :func:`_agree`, so that the weights are good."""
    return save_checkpoint(p.accelerator, p.state, p.cfg.to_yaml(), root=p.cfg.run_dir / "checkpoints",
                           keep=p.cfg.train.keep_checkpoints)


def finish(p: Phase) -> None:
    """Final checkpoint, then the sampler on the main process while the others wait."""
    _agree(p)  # the end of the run; a stop signal now changes nothing: the final checkpoint follows
    final = _save(p)
    if p.accelerator.is_main_process:
        model = p.accelerator.unwrap_model(p.model, keep_torch_compile=False)
        classifier = find_classifier(p.cfg)  # None, and one line on how to create it, when absent
        outputs = run_sampler(model, p.cfg.sampler, p.cfg.data.shards, p.cfg.run_dir / "samples",
                              classifier=classifier)
        p.metrics.log_images(outputs.paths, outputs.captions, step=p.state.step,
                             prefix=p.cfg.train.phase)
        _evaluate(p, model, final, classifier)
        log.info("%s done at step %d: checkpoint %s, Pegasus grid %s",
                 p.cfg.train.phase, p.state.step, final, outputs.paths["pegasus"])
        mark_finished(p.cfg.run_dir, final)
    p.accelerator.wait_for_everyone()
    p.accelerator.end_training()


def _evaluate(p: Phase, model: torch.nn.Module, checkpoint: Path, classifier: Classifier | None) -> None:
    """Held-out metrics of the final model, logged and written to eval/<checkpoint>.json.

    With the quality classifier, also the scores of the phase's grids (samples/quality.json).
    """
    held_out = Path(p.cfg.data.shards) / p.cfg.eval.shard_set
    if not (held_out / "manifest.json").is_file():
        log.warning("no held-out set at %s: skipping the evaluation", held_out)
        return
    if classifier is not None:
        try:
            quality = score_run_samples(p.cfg, p.cfg.run_dir / "samples", classifier)
        except DataError as err:  # e.g. a tiny held-out set without 2 horses and birds: the phase is done
            log.warning("skipping the quality scores: %s", err)
        else:
            p.metrics.log({f"{p.cfg.train.phase}/quality/{k}": v for k, v in flatten(quality).items()},
                          step=p.state.step)
            log.info("%s", summary_line(quality))
    metrics = evaluate(model, held_out, p.cfg.eval.batch_size, p.cfg.eval.seed, classifier)
    path = write_eval(metrics, p.cfg.run_dir / "eval" / f"{checkpoint.name}.json")
    measured, described = {}, {}
    for subset, values in metrics.items():
        for name, value in values.items():
            into = described if name in DESCRIPTIVE else measured
            into[f"{p.cfg.train.phase}/eval/{subset}/{name}"] = value
    p.metrics.log(measured, step=p.state.step)
    p.metrics.summarize(described)  # constants of the evaluation: W&B's summary, not its history
    summary = metrics["all"]
    log.info("held-out: %.1f nats/image (%.4f bits/dim), PSNR %.2f dB, %s/%s active units -> %s",
             summary["neg_elbo_nats"], summary["bits_per_dim"], summary["psnr_db"],
             summary["active_units"], summary["latent_dim"], path)


def _reached_max_steps(p: Phase) -> bool:
    return bool(p.cfg.train.max_steps) and p.state.step >= p.cfg.train.max_steps


@dataclass
class _Start:
    """What one rank read and built before the ranks agree that the phase can start."""

    state: TrainState
    resume_from: Path | None = None
    loader: ShardLoader | MemoryLoader | None = None  # None: the phase is already complete
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    adversaries: torch.nn.Module | None = None  # when loss.acai_weight or loss.patch_gan_weight > 0
    adversary_optimizer: torch.optim.Optimizer | None = None


def _lock_run_dir(cfg: Config, accelerator: Accelerator) -> None:
    """One run at a time in a run folder: the main process locks it for the run (:mod:`run_lock`)."""
    if accelerator.is_main_process:
        hold_run_lock(cfg.run_dir)


def _start(cfg: Config, accelerator: Accelerator) -> _Start:
    """This rank's start-up checks, each of which may fail on this rank alone.

    Nothing here may wait for the other ranks (see :func:`agree_on_start`), so
    the checkpoint is only checked here: :func:`setup` restores it once
    ``accelerator.prepare`` (whose DDP wrapper broadcasts the weights) is done.
    """
    resume_from = _resume_checkpoint(cfg, accelerator.is_main_process)
    state = TrainState(phase=cfg.train.phase, wandb_run_id=new_run_id())
    if resume_from is not None:
        state = read_state(resume_from)
        _check_phase(state, cfg, resume_from)
        if is_complete(state, cfg) and is_finished(cfg.run_dir, resume_from):
            return _Start(state, resume_from)
        check_resumable(resume_from, enabled_adversaries(cfg))
    loader = make_loader(cfg.data, cfg.model.image_size, accelerator.process_index,
                         accelerator.num_processes, accelerator.device)
    if resume_from is not None:
        state = _resume_position(state, loader.num_samples, accelerator.num_processes, resume_from)
    model, optimizer = _build_model(cfg, accelerator, init=resume_from is None)
    adversaries, adversary_optimizer = _build_adversaries(cfg, accelerator, init=resume_from is None)
    return _Start(state, resume_from, loader, model, optimizer, adversaries, adversary_optimizer)


def _resume_position(state: TrainState, num_samples: int, world_size: int,
                     folder: Path) -> TrainState:
    """Where the resumed run continues, checked, so that the loop ends whatever state.json says.

    ``samples_done`` counts samples of the epoch's seeded order, which do not
    depend on the batch or the world size; the rest of the epoch is planned
    from there. An epoch trained to its end continues with the next one.
    """
    done = state.samples_done
    if done > num_samples:
        raise CheckpointError(
            f"{folder / 'state.json'}: samples_done {done} is past the end of the epoch ({num_samples} "
            "samples in this shard set); train on the shard set it was written for, or move that "
            "checkpoint aside to resume from the one before"
        )
    if done == num_samples:
        return state.model_copy(update={"epoch": state.epoch + 1, "samples_done": 0})
    if num_samples - done < world_size:
        raise CheckpointError(
            f"{folder} stopped {num_samples - done} sample(s) before the end of epoch {state.epoch + 1}, "
            f"too few to share among {world_size} processes; resume it with at most "
            f"{num_samples - done} process(es), or from an earlier checkpoint"
        )
    return state


def _log_replan(cfg: Config, state: TrainState, global_batch: int, num_samples: int) -> None:
    """One line when the global batch is not the checkpoint's: what that changes, where the run goes on."""
    old = state.global_batch
    if not old or old == global_batch:
        return
    before, after = LrSchedule(cfg.optim, old), LrSchedule(cfg.optim, global_batch)
    log.warning(
        "the global batch changed on resume: %d -> %d; lr %.3g -> %.3g (optim.lr_scaling=%s); "
        "steps per epoch %d -> %d; epoch %d continues at sample %d of %d, so nothing is "
        "repeated or skipped",
        old, global_batch, before.peak, after.peak, cfg.optim.lr_scaling,
        math.ceil(num_samples / old), math.ceil(num_samples / global_batch),
        state.epoch + 1, state.samples_done, num_samples,
    )


def _build_model(cfg: Config, accelerator: Accelerator,
                 init: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (from train.init_from when ``init``) and its optimizer, not yet prepared."""
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VAE(cfg.model)
    if init and cfg.train.init_from:
        source = resolve_checkpoint(cfg.train.init_from)
        load_model_weights(model, source)
        log.info("initialised %s from %s", cfg.train.phase, source)
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = LrSchedule(cfg.optim, _global_batch(cfg, accelerator))
    return model, build_optimizer(model.parameters(), schedule, accelerator.device)


def _build_adversaries(cfg: Config, accelerator: Accelerator,
                       init: bool) -> tuple[torch.nn.Module | None, torch.optim.Optimizer | None]:
    """ACAI's critic and the patch discriminator, and their Adam (None, None when both are off).

    Seeded apart from the model, so that turning them on leaves the model's
    initial weights as they were; the finetune phase starts from each
    adversary that ``train.init_from`` holds.
    """
    wanted = enabled_adversaries(cfg)
    if not wanted:
        return None, None
    set_seed(cfg.train.seed + 1)  # identical on every rank
    adversaries = Adversaries(cfg)
    if init and cfg.train.init_from:
        source = resolve_checkpoint(cfg.train.init_from)
        for kind in sorted(wanted & held_adversaries(source)):
            load_model_weights(getattr(adversaries, kind), source, ADVERSARIES, prefix=f"{kind}.")
            log.info("initialised the %s from %s", KINDS[kind][0], source)
    schedule = LrSchedule(cfg.optim, _global_batch(cfg, accelerator))
    return adversaries, build_optimizer(adversaries.parameters(), schedule, accelerator.device)


def _resume_checkpoint(cfg: Config, is_main: bool) -> Path | None:
    """The checkpoint to continue from, by ``run.resume``; read before anything is written.

    ``auto`` skips damaged checkpoints, which the main process moves aside.
    """
    if cfg.run.resume == "auto":
        return newest_intact_checkpoint(cfg.run_dir / "checkpoints", move_damaged=is_main)
    if cfg.run.resume == "never":
        if latest_checkpoint(cfg.run_dir / "checkpoints") is not None:
            raise ConfigError(
                f"run.resume=never but {cfg.run_dir} already has checkpoints; "
                "choose another run.name or use run.resume=auto"
            )
        return None
    return resolve_checkpoint(cfg.run.resume)


def _check_phase(state: TrainState, cfg: Config, folder: Path) -> None:
    if state.phase != cfg.train.phase:
        raise CheckpointError(
            f"{folder} is a {state.phase} checkpoint but this run is {cfg.train.phase}; "
            f"to start {cfg.train.phase} from its weights use train.init_from={folder}"
        )


def _prepare_run_dir(accelerator: Accelerator, cfg: Config) -> None:
    """The main process creates the run directory and saves the resolved config."""
    if accelerator.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    accelerator.wait_for_everyone()


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are ConfigErrors: one ``error:`` line, the usage, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}\n{self.format_usage().strip()}")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = _ArgumentParser(
        prog="pegasus_dist/train.py",
        description="Train one phase of the winged-horse VAE.",
        epilog="Overrides: section.key=value, e.g. train.epochs=5 data.batch_size=64",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    end_with_launcher()
    exit_on_user_error(lambda: train(_parse_args_with_every_rank(argv)))


def _parse_args_with_every_rank(argv: list[str] | None) -> Config:
    """parse_args; a rank whose command line or config is wrong still ends the run with one line."""
    try:
        return parse_args(argv)
    except ConfigError as err:
        fail_with_every_rank(err)


if __name__ == "__main__":
    main()
