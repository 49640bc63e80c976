"""The training wing: the loop and its step, start-up and resume, checkpoints, faults, tracking.

Above data, model and evaluation; below ``train.py``, ``pipeline`` and ``cli`` (docs/architecture.md).
"""
