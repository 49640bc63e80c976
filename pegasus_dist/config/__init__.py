"""The one typed configuration of a run: a YAML chain, then ``section.key=value`` overrides.

Loaded and validated by :mod:`.load`; every default lives in :mod:`.sections`.
"""

from pegasus_dist.config.load import load_config, problem, validated
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
           "PrepareConfig", "QualityConfig", "SamplerConfig", "load_config", "problem", "validated"]
