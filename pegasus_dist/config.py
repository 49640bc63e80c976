"""The one typed configuration of a run.

Config flows one way: a YAML file (which may name one ``base`` file it builds
on, and that one its own: a chain), then ``section.key=value`` overrides from
the command line, into one validated :class:`Config`. Defaults live only in the dataclasses below; the
CLI and the trainer read them from here and nowhere else. The resolved config
is saved with every run and sent to W&B.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pegasus_dist.errors import ConfigError

Precision = Literal["no", "bf16", "fp16"]


@dataclass
class RunConfig:
    """Where a run writes: ``<output_dir>/<name>/``."""

    output_dir: str = "runs"
    name: str = "pretrain"
    # "auto": continue from the newest checkpoint in the run directory if there
    # is one; "never": refuse to reuse a run directory that has checkpoints;
    # or a path to one checkpoint directory to resume from.
    resume: str = "auto"


@dataclass
class DataConfig:
    """Which shard set a phase trains on and how it is fed."""

    shards: str = "shards"  # the folder that `pegasus-dist prepare` wrote
    shard_set: str = "mix"  # a subfolder of `shards`: mix or horse_bird
    batch_size: int = 128  # per process; the global batch is this times the world size
    # Images per optimizer step, whatever the world size: when set (not 0) it wins
    # over batch_size, and the per-process batch is global_batch_size / (processes x
    # train.grad_accum_steps), which must divide evenly. A run then resumes on
    # another number of processes with the same global batch, so the same steps.
    global_batch_size: int = 0
    num_workers: int = 2  # loader processes per training process
    seed: int = 0  # seeds the per-epoch shuffle, identical on every rank
    # A corrupt shard or sample: stop naming the file, or skip it (its slot in
    # the batch takes a copy of a good sample) and count it in the logs.
    on_bad_sample: Literal["stop", "skip"] = "stop"
    # stream decodes shards as it trains; memory decodes the set once into one
    # uint8 tensor on the device; auto takes memory when it fits memory_limit_mb.
    mode: Literal["auto", "stream", "memory"] = "auto"
    memory_limit_mb: int = 2048


@dataclass
class ModelConfig:
    """The paper's convolutional VAE (Section 1.1)."""

    image_size: int = 32  # must be divisible by 2 ** len(channels)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    fc_dims: list[int] = field(default_factory=lambda: [512, 512, 256])
    latent_dim: int = 128
    leaky_slope: float = 0.2
    # Batch norm over the global batch instead of each process's share; makes
    # N processes with batch B compute exactly what 1 process with N*B does.
    sync_batchnorm: bool = False
    # How the decoder doubles the side: transpose (the paper's transposed convolutions)
    # or resize (nearest-neighbour upsampling then a 3x3 convolution, which cannot
    # leave the checkerboard of overlapping 4x4 transposed kernels: Odena, Dumoulin and
    # Olah 2016, "Deconvolution and Checkerboard Artifacts", Distill).
    upsample: Literal["transpose", "resize"] = "transpose"
    # p(x|z): bernoulli (the paper's BCE on [0, 1]) or logistic, a discretized logistic
    # over the 256 pixel levels with a learned scale per colour channel (PixelCNN++,
    # Salimans et al. 2017, with one component): a proper likelihood of 8-bit images.
    likelihood: Literal["bernoulli", "logistic"] = "bernoulli"


@dataclass
class LossConfig:
    """Equation (1): summed pixel BCE plus beta times the closed-form KL (2), and what sharpens it."""

    beta: float = 1.0
    # Optimizer steps over which beta grows linearly from 0 (KL warm-up); 0: beta from the start.
    kl_warmup_steps: int = 0
    # Nats per latent dimension and image below which the KL is not charged (free bits); 0: off.
    free_bits: float = 0.0
    # ACAI's lambda (pegasus_dist/acai.py): weight of |C(x_a)|^2, the critic's guess of the
    # mixing coefficient of decoded interpolants, in the autoencoder's per-image loss; 0: off.
    # The loss here sums BCE over 3 x H x W pixels where ACAI's mean squared error averages
    # over them: lambda ~ 0.5 x 3 x H x W (1,536 at 32 px) is the order of ACAI's 0.5.
    acai_weight: float = 0.0
    # gamma of the critic's regulariser: it sees gamma x + (1 - gamma) x_hat, target 0.
    acai_gamma: float = 0.2
    # Weight of the patch discriminator's hinge term -mean D(x_hat) on reconstructions
    # (pegasus_dist/adversaries.py: VAE-GAN's adversarial loss on decodes); 0: off. Like
    # acai_weight, ~ 0.1 x 3 x H x W (300 at 32 px) is the order of a loss averaged over pixels.
    patch_gan_weight: float = 0.0


@dataclass
class OptimConfig:
    """Adam, with the learning rate following the global batch."""

    lr: float = 1e-3  # the learning rate at a global batch of `base_batch_size`
    base_batch_size: int = 128
    # How lr follows the global batch G (per-process batch x processes x
    # train.grad_accum_steps): sqrt uses lr * sqrt(G / base_batch_size), the rule
    # for Adam (Malladi et al. 2022); linear uses lr * G / base_batch_size (Goyal
    # et al.'s rule for SGD: Adam diverges with it at G=1024); none keeps lr.
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    # Optimizer steps of linear warm-up from lr/warmup_steps to the scaled lr
    # (Goyal et al. 2017); 0 disables it. 200 is Goyal's 5 epochs at the largest
    # global batch the SLURM scripts launch (4 nodes: 4096 on the 173,000-image mix).
    warmup_steps: int = 200
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # Max gradient norm; 0 disables clipping. About the norm of the paper model's
    # first step on CIFAR-10 (1,035-1,065): 10x what it falls to after 10 steps (60-170).
    grad_clip: float = 1000.0


@dataclass
class TrainConfig:
    """How long and how a phase trains."""

    phase: Literal["pretrain", "finetune"] = "pretrain"
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps; 0 runs all epochs
    # Micro-batches of data.batch_size per optimizer step, their gradients summed
    # without a DDP all-reduce in between: a small machine reproduces a larger
    # global batch. Steps (max_steps, log_every, checkpoint_every) count optimizer steps.
    grad_accum_steps: int = 1
    mixed_precision: Precision = "no"
    seed: int = 0  # model initialisation and reparameterisation noise
    # A checkpoint directory, or a run directory (its newest checkpoint), whose
    # model weights start this phase; the finetune phase starts from pretrain.
    init_from: str = ""
    # Steps between logged (rank-reduced) metrics. Also the sync points where
    # the ranks check for NaN/Inf losses: steps in between never wait for the
    # device. (Stop signals are agreed on every step, without waiting.)
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints; 0: once per epoch
    keep_checkpoints: int = 3
    # A NaN/Inf loss on any rank. stop: found at the next sync point (at the
    # latest the next log or checkpoint step, before any checkpoint is written),
    # the run ends naming the first bad step and the last good checkpoint.
    # skip: that step's update is skipped on every rank (counted and logged);
    # the price is one host sync per step, which slows GPU training.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Seconds a collective may wait for a missing rank before every rank fails.
    collective_timeout_s: int = 600
    cpu: bool = False  # train on the CPU even where CUDA is available
    channels_last: bool = False  # NHWC activations: faster convolutions on tensor cores
    compile: bool = False  # torch.compile the model (pays off on GPUs, after a warm-up)


@dataclass
class SamplerConfig:
    """The paper's Section 1.4: slerp between 8 horses and 21 birds."""

    shard_set: str = "horse_bird"  # where the labelled horses and birds come from
    horse_keys: list[str] = field(default_factory=list)  # empty: a seeded random choice
    bird_keys: list[str] = field(default_factory=list)
    num_horses: int = 8
    num_birds: int = 21
    mu_start: float = 0.4
    mu_end: float = 0.7
    num_mu: int = 8
    seed: int = 0
    # `pegasus-dist sample --method`: slerp (the paper's, with reconstructions
    # and prior samples), lerp, analogy (the "wing vector") or prior.
    method: Literal["slerp", "lerp", "analogy", "prior"] = "slerp"
    # The wing vector: mean latent of these keys (empty: of every bird) minus
    # the mean latent of the other labelled classes, read from this shard set.
    attribute_keys: list[str] = field(default_factory=list)
    attribute_shard_set: str = "mix"
    attribute_samples: int = 2000  # at most this many images per side of the mean
    strength_max: float = 2.0  # the analogy grid adds 0 .. strength_max times the vector
    # Which horses and birds, when horse_keys/bird_keys are empty: random (a seeded
    # draw), or confident: those whose own reconstructions the quality classifier
    # recognises best, from a seeded pool of pick_pool per class. confident is
    # curation, as the paper's author picked by hand: it flatters the grid, it does
    # not measure the model (quality.json's scores of a random pick do).
    pick: Literal["random", "confident"] = "random"
    pick_pool: int = 256  # candidates per class that pick=confident reconstructs and scores


@dataclass
class EvalConfig:
    """The held-out evaluation run at the end of each phase (`pegasus-dist eval`)."""

    shard_set: str = "eval"  # written by `prepare`; training never sees it
    batch_size: int = 256
    seed: int = 0  # the one sample of z per image of the ELBO estimate


@dataclass
class QualityConfig:
    """The project's own judge of the grids (evaluation.classifier, evaluation.quality)."""

    # The classifier's folder (`pegasus-dist classifier` writes it); empty:
    # <run.output_dir>/classifier, which both phases of a pipeline share.
    classifier: str = ""
    # About 26 s an epoch of the 58,800 CIFAR-10 images on 2 idle CPU cores (several
    # times that on a busy one); 5 epochs reach 70 % held-out accuracy.
    classifier_epochs: int = 5
    classifier_batch_size: int = 128
    classifier_seed: int = 0  # initialisation, epoch order and augmentation draws


@dataclass
class WandbConfig:
    """Weights & Biases through Accelerate's tracker."""

    # auto: WANDB_MODE from the environment if set, else online when WANDB_API_KEY
    # is set, else offline; any other value here wins over WANDB_MODE
    # (pegasus_dist.training.tracking.wandb_mode). An online start that fails (no network,
    # a bad key) falls back to offline with one warning.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # How long an online start may wait for the W&B server before falling back to
    # offline (wandb's own init_timeout, 90 s by default, then a crash); a slow link
    # may need more. Overrides WANDB_INIT_TIMEOUT.
    init_timeout_s: float = 30.0
    project: str = "pegasus-dist"
    entity: str = ""
    # Empty name or group: derived from the run folder (Config.wandb_group and
    # Config.wandb_name). The group is the name of run.output_dir, so the
    # pretrain and finetune runs of one pipeline, written into the same
    # output_dir, share it (runs/smoke -> smoke); the name is <group>/<run.name>
    # (smoke/pretrain), the run folder as people know it. The job type is the phase.
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

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


@dataclass
class PrepareConfig:
    """`pegasus-dist prepare`: which sources, and how the shard sets are written."""

    sources: list[str] = field(default_factory=list)  # specs such as cifar10:PATH, synthetic:N
    out: str = "shards"  # mix/, horse_bird/ and eval/ go here
    image_size: int = 32  # side of the square images written
    shard_size: int = 5000  # samples per tar file
    eval_fraction: float = 0.02  # seeded held-out share of every source, never trained on
    seed: int = 0  # seeds the cross-source shuffle and the held-out choice
    verify_checksums: bool = True  # official archives must match their published md5

    def validate(self) -> None:
        checks = [
            (bool(self.sources), "prepare needs at least one --source"),
            (self.image_size >= 16 and self.image_size % 16 == 0,
             "--image-size must be a positive multiple of 16 (e.g. 32, 64, 96)"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (0 <= self.eval_fraction < 1, "--eval-fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (over the chain of ``base`` files it builds on), apply overrides, validate."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    cfg = _build(Config, raw, prefix="")
    _validate(cfg)
    return cfg


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``path`` over the chain of files it builds on: each names at most one ``base``."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"`base` files include each other in a cycle: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(
            f"{path}: base must name one file (a config builds on a single parent), got {base!r}"
        )
    merged = _read_yaml_chain(path.parent / base, (*seen, path))
    # Two levels, section then key: a section in this file updates the parent's key by key.
    for section, values in data.items():
        parent = merged.get(section)
        both = isinstance(values, dict) and isinstance(parent, dict)
        merged[section] = {**parent, **values} if both else values
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"override {item!r} is not of the form section.key=value (e.g. train.epochs=5)"
        )
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value is False and "no" in choices:  # YAML 1.1 reads `no` (unquoted) as false
            value = "no"
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in the config")  # a code bug
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _validate(cfg: Config) -> None:
    """Reject impossible values before any training starts."""
    checks = [
        # The run folder is <output_dir>/<name>: "..", "/x" or "a/b" would write elsewhere.
        (cfg.run.name not in ("", ".", "..") and not {"/", "\0"} & set(cfg.run.name),
         f"run.name must be a plain folder name (no '/', not '.' or '..'), got {cfg.run.name!r}"),
        (cfg.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (cfg.data.global_batch_size >= 0, "data.global_batch_size must be 0 (unset) or positive"),
        (cfg.data.num_workers >= 0, "data.num_workers must be 0 or more"),
        (cfg.data.memory_limit_mb >= 0, "data.memory_limit_mb must be 0 or more"),
        (cfg.data.shard_set != "", "data.shard_set must name a shard set such as mix"),
        (len(cfg.model.channels) == 4, "model.channels must list 4 widths (the paper's 4 convs)"),
        (len(cfg.model.fc_dims) == 3, "model.fc_dims must list 3 widths (4 FC layers per side)"),
        (all(c >= 1 for c in cfg.model.channels + cfg.model.fc_dims),
         "model.channels and model.fc_dims must be positive"),
        (cfg.model.latent_dim >= 1, "model.latent_dim must be at least 1"),
        (cfg.model.image_size >= 16 and cfg.model.image_size % 16 == 0,
         "model.image_size must be a positive multiple of 16 (e.g. 32, 64, 96)"),
        (cfg.loss.beta >= 0, "loss.beta must be 0 or more"),
        (cfg.loss.kl_warmup_steps >= 0, "loss.kl_warmup_steps must be 0 (off) or positive"),
        (cfg.loss.free_bits >= 0, "loss.free_bits must be 0 (off) or positive (nats per dimension)"),
        (cfg.loss.acai_weight >= 0, "loss.acai_weight must be 0 (ACAI off) or positive"),
        (0 <= cfg.loss.acai_gamma <= 1, "loss.acai_gamma must be in [0, 1]"),
        (cfg.loss.patch_gan_weight >= 0, "loss.patch_gan_weight must be 0 (off) or positive"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.optim.base_batch_size >= 1, "optim.base_batch_size must be at least 1"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "optim.betas must be two numbers in [0, 1)"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be 0 (off) or positive"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be 0 (off) or positive"),
        (cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.max_steps >= 0, "train.max_steps must be 0 (no limit) or positive"),
        (cfg.train.log_every >= 1, "train.log_every must be at least 1"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be 0 or positive"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (cfg.train.collective_timeout_s >= 1, "train.collective_timeout_s must be positive"),
        (cfg.wandb.init_timeout_s > 0, "wandb.init_timeout_s must be positive"),
        (cfg.sampler.num_horses >= 1 and cfg.sampler.num_birds >= 1,
         "sampler.num_horses and sampler.num_birds must be at least 1"),
        (cfg.sampler.num_mu >= 1, "sampler.num_mu must be at least 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be at least 1"),
        (cfg.sampler.attribute_samples >= 1, "sampler.attribute_samples must be at least 1"),
        (cfg.sampler.pick_pool >= 1, "sampler.pick_pool must be at least 1"),
        (cfg.quality.classifier_epochs >= 1, "quality.classifier_epochs must be at least 1"),
        (cfg.quality.classifier_batch_size >= 2,
         "quality.classifier_batch_size must be at least 2 (batch norm needs two images)"),
        (cfg.quality.classifier_seed >= 0, "quality.classifier_seed must be 0 or more"),
        (0 <= cfg.sampler.mu_start <= cfg.sampler.mu_end <= 1,
         "sampler.mu_start and sampler.mu_end must satisfy 0 <= mu_start <= mu_end <= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, keys, count in (
        ("horse_keys", cfg.sampler.horse_keys, cfg.sampler.num_horses),
        ("bird_keys", cfg.sampler.bird_keys, cfg.sampler.num_birds),
    ):
        if keys and len(keys) != count:
            raise ConfigError(
                f"sampler.{name} lists {len(keys)} keys but the sampler uses {count}; "
                f"list exactly {count} or leave it empty for a seeded random choice"
            )
