"""WebDataset tar shards: deterministic writing and fast, checked reading.

A sample is two tar members with one key: ``KEY.png`` (the RGB image, a plain
PNG, see :mod:`pegasus_dist.data.png`) and ``KEY.json`` (``{"key", "source",
"index", "label", "split"}``). Keys hold no dots, since WebDataset splits a
member name at its first dot. Plain ``webdataset.WebDataset(urls)`` reads the
shards.

Shards are ustar archives written by webdataset's ``TarWriter`` with a fixed
owner, mode and time stamp, so the same samples give byte-identical shards. Reading
slices the members straight out of the file's bytes (about 1 us a member,
against about 20 us through ``tarfile``); an archive in another layout (PAX
or GNU headers, as other tools write) is read by WebDataset's own tar reader.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.tariterators import tar_file_iterator
from webdataset.writer import TarWriter

from pegasus_dist.data.png import Bytes
from pegasus_dist.errors import DataError

BLOCK = 512  # tar's unit: a header, and the padding of every member's data
OWNER = "pegasus"  # user and group name of every member
_JSON = json.JSONDecoder()  # skips json.loads's per-call encoding detection


@dataclass
class ShardSample:
    key: str
    png: Bytes  # a view into the shard's bytes when read by the fast path
    raw_meta: Bytes  # the JSON member, parsed on first use of ``meta``
    shard: Path
    _meta: dict | None = field(default=None, repr=False)

    @property
    def meta(self) -> dict:
        """The sample's JSON; a sample without a label raises DataError naming it."""
        if self._meta is None:
            self._meta = _parse_meta(self.raw_meta, self.shard, self.key)
        return self._meta


def _parse_meta(raw: Bytes, shard: Path, key: str) -> dict:
    try:
        meta = _JSON.decode(str(raw, "utf-8"))
    except ValueError:
        raise DataError(f"shard {shard}: {key}.json is not valid JSON") from None
    if not isinstance(meta, dict) or "label" not in meta:
        raise DataError(f"shard {shard}: {key}.json has no label field; "
                        "re-run `pegasus-dist prepare`")
    return meta


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, dict]]) -> None:
    """Write (key, png bytes, meta) samples, in order, into one tar file.

    webdataset's TarWriter, with every member's owner, mode and time stamp
    fixed, so the same samples give the same bytes. One writer per shard, not
    a ShardWriter: ``prepare`` writes its shards in parallel, one per process.
    """
    with TarWriter(str(path), user=OWNER, group=OWNER, mode=0o444, mtime=0) as writer:
        for key, png, meta in samples:
            writer.write({"__key__": key, "png": png, "json": meta})


def iter_shard(path: Path) -> Iterator[ShardSample]:
    """The samples of one shard, in file order; a damaged tar raises DataError naming it.

    The samples before the damage are yielded first, so a reader that skips
    bad samples keeps them.
    """
    pending: dict[str, dict[str, bytes]] = {}
    try:
        data = path.read_bytes()
        members = _ustar_members(data) if _is_plain_ustar(data) else _webdataset_members(path)
        for name, content in members:
            key, _, ext = name.partition(".")
            parts = pending.setdefault(key, {})
            parts[ext] = content
            if "png" in parts and "json" in parts:
                del pending[key]
                yield ShardSample(key, parts["png"], parts["json"], path)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DataError(
            f"shard {path} is unreadable ({err}); re-run `pegasus-dist prepare` to rewrite it"
        ) from None
    if pending:
        key = next(iter(pending))
        raise DataError(f"shard {path}: sample {key} lacks its png or json member; "
                        "re-run `pegasus-dist prepare`")


def _is_plain_ustar(data: bytes) -> bool:
    """Whether the archive starts with a ustar header of a regular file (how we write them)."""
    return len(data) >= BLOCK and data[257:262] == b"ustar" and data[156:157] in (b"0", b"\0")


def _ustar_members(data: bytes) -> Iterator[tuple[str, memoryview]]:
    """(name, content) of each regular file: views into the archive's bytes, not copies."""
    view, offset = memoryview(data), 0
    while offset + BLOCK <= len(data) and data[offset]:  # a zero byte: the end-of-archive marker
        kind = data[offset + 156]
        if kind not in (0, 48, 53):  # NUL and "0": a regular file, "5": a directory
            raise ValueError(f"member at byte {offset} is of tar type {chr(kind)!r}, which "
                             "`pegasus-dist prepare` never writes")
        size = int(data[offset + 124 : offset + 136].strip(b"\0 ") or b"0", 8)
        start = offset + BLOCK
        if start + size > len(data):
            raise ValueError(f"unexpected end of data at byte {len(data)}")
        if kind != 53:  # directories carry no sample
            name = data[offset : offset + 100].rstrip(b"\0").decode()
            if data[offset + 345]:  # ustar's name prefix, for names over 100 bytes
                name = data[offset + 345 : offset + 500].rstrip(b"\0").decode() + "/" + name
            yield name, view[start : start + size]
        offset = start + size + (-size % BLOCK)


def _webdataset_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file, read the way WebDataset reads any tar."""
    with open(path, "rb") as stream:
        for member in tar_file_iterator(stream):
            yield member["fname"], member["data"]
