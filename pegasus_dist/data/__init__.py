"""The data path, one stage per module.

- ``sources``: official CIFAR-10 / STL-10 archives, image folders, synthetic images.
- ``png``: the shards' plain PNGs, written and read a batch at a time without Pillow.
- ``shards``: WebDataset tar shards, written deterministically and read with checks.
- ``manifest``: each shard set's ``manifest.json`` (counts, checksums, provenance).
- ``prepare``: sources -> the ``mix``, ``horse_bird`` and ``eval`` shard sets.
- ``loader``: the exact, seeded split of a shard set over ranks and workers, streamed
  or held in memory on the device.
- ``verify``: shard sets checked against their manifests.
"""
