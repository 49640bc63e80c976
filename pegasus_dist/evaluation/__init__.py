"""Sampling and evaluation: the Pegasus sampler, the quality classifier, held-out metrics, the report.

Above data and model, below training, which runs the sampler after each phase (docs/architecture.md).
"""
