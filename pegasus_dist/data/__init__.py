"""The data wing: sources -> shards (prepare) -> loader, and verify (docs/architecture.md)."""
