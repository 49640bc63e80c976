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
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pegasus_dist.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from pegasus_dist.config import Config, load_config
from pegasus_dist.console import exit_on_user_error, setup_logging
from pegasus_dist.data.loader import MemoryLoader, ShardLoader, make_loader
from pegasus_dist.distributed import build_accelerator, convert_sync_batchnorm, scaled_lr
from pegasus_dist.errors import CheckpointError, ConfigError
from pegasus_dist.evaluate import evaluate, write_eval
from pegasus_dist.faults import (
    REQUEUE_EXIT_CODE,
    Agreement,
    NonfiniteWatch,
    Preempted,
    StopSignals,
    TrainingError,
    agree,
    nonfinite_ranks,
)
from pegasus_dist.loss import vae_loss
from pegasus_dist.model import VAE, num_parameters
from pegasus_dist.sampler import run_sampler
from pegasus_dist.tracking import MetricsLog, new_run_id, start_tracking, tracker_names

log = logging.getLogger("pegasus_dist.train")


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

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.accelerator.num_processes


def train(cfg: Config) -> Path:
    """Run one phase to its end and return the run directory.

    Raises :class:`Preempted` after checkpointing when a stop signal arrived.
    """
    phase = setup(cfg)
    try:
        run_epochs(phase)
        finish(phase)
    finally:
        phase.signals.restore()
    return cfg.run_dir


def setup(cfg: Config) -> Phase:
    accelerator = build_accelerator(cfg, tracker_names(cfg))
    loader = make_loader(cfg.data, cfg.model.image_size, accelerator.process_index,
                         accelerator.num_processes, accelerator.device)
    resume_from = _resume_checkpoint(cfg)
    _prepare_run_dir(accelerator, cfg)

    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VAE(cfg.model)
    if resume_from is None and cfg.train.init_from:
        source = resolve_checkpoint(cfg.train.init_from)
        load_model_weights(model, source)
        log.info("initialised %s from %s", cfg.train.phase, source)
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.data.batch_size * accelerator.num_processes
    lr = scaled_lr(cfg, global_batch)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        # One kernel for all parameters: on the CPU too, where it is several times
        # faster than the default (the "Adam step" row of `pegasus-dist bench`).
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState(phase=cfg.train.phase, wandb_run_id=new_run_id())
    if resume_from is not None:
        state = restore_checkpoint(accelerator, model, optimizer, resume_from)
        _check_phase(state, cfg, resume_from)
        log.info("resumed from %s: epoch %d, batch %d, step %d",
                 resume_from, state.epoch, state.batches_done, state.step)
    start_tracking(accelerator, cfg, state.wandb_run_id)
    log.info(
        "%s: %s parameters, %d samples in %s, world_size=%d, per-process batch %d, "
        "global batch %d, lr %.3g (%s scaling from %.3g at batch %d), %d batches per epoch",
        cfg.train.phase, f"{num_parameters(model):,}", loader.num_samples, loader.path,
        accelerator.num_processes, cfg.data.batch_size, global_batch, lr,
        cfg.optim.lr_scaling, cfg.optim.lr, cfg.optim.base_batch_size, len(loader),
    )
    return Phase(cfg, accelerator, model, optimizer, loader, state,
                 MetricsLog(accelerator, cfg.run_dir), StopSignals(),
                 NonfiniteWatch(accelerator.device))


def run_epochs(p: Phase) -> None:
    """Train to the end of the phase; the ranks wait for each other only at sync points."""
    cfg, accelerator, state = p.cfg, p.accelerator, p.state
    p.model.train()
    window = _Window(accelerator.device)
    while state.epoch < cfg.train.epochs and not _reached_max_steps(p):
        p.loader.set_epoch(state.epoch, start_batch=state.batches_done)
        with tqdm(total=len(p.loader), initial=state.batches_done, unit="batch",
                  desc=f"{cfg.train.phase} epoch {state.epoch + 1}/{cfg.train.epochs}",
                  disable=not accelerator.is_main_process, dynamic_ncols=True) as bar:
            for batch in p.loader:
                terms, count = train_step(p, batch)
                state.step += 1
                state.batches_done += 1
                bar.update()
                window.add(terms, count, batch.skipped)
                log_now = state.step % cfg.train.log_every == 0
                save_now = bool(cfg.train.checkpoint_every) and (
                    state.step % cfg.train.checkpoint_every == 0)
                if log_now or save_now:
                    _sync_point(p, window, log_metrics=log_now, checkpoint=save_now)
                if _reached_max_steps(p):
                    break
        if state.batches_done == len(p.loader):
            state.epoch += 1
            state.batches_done = 0
            _sync_point(p, window, log_metrics=False,
                        checkpoint=not cfg.train.checkpoint_every)
    if window.steps:
        _sync_point(p, window, log_metrics=True, checkpoint=False)


def train_step(p: Phase, batch) -> tuple[torch.Tensor, int]:
    """One optimizer step on this rank's share of the global batch.

    Returns the loss terms and the number of images (0 for a skipped step).
    Nothing here waits for the device, so the host queues the next step
    while this one runs; only ``train.on_nonfinite=skip`` reads every loss.
    """
    x = batch.images.to(p.accelerator.device, non_blocking=True).float().div_(255)
    if p.cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps = _batch_noise(p, batch, x.shape[0])
    out = p.model(x, eps)  # Accelerate's prepare() already runs forward under autocast
    terms = vae_loss(out.logits, x, out.mu, out.logvar, beta=p.cfg.loss.beta)
    p.accelerator.backward(terms.total)
    stacked = torch.stack([terms.total, terms.recon, terms.kl]).detach()
    if p.cfg.train.on_nonfinite == "skip":
        # The opt-in price of skipping: one host sync per step, so that every
        # rank skips the update at exactly the bad step.
        bad_ranks = nonfinite_ranks(p.accelerator, terms.total)
        if bad_ranks:
            _skip_update(p, bad_ranks)
            return torch.zeros_like(stacked), 0
    else:
        p.watch.record(p.state.step + 1, p.state.epoch + 1, p.state.batches_done + 1, terms.total)
    if p.cfg.optim.grad_clip:
        p.accelerator.clip_grad_norm_(p.model.parameters(), p.cfg.optim.grad_clip)
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    # A host flag set by fp16's GradScaler (which syncs in its step anyway); False otherwise.
    if p.accelerator.optimizer_step_was_skipped:
        p.state.scaler_skipped_steps += 1
    return stacked, x.shape[0]


def _skip_update(p: Phase, bad_ranks: list[int]) -> None:
    """train.on_nonfinite=skip: drop this step's gradients on every rank alike, and count it."""
    p.optimizer.zero_grad(set_to_none=True)
    p.state.nonfinite_skipped_steps += 1
    where = _where(p.state.step + 1, p.state.epoch + 1, p.state.batches_done + 1, bad_ranks)
    log.warning("non-finite loss at %s: update skipped (%d so far)",
                where, p.state.nonfinite_skipped_steps)


def _sync_point(p: Phase, window: _Window, log_metrics: bool, checkpoint: bool) -> None:
    """Agree on faults, then log the window and checkpoint, or stop for a requeue.

    Sync points come every train.log_every steps, at checkpoint steps, at
    epoch ends and at the end of the run. Stop signals wait for the next one:
    SLURM warns 120 s before the time limit, far longer than log_every steps.
    """
    stop = _agree(p)
    if log_metrics:
        _log_window(p, window)
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
        "lower optim.lr or set optim.grad_clip, or train.on_nonfinite=skip to skip such steps"
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


def _batch_noise(p: Phase, batch, size: int) -> torch.Tensor:
    """The reparameterisation noise of this rank's rows of the global batch.

    Drawn for the whole global batch from a generator seeded by the step, then
    sliced at this rank's offset: the noise each image gets does not depend on
    how many processes share the batch, so N processes of batch B train
    exactly like one process of batch N*B, and a resumed run draws the same.
    """
    device = p.accelerator.device
    generator = torch.Generator(device=device).manual_seed(
        p.cfg.train.seed * 1_000_003 + p.state.step
    )
    # Twice the global batch covers a last batch of batch_size + 1 per rank, and
    # the shape, like the global batch, does not depend on the world size.
    rows = 2 * p.global_batch
    noise = torch.randn(rows, p.cfg.model.latent_dim, generator=generator, device=device)
    return noise[batch.offset : batch.offset + size]


class _Window:
    """Loss sums since the last log, kept on the device so steps never wait for the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # total, recon, kl (image-weighted), images, bad samples skipped
        self.sums = torch.zeros(5, device=self.device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, terms: torch.Tensor, count: int, skipped: int) -> None:
        self.sums[:3] += terms * count
        self.sums[3] += count
        self.sums[4] += skipped
        self.steps += 1


def _log_window(p: Phase, window: _Window) -> None:
    """Reduce the window's sums over all ranks (one host sync) and log per-image means."""
    total, recon, kl, images, skipped = p.accelerator.reduce(window.sums, reduction="sum").tolist()
    p.state.bad_samples_skipped += int(skipped)
    seconds = time.perf_counter() - window.started
    row = {
        "lr": p.optimizer.param_groups[0]["lr"],
        "images_per_s": images / seconds,
        "epoch": p.state.epoch + p.state.batches_done / len(p.loader),
        "global_batch": p.global_batch,
        "scaler_skipped_steps": p.state.scaler_skipped_steps,
        "nonfinite_skipped_steps": p.state.nonfinite_skipped_steps,
        "bad_samples_skipped": p.state.bad_samples_skipped,
    }
    if images:  # a window of skipped steps only has no loss to report
        row |= {"loss": total / images, "recon_bce": recon / images, "kl": kl / images}
    p.metrics.log({f"{p.cfg.train.phase}/{k}": v for k, v in row.items()}, step=p.state.step)
    window.reset()


def _save(p: Phase) -> Path:
    """Every rank checkpoints; call it right after :func:`_agree`, so that the weights are good."""
    return save_checkpoint(
        p.accelerator, p.model, p.optimizer, p.state, p.cfg.to_yaml(),
        root=p.cfg.run_dir / "checkpoints", keep=p.cfg.train.keep_checkpoints,
    )


def finish(p: Phase) -> None:
    """Final checkpoint, then the sampler on the main process while the others wait."""
    _agree(p)  # the end of the run; a stop signal now changes nothing: the final checkpoint follows
    final = _save(p)
    if p.accelerator.is_main_process:
        model = p.accelerator.unwrap_model(p.model, keep_torch_compile=False)
        outputs = run_sampler(model, p.cfg.sampler, p.cfg.data.shards, p.cfg.run_dir / "samples")
        p.metrics.log_images(outputs.grids, step=p.state.step, prefix=p.cfg.train.phase)
        _evaluate(p, model, final)
        log.info("%s done at step %d: checkpoint %s, Pegasus grid %s",
                 p.cfg.train.phase, p.state.step, final, outputs.paths["pegasus"])
    p.accelerator.wait_for_everyone()
    p.accelerator.end_training()


def _evaluate(p: Phase, model: torch.nn.Module, checkpoint: Path) -> None:
    """Held-out metrics of the final model, logged and written to eval/<checkpoint>.json."""
    held_out = Path(p.cfg.data.shards) / p.cfg.eval.shard_set
    if not (held_out / "manifest.json").is_file():
        log.warning("no held-out set at %s: skipping the evaluation", held_out)
        return
    metrics = evaluate(model, held_out, p.cfg.eval.batch_size, p.cfg.eval.seed)
    path = write_eval(metrics, p.cfg.run_dir / "eval" / f"{checkpoint.name}.json")
    p.metrics.log({f"{p.cfg.train.phase}/eval/{subset}/{name}": value
                   for subset, values in metrics.items() for name, value in values.items()},
                  step=p.state.step)
    summary = metrics["all"]
    log.info("held-out: %.1f nats/image (%.4f bits/dim), PSNR %.2f dB, %s/%s active units -> %s",
             summary["neg_elbo_nats"], summary["bits_per_dim"], summary["psnr_db"],
             summary["active_units"], summary["latent_dim"], path)


def _reached_max_steps(p: Phase) -> bool:
    return bool(p.cfg.train.max_steps) and p.state.step >= p.cfg.train.max_steps


def _resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to continue from, by ``run.resume``; read before anything is written."""
    existing = latest_checkpoint(cfg.run_dir / "checkpoints")
    if cfg.run.resume == "auto":
        return existing
    if cfg.run.resume == "never":
        if existing is not None:
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


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="pegasus_dist/train.py",
        description="Train one phase of the winged-horse VAE.",
        epilog="Overrides: section.key=value, e.g. train.epochs=5 data.batch_size=64",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    try:
        exit_on_user_error(lambda: train(parse_args(argv)))
    except Preempted:
        raise SystemExit(REQUEUE_EXIT_CODE) from None


if __name__ == "__main__":
    main()
