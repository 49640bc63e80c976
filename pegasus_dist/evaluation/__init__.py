"""Sampling and evaluation: the Pegasus sampler, the quality classifier and its scores,
held-out metrics, the contact sheet and the HTML report.

Above data and model, below training, which runs the sampler after each phase
(docs/architecture.md).
"""
