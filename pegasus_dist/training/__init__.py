"""The training wing: the loop and its step, start-up and resume, checkpoints, faults,
optimizer, tracking and what keeps ranks in step.

Above data, model and evaluation; only ``train.py``, ``pipeline`` and ``cli``
sit above it (docs/architecture.md).
"""
