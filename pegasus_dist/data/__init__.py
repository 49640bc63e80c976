"""The data path, one stage per module.

- ``sources``: a source named by its spec (``cifar10:PATH``, ``folder:PATH`` ...), and synthetic
  images; its readers are ``official`` (the CIFAR-10 and STL-10 archives) and ``folders``
  (image folders and archives), and ``images`` holds what they share (``SourceImages``, the
  class vocabulary).
- ``shards``: WebDataset tar shards, written deterministically; ``ShardSet``, the one reader
  of a shard set (manifest, samples, decoded and checked images).
- ``manifest``: each shard set's ``manifest.json`` (counts, checksums, provenance).
- ``prepare``: sources -> the ``mix``, ``horse_bird`` and ``eval`` shard sets.
- ``loader``: the exact, seeded split of a shard set over ranks and workers, streamed
  or held in memory on the device.
- ``verify``: shard sets checked against their manifests.
"""
