"""`pegasus-dist verify`: check shard sets against their manifests, reporting every problem. Per shard:
sha256 and sample count, every image decodes at the set's size and has its label, no key twice; the
held-out set shares the training sets' generation and no key with them; the decoded array, if any,
was decoded from these shards and is unchanged since."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pegasus_dist.checksums import sha256_file
from pegasus_dist.data.decoded import verified_decoded
from pegasus_dist.data.manifest import FILENAME, HELD_OUT, SHARD_SETS
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.errors import DataError, PegasusError


def find_shard_sets(path: Path) -> list[Path]:
    """``path`` itself if it is a shard set, else the shard sets directly inside it."""
    if (path / FILENAME).is_file():
        return [path]
    # A set folder of prepare's whose manifest is gone is verified too (and refused), not passed over.
    found = sorted({p.parent for p in path.glob(f"*/{FILENAME}")}
                   | {path / n for n in SHARD_SETS if (path / n).is_dir()})
    if not found:
        raise DataError(f"no shard set ({FILENAME}) at or directly under {path}; "
                        "pass a folder written by `pegasus-dist prepare`")
    return found


def verify_shard_set(folder: Path) -> tuple[int, list[str]]:
    """(samples checked, problems) for one shard set."""
    try:
        shard_set = ShardSet(folder)
    except PegasusError as err:
        return 0, [str(err)]
    manifest = shard_set.manifest
    problems: list[str] = []
    keys: set[str] = set()
    labels: Counter[str] = Counter()
    checked = 0
    for index, (entry, path) in enumerate(zip(manifest.shards, manifest.shard_paths, strict=True)):
        if sha256_file(path) != entry.sha256:
            problems.append(f"{path}: sha256 differs from {folder / FILENAME}")
        checked += _check_samples(shard_set, index, keys, labels, problems)
    found, expected = dict(sorted(labels.items())), manifest.counts.get("label", {})
    if found != expected:
        problems.append(f"{folder}: the samples' labels {found} differ from the manifest's {expected}")
    if manifest.name == HELD_OUT:
        problems += _held_out_problems(shard_set, keys)
    if decoded := verified_decoded(manifest)[1]:
        problems.append(f"{decoded}; the next run that reads {folder} rebuilds it")
    return checked, problems


def _held_out_problems(held_out: ShardSet, keys: set[str]) -> list[str]:
    """The held-out set (its ``keys``) against each training set beside it."""
    root, problems = held_out.path.parent, []
    fix = f"re-run `pegasus-dist prepare --out {root}`"
    for folder in (root / name for name in SHARD_SETS if name != HELD_OUT):
        if not (folder / FILENAME).is_file():
            continue
        try:
            training = ShardSet(folder)
            shared = sorted(keys.intersection(s.key for s in training))
        except PegasusError as err:
            problems.append(f"cannot check {held_out.path} against {folder}: {err}")
            continue
        ours, theirs = held_out.manifest.generation, training.manifest.generation
        if theirs != ours:
            problems.append(f"{held_out.path} and {folder} come from different `prepare` runs "
                            f"(generation {ours or 'unrecorded'} and {theirs or 'unrecorded'}); {fix}")
        if shared:
            problems.append(f"{held_out.path}: {len(shared)} held-out key(s) are also in {folder} "
                            f"(e.g. {shared[0]}), so training sees them; {fix}")
    return problems


def _check_samples(shard_set: ShardSet, index: int, keys: set[str], labels: Counter[str],
                   problems: list[str]) -> int:
    """Decode every sample of one shard, recording keys, labels and problems; the count read."""
    count = 0
    try:
        # Not hashed again: verify_shard_set checked the file's sha256. read() then checks the count.
        for sample in shard_set.read(index, hashed=False):
            count += 1
            if sample.key in keys:
                problems.append(f"{sample.shard}: key {sample.key} appears twice")
            keys.add(sample.key)
            try:
                shard_set.decode(sample)
            except DataError as err:
                problems.append(str(err))
            try:
                labels[str(sample.meta["label"] or "unlabeled")] += 1
            except DataError as err:
                problems.append(str(err))
    except DataError as err:
        problems.append(str(err))
    return count
