"""The sections of a run's typed configuration, every default; comments say what a key does."""

from __future__ import annotations

import contextlib
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pegasus_dist.errors import ConfigError

NAME_MAX = 255  # bytes in a file name on Linux filesystems (ext4, xfs, NFS)
Precision = Literal["no", "bf16", "fp16"]
Phase = Literal["pretrain", "finetune"]


def _widths(count: int, layers: str) -> Any:
    """The type of a list of ``count`` positive layer widths."""

    def check(widths: list[int]) -> list[int]:
        if len(widths) != count:
            raise ValueError(f"must list {count} widths ({layers})")
        return widths

    return Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(check)]


def _betas(betas: list[float]) -> list[float]:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError("must be two numbers in [0, 1)")
    return betas


def _folder_name(name: str) -> str:
    # The run folder is <output_dir>/<name>: "..", "/x" or "a/b" would write elsewhere.
    if name in ("", ".", "..") or {"/", "\0"} & set(name):
        raise ValueError("must be a plain folder name (no '/', not '.' or '..')")
    if len(os.fsencode(name)) > NAME_MAX:  # its bytes on disk, under any locale
        raise ValueError(f"must be at most {NAME_MAX} bytes, the most a folder name holds")
    return name


ConvWidths = _widths(4, "the paper's 4 convolutions")
FcWidths = _widths(3, "4 fully connected layers per side")
ImageSide = Annotated[int, Field(ge=16, multiple_of=16)]  # 32, 64, 96: the side halves 4 times
ClassifierWidths = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=8)]


class Section(BaseModel):
    """A section: strict types (``epochs: 1.5`` is refused, not rounded), no unknown keys, and
    finite numbers (an ``inf`` weight or ``nan`` decay would train to NaN, not fail)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_1_1(cls, value: Any, info: ValidationInfo) -> Any:
        """Undo YAML 1.1's readings of 3e-4 (no dot) as a string, `no` as false, nothing as null."""
        hint = cls.model_fields[info.field_name].annotation
        if hint is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        if hint is str and value is None:
            return ""
        if value is False and "no" in typing.get_args(hint):
            return "no"
        return value

    @classmethod
    def key(cls, loc: tuple[int | str, ...]) -> str:
        """How a message names the key at ``loc``: ``model.channels[2]``."""
        rest = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        return f"{loc[0]}{rest}" if loc else ""


class RunConfig(Section):
    """Where a run writes: ``<output_dir>/<name>/``."""

    output_dir: str = "runs"
    name: Annotated[str, AfterValidator(_folder_name)] = "pretrain"
    # auto: continue from the run directory's newest checkpoint if any; never: refuse a run
    # directory that has checkpoints; or the path of one checkpoint directory to resume.
    resume: str = "auto"


class DataConfig(Section):
    """Which shard set a phase trains on and how it is fed."""

    shards: str = "shards"  # the folder that `pegasus-dist prepare` wrote
    shard_set: str = Field("mix", min_length=1)  # a subfolder of `shards`: mix or horse_bird
    batch_size: int = Field(128, ge=1)  # per process; the global batch is this times the world size
    # Images per optimizer step on any world size (0: off), over batch_size: the per-process batch is
    # this / (processes x train.grad_accum_steps), exactly, so a resume on N processes takes the same steps.
    global_batch_size: int = Field(0, ge=0)
    num_workers: int = Field(2, ge=0)  # loader processes per training process
    seed: int = 0  # seeds the per-epoch shuffle, identical on every rank
    # A corrupt shard or sample: stop naming the file, or skip it (a copy of a good sample
    # takes its slot in the batch) and count it in the logs.
    on_bad_sample: Literal["stop", "skip"] = "stop"
    resume_on_other_data: bool = False  # resume across a new `prepare` or data.seed; else refused
    # stream reads batches in loader workers; memory holds the set as one uint8 tensor on
    # the device; auto takes memory when the set fits memory_limit_mb.
    mode: Literal["auto", "stream", "memory"] = "auto"
    memory_limit_mb: int = Field(2048, ge=0)
    decoded: bool = True  # read the set's checked decoded.npy, not the tars (data/decoded.py)


class ModelConfig(Section):
    """The paper's convolutional VAE (Section 1.1)."""

    image_size: ImageSide = 32
    channels: ConvWidths = [64, 128, 256, 512]
    fc_dims: FcWidths = [512, 512, 256]
    latent_dim: int = Field(128, ge=1)
    leaky_slope: float = 0.2
    sync_batchnorm: bool = False  # batch norm over the global batch: N processes of B compute as 1 of N*B
    # How the decoder doubles the side: transpose (the paper's) or resize, nearest-neighbour then a 3x3
    # convolution: no checkerboard of overlapping 4x4 transposed kernels (Odena et al. 2016, Distill).
    upsample: Literal["transpose", "resize"] = "transpose"
    # p(x|z): bernoulli (the paper's BCE on [0, 1]) or logistic, a proper likelihood of 8-bit
    # images (PixelCNN++'s discretized logistic, Salimans et al. 2017; a learned scale per colour).
    likelihood: Literal["bernoulli", "logistic"] = "bernoulli"


class LossConfig(Section):
    """Equation (1): summed pixel BCE plus beta times the closed-form KL (2), and what sharpens it."""

    beta: float = Field(1.0, ge=0)
    kl_warmup_steps: int = Field(0, ge=0)  # steps over which beta grows linearly from 0 (KL warm-up)
    free_bits: float = Field(0.0, ge=0)  # nats per latent dimension and image the KL does not charge
    # ACAI's lambda (model/acai.py): weight of |C(x_a)|^2, the critic's guess of decoded
    # interpolants' mixing coefficient, in the per-image loss; 0: off. The BCE here sums over
    # 3 x H x W pixels where ACAI's MSE averages: 0.5 x 3 x H x W (1,536 at 32 px) is ACAI's 0.5.
    acai_weight: float = Field(0.0, ge=0)
    # gamma of the critic's regulariser: it sees gamma x + (1 - gamma) x_hat, target 0.
    acai_gamma: float = Field(0.2, ge=0, le=1)
    # Weight of the patch discriminator's hinge term -mean D(x_hat) (model/adversaries.py, after
    # VAE-GAN); 0: off. Like acai_weight, 0.1 x 3 x H x W (300 at 32 px) is a per-pixel 0.1.
    patch_gan_weight: float = Field(0.0, ge=0)
    # Weight of feature matching: the L1 distance between the discriminator's hidden activations of
    # an image and of its reconstruction (model/adversaries.py); 0: off. 3 x H x W (3,072 at 32 px)
    # weighs a per-feature distance of 1 like a per-pixel nat of the reconstruction.
    feature_matching_weight: float = Field(0.0, ge=0)
    # VQGAN's adaptive weight (Esser et al. 2021, arXiv:2012.09841, Eq. 7): patch_gan_weight then
    # multiplies the ratio of the reconstruction's gradient norm at the decoder's last layer to the
    # hinge term's, so it is of the order of 1 (VQGAN: 0.8), not 300. The reference run's fixed 300
    # stood at 0.55-0.87 of that ratio at its checkpoints (docs/reference-run.md, seventh round).
    patch_gan_adaptive: bool = False
    # Weight of a perceptual loss (DFC-VAE, Hou et al. 2017, arXiv:1610.00291): the L1 distance
    # between an image's and its reconstruction's activations in every block of a frozen classifier
    # (training/perceptual.py); 0: off. Like feature_matching_weight, 3 x H x W is a per-pixel nat.
    perceptual_weight: float = Field(0.0, ge=0)
    # The frozen classifier's folder: not the grids' judge (quality.classifier, never trained against) but
    # one trained apart, with its own seed and widths, by `pegasus-dist classifier --for-loss` or `pipeline`.
    perceptual_network: str = ""
    perceptual_seed: int = Field(1, ge=0)
    perceptual_widths: ClassifierWidths = [32, 64, 128, 256]

    @model_validator(mode="after")
    def _discriminator_terms_need_the_discriminator(self) -> LossConfig:
        for key in ("feature_matching_weight", "patch_gan_adaptive"):
            if getattr(self, key) and not self.patch_gan_weight:
                raise ConfigError(f"loss.{key} works on the patch discriminator: turn it on too (loss."
                                  "patch_gan_weight > 0: e.g. 300, or 0.8 with loss.patch_gan_adaptive)")
        if self.perceptual_weight and not self.perceptual_network:
            raise ConfigError("loss.perceptual_weight needs loss.perceptual_network: the folder of a "
                              "classifier trained for it (`pegasus-dist classifier --for-loss` or "
                              "`pipeline` trains it there)")
        return self


class OptimConfig(Section):
    """Adam, with the learning rate following the global batch."""

    lr: float = Field(1e-3, gt=0)  # the learning rate at a global batch of `base_batch_size`
    base_batch_size: int = Field(128, ge=1)
    # lr at a global batch G: sqrt: lr * sqrt(G / base_batch_size), Adam's rule (Malladi et al. 2022); linear:
    # lr * G / base_batch_size (Goyal et al.'s rule for SGD: Adam diverges with it at G=1024); none: lr.
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    # Steps of linear warm-up from lr/warmup_steps to the scaled lr (Goyal et al. 2017); 0: off.
    # 200 is Goyal's 5 epochs at the SLURM scripts' largest global batch (4096 on the 173k mix).
    warmup_steps: int = Field(200, ge=0)
    # cosine: after the warm-up the rate falls, epoch by epoch, along a half cosine to min_lr_ratio x
    # itself in the last epoch (SGDR, Loshchilov & Hutter 2017; nanoGPT ends at a tenth, after
    # Hoffmann et al. 2022); none: it stays. Per epoch, so the same on any process count.
    decay: Literal["none", "cosine"] = "none"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    betas: Annotated[list[float], AfterValidator(_betas)] = [0.9, 0.999]
    weight_decay: float = 0.0
    # Max gradient norm; 0 disables clipping. About the norm of the paper model's
    # first step on CIFAR-10 (1,035-1,065): 10x what it falls to after 10 steps (60-170).
    grad_clip: float = Field(1000.0, ge=0)


class TrainConfig(Section):
    """How long and how a phase trains."""

    phase: Phase = "pretrain"
    epochs: int = Field(100, ge=1)
    max_steps: int = Field(0, ge=0)  # stop after this many optimizer steps; 0 runs all epochs
    # Micro-batches per optimizer step, gradients summed without an all-reduce in between: a
    # small machine reproduces a larger global batch. max_steps and *_every count optimizer steps.
    grad_accum_steps: int = Field(1, ge=1)
    mixed_precision: Precision = "no"
    seed: int = 0  # model initialisation and reparameterisation noise
    # Decay of an EMA of the VAE's weights (ema.safetensors) for the grids, eval and `sample`; 0: off.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    init_from: str = ""  # a checkpoint or run directory (its newest) whose weights start this phase
    # Steps between logged (rank-reduced) metrics, the sync points where the ranks check for
    # NaN/Inf losses: steps in between never wait for the device (stop signals: agreed each step).
    log_every: int = Field(10, ge=1)
    # Checkpoints every checkpoint_every steps (0: none) and at the first sync point
    # checkpoint_minutes after the last, timed by the main process (0: none, so that they fall
    # on the same steps however fast a run goes); always at the phase's end and on a stop signal.
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_minutes: float = Field(10.0, ge=0)
    keep_checkpoints: int = Field(3, ge=1)
    # A NaN/Inf loss on any rank. stop: at the next sync point, before any checkpoint, naming the first
    # bad step and the last good checkpoint. skip: every rank skips that update (a host sync a step).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    collective_timeout_s: int = Field(600, ge=1)  # a collective's wait for a missing rank
    cpu: bool = False  # train on the CPU even where CUDA is available
    # NHWC activations: 1.05-1.08x for the paper model and 1.31x for the reference recipe on this
    # project's CPU (docs/performance.md), and the layout of tensor cores' convolutions.
    channels_last: bool = True
    # GPU throughput options, off until bench/gpu-check.sh measures them. No DDP static_graph: it changed
    # 40 % of the weights (by up to 8e-5) after 3 steps on 2 gloo processes: N no longer train like one.
    cudnn_benchmark: bool = False  # cuDNN's autotuner
    ddp_bucket_view: bool = False  # gradients as views of DDP's buckets: no copy, the same weights
    ddp_bf16_gradients: bool = False  # bf16 gradients on the wire (NCCL): rounds every gradient
    compile: bool = False  # torch.compile the model (pays off on GPUs, after a warm-up)


class SamplerConfig(Section):
    """The paper's Section 1.4: slerp between 8 horses and 21 birds."""

    shard_set: str = "horse_bird"  # where the labelled horses and birds come from
    horse_keys: list[str] = Field(default_factory=list)  # empty: a seeded random choice
    bird_keys: list[str] = Field(default_factory=list)
    num_horses: int = Field(8, ge=1)
    num_birds: int = Field(21, ge=1)
    mu_start: float = Field(0.4, ge=0, le=1)
    mu_end: float = Field(0.7, ge=0, le=1)
    num_mu: int = Field(8, ge=1)
    seed: int = 0
    # slerp (the paper's, with reconstructions and prior samples), lerp, analogy or prior.
    method: Literal["slerp", "lerp", "analogy", "prior"] = "slerp"
    # The wing vector: mean latent of these keys (empty: every bird) minus the other classes'.
    attribute_keys: list[str] = Field(default_factory=list)
    attribute_shard_set: str = "mix"
    attribute_samples: int = Field(2000, ge=1)  # at most this many images per side of the mean
    strength_max: float = 2.0  # the analogy grid adds 0 .. strength_max times the vector
    # Empty horse_keys/bird_keys: random (seeded), or confident: the seeded pool's best recognised
    # reconstructions, a curation that flatters the grid: compare models on random (README.md).
    pick: Literal["random", "confident"] = "random"
    pick_pool: int = Field(256, ge=1)  # candidates per class that pick=confident reconstructs and scores

    @model_validator(mode="after")
    def _fits(self) -> SamplerConfig:
        if self.mu_start > self.mu_end:
            raise ConfigError(f"sampler.mu_start {self.mu_start} is past sampler.mu_end {self.mu_end}; "
                              "the grid goes from mu_start to mu_end, so mu_start <= mu_end")
        for name, keys, count in (("horse_keys", self.horse_keys, self.num_horses),
                                  ("bird_keys", self.bird_keys, self.num_birds)):
            if keys and len(keys) != count:
                raise ConfigError(f"sampler.{name} lists {len(keys)} keys but the sampler uses {count}; "
                                  f"list exactly {count} or leave it empty for a seeded random choice")
        return self


class EvalConfig(Section):
    """The held-out evaluation run at the end of each phase (`pegasus-dist eval`)."""

    shard_set: str = "eval"  # written by `prepare`; training never sees it
    batch_size: int = Field(256, ge=1)
    seed: int = 0  # the one sample of z per image of the ELBO estimate


class QualityConfig(Section):
    """The project's own judge of the grids (evaluation.classifier, evaluation.quality)."""

    classifier: str = ""  # `pegasus-dist classifier`'s folder; empty: <run.output_dir>/classifier
    # 5 epochs reach 70 % held-out accuracy; about 26 s an epoch of CIFAR-10's 58,800 on 2 cores.
    classifier_epochs: int = Field(5, ge=1)
    classifier_batch_size: int = Field(128, ge=2)  # batch norm needs two images
    classifier_seed: int = Field(0, ge=0)  # initialisation, epoch order and augmentation draws
    # Channels of its conv blocks (3 x 3 conv, batch norm, ReLU, 2 x 2 max-pool each), one block per
    # halving of the image: at most log2(model.image_size) of them.
    classifier_widths: ClassifierWidths = [32, 64, 128]


class WandbConfig(Section):
    """Weights & Biases through Accelerate's tracker."""

    # auto: WANDB_MODE, else online with WANDB_API_KEY, else offline; others win over it (README.md, "W&B").
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # Seconds an online start waits for the server before falling back to offline (wandb's own
    # timeout: 90 s, then a crash); over WANDB_INIT_TIMEOUT. A slow link may need more.
    init_timeout_s: float = Field(30.0, gt=0)
    project: str = "pegasus-dist"
    entity: str = ""
    name: str = ""  # empty: <group>/<run.name> (smoke/pretrain)
    group: str = ""  # empty: run.output_dir's name, which both phases share (runs/smoke -> smoke)
    tags: list[str] = Field(default_factory=list)


class Config(Section):
    """The whole run, a section per concern; saved with it as ``config.yaml`` (:meth:`to_yaml`)."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _classifiers_fit(self) -> Config:
        for key, widths in (("quality.classifier_widths", self.quality.classifier_widths),
                            ("loss.perceptual_widths", self.loss.perceptual_widths)):
            if 2 ** len(widths) > self.model.image_size:
                raise ConfigError(f"{key} has {len(widths)} blocks, each halving the image: "
                                  f"{self.model.image_size} px allows at most "
                                  f"{self.model.image_size.bit_length() - 1}")
        if not self.loss.perceptual_weight:
            return self
        network = self.loss.perceptual_network
        if Path(network).resolve() == self.classifier_dir.resolve():
            raise ConfigError(f"loss.perceptual_network ({network}) is quality.classifier, the judge of the "
                              "grids, which is never trained against: give the loss another folder")
        # Issue 24: a network used in a loss is trained separately, another seed and architecture.
        for key in ("seed", "widths"):
            if getattr(self.loss, f"perceptual_{key}") == getattr(self.quality, f"classifier_{key}"):
                raise ConfigError(f"loss.perceptual_{key} equals quality.classifier_{key}: the loss's "
                                  "network must differ from the judge's in both seed and widths")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def classifier_dir(self) -> Path:
        return Path(self.quality.classifier or Path(self.run.output_dir) / "classifier")

    @property
    def wandb_group(self) -> str:
        return self.wandb.group or Path(self.run.output_dir).resolve().name

    @property
    def wandb_name(self) -> str:
        return self.wandb.name or f"{self.wandb_group}/{self.run.name}"


class PrepareConfig(Section):
    """`pegasus-dist prepare`: which sources, and how the shard sets are written."""

    sources: list[str] = Field(default_factory=list, min_length=1)  # cifar10:PATH, synthetic:N ...
    out: str = "shards"  # mix/, horse_bird/ and eval/ go here
    image_size: ImageSide = 32  # side of the square images written
    shard_size: int = Field(5000, ge=1)  # samples per tar file
    eval_fraction: float = Field(0.02, ge=0, lt=1)  # seeded held-out share of every source, never trained on
    seed: int = 0  # seeds the cross-source shuffle and the held-out choice
    verify_checksums: bool = True  # official archives must match their published md5

    @classmethod
    def key(cls, loc: tuple[int | str, ...]) -> str:
        """Its keys are prepare's options: a message names --image-size, not image_size."""
        return "--source" if loc[0] == "sources" else "--" + str(loc[0]).replace("_", "-")
