"""pegasus-dist: distributed training of the winged-horse VAE."""

from importlib.metadata import version

__version__ = version("pegasus-dist")  # pyproject.toml's, through the installed package's metadata
