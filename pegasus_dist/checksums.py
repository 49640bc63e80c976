"""sha256 digests of files, and a folder's ``SHA256SUMS`` as coreutils' ``sha256sum`` writes it,
so that ``sha256sum -c SHA256SUMS`` checks a checkpoint from a shell too."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUMS = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(folder: Path) -> None:
    """``folder/SHA256SUMS`` listing every other file of ``folder`` (written last: nothing after it)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS)
    (folder / SUMS).write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def sums_problem(folder: Path, names: list[str] | None = None, required: bool = False) -> str | None:
    """Why ``folder`` does not match its ``SHA256SUMS``, or None (also without one, unless ``required``).
    Only ``names`` if given; else every file, and a file the list does not name is a problem too."""
    try:
        text = (folder / SUMS).read_text(encoding="ascii")
    except FileNotFoundError:
        return f"{folder / SUMS} is missing (removed after the checkpoint was written)" if required else None
    except (OSError, UnicodeDecodeError) as err:
        return f"{folder / SUMS} is unreadable ({err})"
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or set(digest) - set("0123456789abcdef") or "/" in name:
            return f"{folder / SUMS} line {number} is not '<sha256>  <file name>'"
        sums[name] = digest
    if names is None:
        unlisted = {p.name for p in folder.iterdir() if p.is_file()} - {SUMS} - sums.keys()
        names = sorted(unlisted) + sorted(sums)
    for name in names:
        path = folder / name
        if name not in sums:
            return f"{path} is not listed in {folder / SUMS}"
        if not path.is_file():
            return f"{path} is listed in {folder / SUMS} but missing"
        if sha256_file(path) != sums[name]:
            return f"{path} does not match its sha256 in {folder / SUMS} (changed after it was written)"
    return None
