"""A run's one typed configuration: validated by :mod:`.load`, every default in :mod:`.sections`."""

from pegasus_dist.config.load import field_problem, load_config, problem, validated
from pegasus_dist.config.sections import (
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Phase,
    Precision,
    PrepareConfig,
    QualityConfig,
    SamplerConfig,
)

__all__ = ["Config", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "Phase", "Precision",
           "PrepareConfig", "QualityConfig", "SamplerConfig", "field_problem", "load_config", "problem",
           "validated"]
