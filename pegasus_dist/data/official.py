"""The official archives: CIFAR-10 python (Krizhevsky, 2009) and STL-10 binary (Coates et al., 2011).
Each is checked against its published md5 unless turned off (a fixture or a modified copy). CIFAR-10's
pickled batches go through an unpickler that accepts only the NumPy arrays they hold."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pegasus_dist.data.images import SPLITS, SourceImages, canonical_class, open_tar, resize_all
from pegasus_dist.errors import DataError

CIFAR10 = {"url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
           "filename": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a",
           "page": "https://www.cs.toronto.edu/~kriz/cifar.html"}
STL10 = {"url": "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
         "filename": "stl10_binary.tar.gz", "md5": "91f7769df0f17e558f3565bffb0c7dfb",
         "page": "https://cs.stanford.edu/~acoates/stl10/"}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
STL_CHUNK = 1000  # images resized per step while streaming STL-10's 2.7 GB unlabeled file


def download_official(name: str, root: Path) -> Path:
    """Fetch an official archive through torchvision (md5 checked); needs the network."""
    from torchvision.datasets.utils import download_url  # here: see _archive

    meta = CIFAR10 if name == "cifar10" else STL10
    try:
        download_url(meta["url"], str(root), meta["filename"], meta["md5"])
    except Exception as err:  # urllib and torchvision raise many kinds
        raise DataError(f"could not download {meta['url']} ({err}); download {meta['filename']} "
                        f"from {meta['page']} by hand and pass {name}:PATH") from None
    return root / meta["filename"]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of bytes, lists and NumPy arrays), nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 (re-pickled copies)
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_cifar10(path: str | Path, image_size: int = 32, verify_checksum: bool = True) -> SourceImages:
    path = _archive(path, "cifar10", CIFAR10, verify_checksum)
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels, splits = [], [], []
    with open_tar(path) as tar:
        # One forward pass: seeking back in a gzip stream decompresses it again from the start.
        raw = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()
               for m in tar if m.isfile() and m.name.rsplit("/", 1)[-1] in members}
    for member in members:
        if member not in raw:
            raise DataError(f"{path} has no cifar-10-batches-py/{member}: not the CIFAR-10 python archive")
        where = f"{path}:{member}"
        batch = _unpickle(raw[member], where)
        if b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{where} has no data or labels: not a CIFAR-10 batch")
        data = _image_rows(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1), (3, 32, 32), where)
        images.append(data.transpose(0, 2, 3, 1))
        labels += _class_names(np.asarray(batch[b"labels"]), len(data), CIFAR_CLASSES, 0, where)
        splits += ["test" if member == "test_batch" else "train"] * len(data)
    return SourceImages("cifar10", resize_all(np.concatenate(images), image_size), labels,
                        splits, str(path.resolve()))


def _unpickle(raw: bytes, where: str) -> dict:
    """A batch dict with bytes keys, whether it was written by Python 2 (bytes) or 3 (str)."""
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError(f"a {type(batch).__name__}, not a dict")
        return {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{where}: refusing to load ({err}); "
                        "only the official CIFAR-10 batches are accepted") from None


def read_stl10(path: str | Path, image_size: int = 32, verify_checksum: bool = True) -> SourceImages:
    path = _archive(path, "stl10", STL10, verify_checksum)
    images, labels, splits = [], [], []
    # A .tar.gz cannot seek: read members in archive order, then order them by SPLITS.
    parts: dict[str, object] = {}
    with open_tar(path) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if name.endswith("_X.bin"):
                where = f"{path}:{member.name}"
                parts[name] = np.concatenate(list(_stl_images(tar.extractfile(member), image_size, where)))
            elif name.endswith("_y.bin") or name == "class_names.txt":
                parts[name] = tar.extractfile(member).read()
    needed = ["class_names.txt", *(f"{split}_{xy}.bin" for split in SPLITS for xy in "Xy"
                                   if (split, xy) != ("unlabeled", "y"))]
    if missing := [name for name in needed if name not in parts]:
        raise DataError(f"{path} has no stl10_binary/{missing[0]}: not the STL-10 binary archive")
    names = parts["class_names.txt"].decode(errors="replace").split()
    for split in SPLITS:
        x = parts[f"{split}_X.bin"]
        images.append(x)
        splits += [split] * len(x)
        labels += ([None] * len(x) if split == "unlabeled" else  # STL-10 labels run from 1 to 10
                   _class_names(np.frombuffer(parts[f"{split}_y.bin"], dtype=np.uint8), len(x), names, 1,
                                f"{path}:stl10_binary/{split}_y.bin"))
    return SourceImages("stl10", np.concatenate(images), labels, splits, str(path.resolve()))


def _stl_images(stream: io.BufferedReader, image_size: int, where: str) -> Iterator[np.ndarray]:
    """Chunks of images from an STL-10 ``*_X.bin``: column-major 3x96x96 uint8 each."""
    while chunk := stream.read(3 * 96 * 96 * STL_CHUNK):
        x = _image_rows(np.frombuffer(chunk, dtype=np.uint8), (3, 96, 96), where).transpose(0, 3, 2, 1)
        yield resize_all(np.ascontiguousarray(x), image_size)


def _image_rows(flat: np.ndarray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """``flat`` as whole uint8 images of ``shape`` (a view); a member cut short or padded is refused."""
    if not flat.size or flat.size % int(np.prod(shape)):
        raise DataError(f"{where}: {flat.size:,} bytes are not whole {'x'.join(map(str, shape))} images "
                        "(a truncated or altered archive); download it again")
    return flat.reshape(-1, *shape)


def _class_names(ids: np.ndarray, count: int, names: tuple[str, ...] | list[str], first: int,
                 where: str) -> list[str]:
    """The class of each of ``count`` images from ids numbered from ``first``, checked against both."""
    if ids.ndim != 1 or len(ids) != count:
        raise DataError(f"{where}: {ids.size:,} labels for {count:,} images; download the archive again")
    last = first + len(names) - 1
    if (outside := ids[(ids < first) | (ids > last)]).size:
        raise DataError(f"{where}: label {outside[0]} is outside {first}..{last} ({len(names)} classes); "
                        "download the archive again")
    return [canonical_class(names[int(i) - first]) for i in ids]


def _archive(path: str | Path, name: str, meta: dict, verify_checksum: bool) -> Path:
    # Imported here: torchvision's import brings torch._dynamo, 1.5 s of every rank's start-up on 2 cores.
    from torchvision.datasets.utils import calculate_md5

    path = Path(path)
    if not path.is_file():  # a folder too, say the extracted one: the archive is read in place
        found = f"not found: {path}" if not path.exists() else f"{path} is not a file (a folder?)"
        raise DataError(f"{name} archive {found}; pass the {meta['filename']} file itself, download "
                        f"it from {meta['page']} or use {name}:download")
    if verify_checksum and (digest := calculate_md5(path)) != meta["md5"]:
        raise DataError(f"{path}: md5 {digest} differs from the official {meta['md5']} of "
                        f"{meta['filename']}; pass --no-verify-checksums for a modified or fixture copy")
    return path
