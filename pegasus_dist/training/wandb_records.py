"""Reading the records of an offline W&B run: its ``run-<id>.wandb`` file.

wandb 0.31 writes every record of a run (config, history rows, summary, ...)
as a protobuf ``Record`` into a transaction log in LevelDB's log format, and
``wandb sync`` replays that file. The Python reader that older wandb versions
shipped (``wandb.sdk.internal.datastore``) is gone from 0.31, so this module
reads the format itself: a 7-byte file header (``:W&B``, magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of
the type byte and the data, length, type: full, first, middle or last) and
its data; a block's last bytes, if fewer than a header, are zero padding.

The trainer needs it once: on resume, to find the last history step that the
earlier (possibly killed) offline runs of the same W&B run really wrote.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class UnreadableRecords(ValueError):
    """A file that is not a W&B transaction log, or is corrupt before its end."""


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every complete record of ``path``, in order.

    A chunk cut off by the end of the file is the tail of a killed writer:
    reading stops there, and what came before it is kept.
    """
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != (
            FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise UnreadableRecords(f"{path} does not start like a wandb 0.31 transaction log")
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:
            pos += BLOCK - pos % BLOCK  # the padding at the end of a block
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        if len(chunk) < length:
            return  # the torn tail of a killed run
        if kind == 0 and length == 0:
            return  # zeros a writer reserved but never filled
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc or kind not in (FULL, FIRST,
                                                                                MIDDLE, LAST):
            raise UnreadableRecords(f"{path} is corrupt at byte {pos} (bad chunk checksum)")
        pos += CHUNK_HEADER.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError as err:
                raise UnreadableRecords(f"{path} holds an undecodable record ({err})") from err
            yield record


def history_steps(path: Path) -> list[int]:
    """The steps of the history rows in ``path``, in the order they were written."""
    return [r.history.step.num for r in read_records(path) if r.WhichOneof("record_type") == "history"]
