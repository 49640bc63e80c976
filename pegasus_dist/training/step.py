"""The training step: forward, loss, the adversaries, backward, and the optimizer step.

:class:`TrainStep` trains one micro-batch of the :class:`EpochPlan`. Nothing here waits for the device, so the
host queues the next step while this one runs; only ``train.on_nonfinite=skip`` reads every loss.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel

from pegasus_dist.config import Config
from pegasus_dist.data.loader import Batch
from pegasus_dist.evaluation.classifier import Classifier
from pegasus_dist.model import acai, adversaries
from pegasus_dist.model.loss import kl_weight, vae_loss
from pegasus_dist.training.faults import NonfiniteWatch, describe_position, nonfinite_ranks
from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.optim import DroppedUpdates, LrSchedule, set_lr
from pegasus_dist.training.perceptual import perceptual_loss
from pegasus_dist.training.state import TrainState
from pegasus_dist.training.window import BatchLosses

log = logging.getLogger("pegasus_dist.training.step")


@dataclass
class Models:
    """What a step trains: the VAE and its Adam; the adversaries and theirs when either is on."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    adversaries: torch.nn.Module | None = None
    adversary_optimizer: torch.optim.Optimizer | None = None
    # fp16: the adversaries' own loss scale, lest their small gradients underflow.
    adversary_scaler: torch.amp.GradScaler | None = None
    ema: AveragedModel | None = None  # train.ema_decay > 0: the VAE's weights averaged (training.ema)
    perceptual: Classifier | None = None  # loss.perceptual_weight > 0: its frozen classifier


@dataclass
class EpochPlan:
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

    def micro_batch(self, accum: int) -> tuple[int, bool]:
        """(index of the next micro-batch in its optimizer step, whether it ends the step); the epoch's
        last batch always ends a step, so that a checkpoint resumes at a step's start."""
        return self.done % accum, (self.done + 1) % accum == 0 or self.done + 1 == len(self.sizes)

    def loss_weight(self, count: int, world_size: int, accum: int) -> float:
        """The factor on the next micro-batch's per-image mean loss: after DDP's average the
        gradient is the mean over every image of the step, shorter last step included."""
        first = self.done - self.micro_batch(accum)[0]
        return count * world_size / sum(self.sizes[first : first + accum])

    def advance(self, state: TrainState) -> None:
        """Count the micro-batch just trained; after the epoch's last one the next epoch begins."""
        state.samples_done += self.sizes[self.done]
        self.done += 1
        if self.finished:
            state.epoch += 1
            state.samples_done = 0


class TrainStep:
    """One micro-batch: forward and backward on this rank's share; the step's last one also steps."""

    def __init__(self, cfg: Config, accelerator: Accelerator, models: Models, schedule: LrSchedule,
                 watch: NonfiniteWatch, hooks: Hooks) -> None:
        self.cfg, self.accelerator, self.models = cfg, accelerator, models
        self.schedule, self.watch, self.hooks = schedule, watch, hooks
        # train.on_nonfinite=skip: the ranks with a NaN/Inf loss in the step (skipped at its end).
        self.skip_ranks: list[int] = []
        # fp16 only: the updates GradScaler dropped (an overflow), counted on the device.
        self.dropped = (DroppedUpdates(models.optimizer, accelerator.device)
                        if accelerator.scaler is not None else None)

    def __call__(self, batch: Batch, state: TrainState, plan: EpochPlan) -> tuple[BatchLosses, int]:
        """Train ``batch``, the next micro-batch of ``plan``; its loss terms and images (0: skipped)."""
        accum, images = self.cfg.train.grad_accum_steps, len(batch.images)
        index, ends_step = plan.micro_batch(accum)
        # The layout is chosen on the uint8 images, a quarter of the floats' bytes.
        layout = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        x = batch.images.to(self.accelerator.device, non_blocking=True).contiguous(memory_format=layout)
        x = x.float().div_(255)
        eps, alpha = self._noise(batch.offset, images, index, state.step)
        weight = plan.loss_weight(images, self.accelerator.num_processes, accum)
        losses = self._forward_backward(x, batch.offset, eps, alpha, weight, ends_step, state.step)
        if self.cfg.train.on_nonfinite == "skip":
            # The opt-in price: one host sync per micro-batch, so every rank skips the same step.
            if bad_ranks := nonfinite_ranks(self.accelerator, losses.total):
                self.skip_ranks = self.skip_ranks or bad_ranks
                losses, images = BatchLosses.zeros(x.device), 0
        else:
            # With accumulation the batch named in an error is the step's last one.
            self.watch.record(state.step + 1, state.epoch + 1, plan.batch_number(), losses.total)
        if ends_step:
            self._optimizer_step(state, plan)
        return losses, images

    def _forward_backward(self, x: torch.Tensor, offset: int, eps: torch.Tensor, alpha: torch.Tensor | None,
                          weight: float, ends_step: bool, step: int) -> BatchLosses:
        """The losses of one micro-batch, backpropagated into the autoencoder, then into the adversaries."""
        m, loss = self.models, self.cfg.loss
        pairs = acai.partners(x.shape[0], offset, x.device) if loss.acai_weight else None
        mix = None if pairs is None else (lambda mu: acai.mix_latents(mu, pairs, alpha))
        zero = torch.zeros((), device=x.device)
        fooling = generator = matching = critic = discriminator = generator_weight = perceptual = zero
        # DDP all-reduces the gradients only in the backward of the step's last micro-batch.
        with contextlib.nullcontext() if ends_step else self.accelerator.no_sync(m.model):
            out = m.model(x, eps, mix)  # Accelerate's prepare() already runs forward under autocast
            terms = vae_loss(out.logits, x, out.mu, out.logvar,
                             beta=kl_weight(loss.beta, loss.kl_warmup_steps, step),
                             free_bits=loss.free_bits, log_scale=out.log_scale)
            total = terms.total
            # The reconstructions, in pixels, that the adversaries and the perceptual loss judge.
            judged = m.adversaries is not None or m.perceptual is not None
            decoded = torch.sigmoid(out.logits) if judged else None
            if m.adversaries is not None:
                # The interpolants (ACAI) the critic sees beside them.
                mixed = None if pairs is None else torch.sigmoid(out.mixed_logits)
                fooling, generator, matching = self._fooling_terms(x, mixed, decoded, pairs, zero)
                generator_weight = self._generator_weight(terms.recon, generator)
                total = (total + loss.acai_weight * fooling + generator_weight * generator
                         + loss.feature_matching_weight * matching)
            if m.perceptual is not None:
                with self.accelerator.autocast():
                    perceptual = perceptual_loss(m.perceptual, x, decoded)
                total = total + loss.perceptual_weight * perceptual
            total = self.hooks.loss(step + 1, total)
            self.accelerator.backward(total * weight)
        if m.adversaries is not None:
            critic, discriminator = self._adversaries_backward(x, mixed, decoded, alpha, pairs, weight,
                                                               ends_step)
        return BatchLosses(*(t.detach() for t in (total, terms.recon, terms.kl, critic, fooling,
                                                  discriminator, generator, matching, generator_weight,
                                                  perceptual)))

    def _generator_weight(self, recon: torch.Tensor, generator: torch.Tensor) -> torch.Tensor:
        """loss.patch_gan_weight, times VQGAN's adaptive weight with loss.patch_gan_adaptive: the
        discriminator's pull on the decoder in proportion to the likelihood's, whatever their scales."""
        loss = self.cfg.loss
        if not loss.patch_gan_adaptive:
            return torch.full_like(generator, loss.patch_gan_weight)  # on the device: no copy per step
        model = self.accelerator.unwrap_model(self.models.model, keep_torch_compile=False)
        average = functools.partial(self.accelerator.reduce, reduction="mean")
        scaler = self.accelerator.scaler  # fp16: both scaled, lest small gradients flush to zero
        terms = (recon, generator) if scaler is None else (scaler.scale(recon), scaler.scale(generator))
        return loss.patch_gan_weight * adversaries.adaptive_weight(*terms, model.last_layer(), average)

    def _fooling_terms(self, x: torch.Tensor, mixed: torch.Tensor | None, decoded: torch.Tensor,
                       pairs: torch.Tensor | None, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The autoencoder's terms against the critic, the discriminator and in its features (``zero``
        when off), through detached parameters outside DDP: gradients reach the decodes, not the
        adversaries. Feature matching sees the real images in the same forward, as its targets."""
        networks = self.accelerator.unwrap_model(self.models.adversaries)
        frozen = {name: value.detach() for name, value in networks.named_parameters()}
        loss, n = self.cfg.loss, x.shape[0]
        judged = torch.cat([x, decoded]) if loss.feature_matching_weight else decoded
        with self.accelerator.autocast():
            predicted_mix, patches, hidden = torch.func.functional_call(
                networks, frozen, (mixed, judged if loss.patch_gan_weight else None),
                {"features": bool(loss.feature_matching_weight)})
        fooling = zero if pairs is None else acai.fooling_loss(predicted_mix, acai.interpolation_mask(pairs))
        generator = zero if patches is None else adversaries.generator_loss(patches[-n:])
        return fooling, generator, adversaries.feature_matching_loss(hidden, n) if hidden else zero

    def _adversaries_backward(self, x: torch.Tensor, mixed: torch.Tensor | None, decoded: torch.Tensor,
                              alpha: torch.Tensor | None, pairs: torch.Tensor | None, weight: float,
                              ends_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic's and discriminator's losses on detached decodes, backpropagated into them: one
        forward of the prepared adversaries per micro-batch, so that DDP sees one use."""
        networks, decoded = self.models.adversaries, decoded.detach()
        critic_input = (None if mixed is None else
                        torch.cat([mixed.detach(), acai.blend(x, decoded, self.cfg.loss.acai_gamma)]))
        discriminator_input = torch.cat([x, decoded]) if self.cfg.loss.patch_gan_weight else None
        critic = discriminator = torch.zeros((), device=x.device)
        with contextlib.nullcontext() if ends_step else self.accelerator.no_sync(networks):
            predicted, patches, _ = networks(critic_input, discriminator_input)
            if predicted is not None:
                predicted_mix, predicted_blend = predicted.split(x.shape[0])
                critic = acai.critic_loss(predicted_mix, alpha, predicted_blend,
                                          acai.interpolation_mask(pairs))
            if patches is not None:
                discriminator = adversaries.discriminator_loss(*patches.split(x.shape[0]))
            loss = (critic + discriminator) * weight
            scaler = self.models.adversary_scaler
            (loss if scaler is None else scaler.scale(loss)).backward()
        return critic, discriminator

    def _optimizer_step(self, state: TrainState, plan: EpochPlan) -> None:
        """The update at the end of an optimizer step, or its skip on every rank alike."""
        m = self.models
        if self.skip_ranks:  # train.on_nonfinite=skip: this step's gradients are dropped, and counted
            state.nonfinite_skipped_steps += 1
            where = describe_position(state.step + 1, state.epoch + 1, plan.batch_number(), self.skip_ranks)
            log.warning("non-finite loss at %s: update skipped (%d so far)", where,
                        state.nonfinite_skipped_steps)
            self.skip_ranks = []
        else:
            set_lr(m.optimizer, self.schedule.at(state.step, state.epoch))
            if self.cfg.optim.grad_clip:
                self.accelerator.clip_grad_norm_(m.model.parameters(), self.cfg.optim.grad_clip)
            if self.dropped is not None:
                self.dropped.note_step()
            m.optimizer.step()
            if m.ema is not None:
                m.ema.update_parameters(self.accelerator.unwrap_model(m.model, keep_torch_compile=False))
            if m.adversary_optimizer is not None:
                set_lr(m.adversary_optimizer, self.schedule.at(state.step, state.epoch))
                if m.adversary_scaler is None:
                    m.adversary_optimizer.step()
                else:
                    m.adversary_scaler.step(m.adversary_optimizer)
                    m.adversary_scaler.update()
        m.optimizer.zero_grad(set_to_none=True)
        if m.adversary_optimizer is not None:
            m.adversary_optimizer.zero_grad(set_to_none=True)

    def dropped_updates(self) -> int:
        """fp16's updates dropped by the loss scaler since the last call; 0 otherwise (a host read)."""
        return 0 if self.dropped is None else self.dropped.take()

    def _noise(self, offset: int, size: int, index: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noise (and ACAI's mixing coefficients) of this rank's rows of micro-batch ``index``, drawn for
        the step's global batch from a generator seeded by the step, then sliced: an image's noise depends on
        neither the process count nor accumulation, nor on a resume."""
        cfg, device = self.cfg, self.accelerator.device
        generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
        # Covers a last batch of batch_size + 1 per rank, in a shape independent of the world size.
        rows = 2 * self.schedule.global_batch
        noise = torch.randn(rows, cfg.model.latent_dim, generator=generator, device=device)
        # Drawn after the noise, so that turning ACAI on leaves the noise as it was.
        alpha = (acai.ALPHA_MAX * torch.rand(rows, generator=generator, device=device)
                 if cfg.loss.acai_weight else None)
        # The micro-batches before this one in the step are full global batches.
        start = index * cfg.data.batch_size * self.accelerator.num_processes + offset
        rows_here = slice(start, start + size)
        return noise[rows_here], None if alpha is None else alpha[rows_here]
