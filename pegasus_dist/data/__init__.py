"""The data path, one stage per module.

- ``sources``: official CIFAR-10 / STL-10 archives, image folders, synthetic images.
- ``shards``: WebDataset tar shards, written deterministically; ``ShardSet``, the one reader
  of a shard set (manifest, samples, decoded and checked images).
- ``manifest``: each shard set's ``manifest.json`` (counts, checksums, provenance).
- ``prepare``: sources -> the ``mix``, ``horse_bird`` and ``eval`` shard sets.
- ``loader``: the exact, seeded split of a shard set over ranks and workers, streamed
  or held in memory on the device.
- ``verify``: shard sets checked against their manifests.
"""
