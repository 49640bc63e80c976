"""The data path, one stage per module: sources -> shards (prepare) -> loader, and verify.

README.md's Layout table lists the modules; docs/architecture.md draws the data flow.
"""
