"""The model wing: the paper's VAE, its loss, the networks trained against it, and slerp.

Imports nothing of the package but ``config`` and ``errors``: data and model are
the bottom of the layering (docs/architecture.md).
"""
