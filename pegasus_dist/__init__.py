"""pegasus-dist: distributed training of the winged-horse VAE."""

__version__ = "0.1.0"
