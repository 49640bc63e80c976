"""The model wing: the VAE, its loss, the networks trained against it, slerp (docs/architecture.md)."""
