"""ACAI (pegasus_dist/model/acai.py) in the trainer: the critic learns, DDP keeps it identical, bf16 runs.

Where a test holds for both adversaries (pegasus_dist/model/adversaries.py), it runs
the patch discriminator beside the critic (``BOTH``); with its adaptive weight, the perceptual loss
(pegasus_dist/training/perceptual.py) too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import SMOKE, train_ranks
from processes import BIN, run_bounded
from safetensors.torch import load_file

from pegasus_dist.config import ModelConfig, load_config
from pegasus_dist.model import acai
from pegasus_dist.model.adversaries import Adversaries

ACAI = ["loss.acai_weight=100", "wandb.mode=disabled", "train.log_every=1"]
BOTH = [*ACAI, "loss.patch_gan_weight=100"]


def rows(run: Path, key: str) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row[key] for row in map(json.loads, lines) if key in row]


def test_pairs_are_neighbours_of_the_global_batch_whatever_the_split():
    whole = acai.partners(16, offset=0, device=torch.device("cpu"))
    halves = [acai.partners(8, offset=o, device=torch.device("cpu")) + o for o in (0, 8)]
    assert torch.equal(whole, torch.cat(halves))
    assert whole[:4].tolist() == [1, 0, 3, 2]
    # An odd share: the row whose neighbour lives on another rank pairs inside this one.
    odd = acai.partners(3, offset=1, device=torch.device("cpu"))  # global rows 1, 2, 3
    assert odd.tolist() == [0, 2, 1]
    assert acai.interpolation_mask(odd).tolist() == [0.0, 1.0, 1.0]


def test_the_critic_gives_one_number_per_image_independent_of_the_batch():
    critic = acai.Critic(ModelConfig(channels=[8, 8, 8, 8]))
    x = torch.rand(4, 3, 32, 32)
    assert critic(x).shape == (4,)
    assert torch.allclose(critic(x[:1]), critic(x)[:1], atol=1e-6)  # no batch norm


@pytest.mark.process
def test_the_critic_learns_and_its_state_is_checkpointed(smoke_shards, tmp_path):
    # No lr warm-up (the critic's rate follows the autoencoder's schedule); lambda small,
    # so that the autoencoder hardly fights back and what is measured is the critic.
    train_ranks(1, [f"data.shards={smoke_shards}", f"run.output_dir={tmp_path}", "train.max_steps=240",
                    "train.epochs=100",
                    "optim.warmup_steps=0", *ACAI, "loss.acai_weight=1", "train.log_every=20"])
    run = tmp_path / "pretrain"
    critic = rows(run, "pretrain/acai_critic")
    assert len(critic) == 12 and all(map(math.isfinite, critic))
    # The best constant guess c of a ~ U[0, 1/2] (with target 0 for the blends) minimises
    # E[(c - a)^2] + c^2: c = 1/8, a loss of 1/12 - 1/32. A critic that learned beats it.
    constant = 1 / 12 - 1 / 32
    assert sum(critic[-4:]) / 4 < 0.95 * constant, critic
    folder = run / "checkpoints/step_00000240"
    critic = Adversaries(load_config(SMOKE, ["loss.acai_weight=1"]))
    assert set(load_file(folder / "model_1.safetensors")) == set(critic.state_dict())
    assert {name.split(".")[0] for name in critic.state_dict()} == {"critic"}
    critic_adam = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)
    assert len(critic_adam["state"]) == len(list(critic.parameters()))


BOTH_3_STEPS = ["train.max_steps=3", "model.sync_batchnorm=true", "optim.lr_scaling=none", *BOTH]
ADVERSARY_LOSSES = ("pretrain/loss", "pretrain/acai_critic", "pretrain/acai_fooling",
                    "pretrain/patch_gan_discriminator", "pretrain/patch_gan_generator")
# The discriminator's weight: fixed, or VQGAN's adaptive weight (its gradients averaged over the
# ranks), with the perceptual loss beside it (its network: the perceptual_network fixture).
WEIGHTINGS = {"fixed": [],
              "adaptive+perceptual": ["loss.patch_gan_weight=0.8", "loss.patch_gan_adaptive=true",
                                      "loss.perceptual_weight=30"]}


@dataclass
class OneProcess:
    run: Path  # its pretrain folder
    weighting: list[str]  # its overrides of WEIGHTINGS

    def losses(self) -> tuple[str, ...]:
        """The logged losses to compare, with the adaptive weight and the perceptual loss when on."""
        return (*ADVERSARY_LOSSES,
                *["pretrain/patch_gan_adaptive_weight", "pretrain/perceptual"] * bool(self.weighting))


@pytest.fixture(scope="module", params=list(WEIGHTINGS))
def one_process(request, smoke_shards, perceptual_network, tmp_path_factory) -> OneProcess:
    """3 steps of one process, batch 16, with ACAI and the patch discriminator: the reference run."""
    root = tmp_path_factory.mktemp(f"acai-one-{request.param}")
    weighting = WEIGHTINGS[request.param]
    if weighting:
        weighting = [*weighting, f"loss.perceptual_network={perceptual_network}"]
    train_ranks(1, [f"data.shards={smoke_shards}", *BOTH_3_STEPS, *weighting, f"run.output_dir={root}",
                    "data.batch_size=16"])
    return OneProcess(root / "pretrain", weighting)


@pytest.mark.process
def test_two_processes_with_acai_and_the_patch_discriminator_train_like_one(smoke_shards, tmp_path,
                                                                              one_process):
    train_ranks(2, [f"data.shards={smoke_shards}", *BOTH_3_STEPS, *one_process.weighting,
                    f"run.output_dir={tmp_path}", "data.batch_size=8"])
    # The tolerance of tests/test_ddp.py: all but 1 in 10,000 values within 1e-5, none past steps x lr.
    for name in ("model.safetensors", "model_1.safetensors"):
        two, one = (load_file(run / "checkpoints/step_00000003" / name)
                    for run in (tmp_path / "pretrain", one_process.run))
        diffs = torch.cat([(two[k].float() - v.float()).abs().flatten() for k, v in one.items()])
        assert (diffs > 1e-5).float().mean() < 1e-4, name
        assert diffs.max() <= 3 * 1e-3, name
    for key in one_process.losses():
        assert rows(tmp_path / "pretrain", key) == pytest.approx(rows(one_process.run, key),
                                                                 rel=1e-4, abs=1e-7), key


@pytest.mark.process
def test_acai_and_the_patch_discriminator_in_bf16_train_like_fp32(smoke_shards, tmp_path, one_process):
    train_ranks(1, [f"data.shards={smoke_shards}", *BOTH_3_STEPS, *one_process.weighting,
                    f"run.output_dir={tmp_path}", "data.batch_size=16", "train.mixed_precision=bf16"])
    # bf16 keeps 8 bits of mantissa: each logged loss within 2% of the fp32 run's (0.6% seen).
    for key in one_process.losses():
        bf16, fp32 = rows(tmp_path / "pretrain", key), rows(one_process.run, key)
        assert len(bf16) == len(fp32) == 3, key
        assert bf16 == pytest.approx(fp32, rel=0.02, abs=1e-4), key


@pytest.mark.process
def test_resuming_a_plain_checkpoint_with_acai_on_is_one_line(checkpointed_run):
    cmd = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *checkpointed_run.overrides,
           "train.max_steps=8", "loss.acai_weight=100"]
    done = run_bounded(cmd, timeout=120)
    assert done.returncode == 2, done.stdout[-3000:]
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds no ACAI critic" in errors[0], done.stdout[-3000:]
    assert "Traceback" not in done.stdout


@pytest.mark.process
def test_a_run_started_from_a_checkpoint_starts_from_its_adversaries(smoke_shards, tmp_path):
    common = [f"data.shards={smoke_shards}", f"run.output_dir={tmp_path}", "data.batch_size=16", *BOTH]
    train_ranks(1, [*common, "train.max_steps=2"])
    source = tmp_path / "pretrain/checkpoints/step_00000002"
    # A learning rate of 1e-12: one step leaves the critic it started from, to 1e-9.
    out = train_ranks(1, [*common, "run.name=next", "train.max_steps=1", f"train.init_from={source}",
                          "optim.lr=1e-12"])
    assert f"initialised the ACAI critic from {source}" in out
    assert f"initialised the patch discriminator from {source}" in out
    before, after = (load_file(folder / "model_1.safetensors")
                     for folder in (source, tmp_path / "next/checkpoints/step_00000001"))
    assert before.keys() == after.keys()
    assert {name.split(".")[0] for name in before} == {"critic", "discriminator"}
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-9) for k in before)
