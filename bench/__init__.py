"""Benchmarks of the repository (not installed with the package): `pegasus-dist bench` runs harness.py."""
