"""Issue 11: a recipe that converges at any global batch, gradient accumulation, and early stops.

What a user would check: the learning rate each step trains at (logged), the
losses and weights a run ends with, the log line that explains a change, the
exit code and error line of a run that diverges.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from helpers import SCRIPTS, SMOKE, cli_here, overrides
from processes import BIN, REPO, run_bounded, run_ranks
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench.scale_check import scale_check
from pegasus_dist.config import ModelConfig, OptimConfig, load_config
from pegasus_dist.model.loss import kl_to_standard_normal
from pegasus_dist.model.saved import list_checkpoints
from pegasus_dist.model.vae import VAE
from pegasus_dist.training import loop as train
from pegasus_dist.training.optim import LrSchedule

SYNCS = SCRIPTS / "train_noting_syncs.py"


def rows(run: Path) -> dict[int, dict]:
    """Step -> the row logged while training (a resumed run's rows replace the killed one's)."""
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if "pretrain/loss" in row}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint (batch-norm running statistics left out)."""
    found = load_file(run / "pretrain" / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    return {k: v for k, v in found.items() if not k.endswith(("running_mean", "running_var",
                                                                  "num_batches_tracked"))}


def test_sqrt_scaling_and_a_linear_warm_up():
    optim = OptimConfig(lr=1e-3, base_batch_size=128, lr_scaling="sqrt", warmup_steps=200)
    schedule = LrSchedule(optim, global_batch=1024)
    assert schedule.peak == pytest.approx(1e-3 * math.sqrt(8))
    assert schedule.at(0) == pytest.approx(schedule.peak / 200)  # the first step
    assert schedule.at(99) == pytest.approx(schedule.peak / 2)
    assert schedule.at(199) == schedule.at(10_000) == pytest.approx(schedule.peak)
    linear = LrSchedule(OptimConfig(lr_scaling="linear", warmup_steps=0), global_batch=4096)
    assert linear.at(0) == pytest.approx(3.2e-2)  # the 4-node rate
    assert "optim.lr 0.001 x sqrt(1024/128) (optim.lr_scaling=sqrt" in schedule.describe()


def test_a_log_variance_thrown_far_by_one_update_keeps_the_kl_finite():
    model = VAE(ModelConfig(channels=[4, 4, 8, 8], fc_dims=[16, 16, 8], latent_dim=4))
    with torch.no_grad():
        model.encoder_fc[-1].bias[4:] = 1e4  # the log-variance half of the last layer
    mu, logvar = model.encode(torch.rand(2, 3, 32, 32))
    assert logvar.max() == 20  # exp(1e4) would be Inf
    assert torch.isfinite(kl_to_standard_normal(mu, logvar)).all()


def test_cosine_decay_follows_epochs_after_the_warm_up():
    optim = OptimConfig(lr=1e-3, lr_scaling="none", warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    schedule = LrSchedule(optim, global_batch=128, epochs=4)
    assert schedule.at(4, epoch=0) == pytest.approx(1e-3 * 5 / 10)  # the warm-up, undecayed
    assert [schedule.at(500, epoch) for epoch in range(4)] == pytest.approx(
        [1e-3, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), 1e-3 * 0.55,
         1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)))])
    # Per epoch, not per step: the same rates at another global batch's step counts.
    assert LrSchedule(optim, global_batch=4096, epochs=4).at(20, epoch=3) == schedule.at(500, epoch=3)
    assert "cosine decay to 0.1 x lr by epoch 4" in schedule.describe()


@pytest.mark.slow
@pytest.mark.parametrize("cut", [3, 4], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_continues_the_warm_up_and_the_decay(smoke_shards, tmp_path, cut, caplog):
    # 4 steps of 128 an epoch: the cut falls in the warm-up, mid-epoch or where the decay steps down.
    extra = ("optim.warmup_steps=6", "optim.lr_scaling=none", "data.batch_size=128",
             "optim.decay=cosine", "optim.min_lr_ratio=0", "train.epochs=4")
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path / "whole", 8, *extra)))
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path / "cut", cut, *extra)))
    with caplog.at_level(logging.WARNING):
        train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path / "cut", 8, *extra)))  # resumes
    assert "this run's optimizer settings" not in caplog.text  # the restored rate is the schedule's
    whole, cut = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    decay = [1.0] * 4 + [0.5 * (1 + math.cos(math.pi / 4))] * 4
    assert [cut[s]["pretrain/lr"] for s in range(1, 9)] == pytest.approx(
        [1e-3 * min(1, s / 6) * d for s, d in zip(range(1, 9), decay, strict=True)])
    assert [cut[s]["pretrain/lr"] for s in range(1, 9)] == [whole[s]["pretrain/lr"] for s in range(1, 9)]
    assert [cut[s]["pretrain/loss"] for s in range(1, 9)] == [whole[s]["pretrain/loss"]
                                                              for s in range(1, 9)]


@pytest.fixture
def fixed_batchnorm(monkeypatch):
    """Batch norm normalising with its (initial) running statistics in training too.

    In training mode batch norm takes its statistics over the batch it sees,
    so K micro-batches of B cannot normalise as one batch of K*B does: only
    with statistics that do not depend on the batch is their loss the same.
    """
    monkeypatch.setattr(nn.BatchNorm2d, "train", lambda self, mode=True: nn.Module.train(self, False))


@pytest.fixture
def step_gradients():
    """The gradients every optimizer step applies, concatenated, in order."""
    seen: list[torch.Tensor] = []

    def note(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.Adam):  # not Accelerate's wrapper around it
            seen.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups
                                   for p in g["params"]]).clone())

    handle = register_optimizer_step_pre_hook(note)
    yield seen
    handle.remove()


@pytest.mark.slow
def test_k_micro_batches_give_the_loss_and_gradient_of_one_batch_of_k_times_b(
        smoke_shards, tmp_path, fixed_batchnorm, step_gradients):
    # 470 samples: 29 batches of 16 and one of 6. With 4 accumulation steps an epoch
    # is 7 steps of 64 images and an 8th of 22 (16 + 6), exactly as with batches of 64.
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path / "accum", 8,
                                             "train.grad_accum_steps=4")))
    accumulated = list(step_gradients)
    step_gradients.clear()
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path / "big", 8, "data.batch_size=64")))
    assert len(accumulated) == len(step_gradients) == 8
    for a, b in zip(accumulated, step_gradients, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()  # float summation order only
    accum, big = rows(tmp_path / "accum"), rows(tmp_path / "big")
    assert [accum[s]["pretrain/loss"] for s in range(1, 9)] == pytest.approx(
        [big[s]["pretrain/loss"] for s in range(1, 9)], rel=1e-6)
    assert accum[8]["pretrain/epoch"] == big[8]["pretrain/epoch"] == 1.0  # one epoch, 8 steps


@pytest.mark.process
def test_one_process_accumulating_trains_like_two_and_ddp_syncs_once_a_step(smoke_shards, tmp_path):
    """2 processes x batch 8 x 2 micro-batches == 1 process x batch 8 x 4 (real batch norm).

    Each micro-batch of 8 is normalised over the same 8 images either way, so
    the trained weights agree up to float summation order (test_ddp's stated
    tolerance); batch-norm running statistics differ (DDP keeps rank 0's).
    """
    common = ["--config", SMOKE, *overrides(smoke_shards, tmp_path, 3, "data.batch_size=8")]
    done = run_ranks([str(SYNCS), str(tmp_path), *common, "run.name=two", "train.grad_accum_steps=2"], 2,
                     timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "global batch 32 = per-process batch 8 x 2 process(es) x 2 accumulation step(s)" in done.stdout
    # Gradients crossed between the ranks only in the last micro-batch of each step.
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [1, 3, 5]
    one = [str(BIN / "pegasus-dist"), "train", *common, "run.name=one", "train.grad_accum_steps=4"]
    done = run_bounded(one, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    a, b = (load_file(tmp_path / name / "checkpoints/step_00000003/model.safetensors")
            for name in ("two", "one"))
    trained = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in trained])
    assert (diffs > 1e-5).float().mean() < 1e-4
    assert diffs.max() <= 3 * 1e-3


@pytest.mark.process
def test_the_defaults_stay_finite_where_the_linear_rule_diverges(smoke_shards):
    # The paper's model and recipe at 32 times its base batch, as on 4 nodes of 8 GPUs
    # (base batch 8 here, so that a step is 4 micro-batches of 64 of the 470 images), in fp32:
    # the lr rule is under test, not bf16, which costs 18 times fp32 on a CPU without AVX-512.
    found = {t.recipe: t for t in scale_check(
        str(REPO / "configs/pretrain.yaml"), global_batch=256, steps=3, micro_batch=64,
        recipes=["linear", "defaults"],
        overrides=[f"data.shards={smoke_shards}", "optim.base_batch_size=8", "train.mixed_precision=no"])}
    linear, defaults = found["linear"], found["defaults"]
    assert linear.peak_lr == pytest.approx(32e-3) and defaults.peak_lr == pytest.approx(32**0.5 * 1e-3)
    first = linear.rows[0]["loss"]
    assert defaults.rows[0]["loss"] == first  # the same seed, the same first step
    assert linear.outcome != "trained", linear.error  # stopped: diverging (or non-finite)
    assert max(r["loss"] for r in linear.rows) > 100 * first
    assert defaults.finite and not defaults.error
    assert [r["step"] for r in defaults.rows] == [1, 2, 3]
    assert max(r["loss"] for r in defaults.rows) < 1.05 * first


@pytest.mark.slow
def test_lowering_the_lr_on_resume_takes_effect_and_is_logged(smoke_shards, tmp_path, caplog):
    base = ("optim.warmup_steps=0", "optim.lr_scaling=none")
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path, 3, *base)))
    caplog.set_level(logging.INFO)
    train.train(load_config(SMOKE, overrides(smoke_shards, tmp_path, 4, *base, "optim.lr=1e-5",
                                             "optim.grad_clip=5", "optim.betas=[0.8,0.99]")))
    changed = [r.getMessage() for r in caplog.records if "not the checkpoint's" in r.getMessage()]
    assert len(changed) == 1, caplog.text
    for change in ("optim.lr 0.001 -> 1e-05", "optim.grad_clip 1000.0 -> 5.0",
                   "optim.betas [0.9, 0.999] -> [0.8, 0.99]", "lr at step 3 0.001 -> 1e-05"):
        assert change in changed[0]
    assert rows(tmp_path)[4]["pretrain/lr"] == 1e-5
    # Adam moves a weight by about lr per step (at most a few times lr): 1e-3 before, 1e-5 now.
    before, after = weights(tmp_path, 3), weights(tmp_path, 4)
    assert max((after[k] - before[k]).abs().max() for k in after) < 1e-4


@pytest.mark.slow
def test_a_diverging_warm_up_stops_before_the_first_checkpoint_naming_the_lr(smoke_shards, tmp_path, capsys):
    # `pegasus-dist train` in this process: the one-line error and the exit code of the console script.
    code, out = cli_here(capsys, "train", "--config", SMOKE,
                         *overrides(smoke_shards, tmp_path, 8, "optim.lr=0.5", "optim.lr_scaling=linear",
                                    "optim.base_batch_size=16", "optim.warmup_steps=5",
                                    "train.checkpoint_every=2"))
    assert code == 3, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("error: diverging: the loss went from ")
    assert "by step 2, at lr 0.2;" in errors[0]  # the second step of the warm-up
    assert "lr 0.5 = optim.lr 0.5 x 16/16 (optim.lr_scaling=linear, global batch 16)" in errors[0]
    assert "global batch 16 = per-process batch 16 x 1 process(es)" in errors[0]
    assert list_checkpoints(tmp_path / "pretrain" / "checkpoints") == []
    logged = rows(tmp_path)  # the diverging step is logged before the run stops
    assert sorted(logged) == [1, 2] and logged[2]["pretrain/loss"] > 100 * logged[1]["pretrain/loss"]
