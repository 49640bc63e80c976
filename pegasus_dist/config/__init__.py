"""The one typed configuration of a run.

Config flows one way: a YAML file (which may name one ``base`` file it builds
on, and that one its own: a chain), then ``section.key=value`` overrides from
the command line, into one :class:`Config` that pydantic validates
(:mod:`~pegasus_dist.config.load`). Defaults live only in the models of
:mod:`~pegasus_dist.config.sections`. The resolved config is saved with every
run and sent to W&B.
"""

from pegasus_dist.config.load import config_from_dict, load_config, problem, validated
from pegasus_dist.config.sections import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Phase,
    Precision,
    PrepareConfig,
    QualityConfig,
    RunConfig,
    SamplerConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = ["Config", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "Phase",
           "Precision", "PrepareConfig", "QualityConfig", "RunConfig", "SamplerConfig", "TrainConfig",
           "WandbConfig", "config_from_dict", "load_config", "problem", "validated"]
