"""Shared fixtures: real Fashion-MNIST, loaded once per session, and small inputs made from it."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
PER_CLASS = 30  # images per class in the small subset: 300 images, 10 classes


def _read_idx_gz(path: Path) -> np.ndarray:
    """An independent IDX reader, so the fixtures do not depend on the code under test."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an (uncompressed, or .gz by suffix) IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob = header + array.tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


@pytest.fixture(scope="session")
def fashion_raw() -> dict[str, np.ndarray]:
    """The real Fashion-MNIST arrays, read with the reader above: x (N, 28, 28) uint8, y (N,) uint8."""
    return {
        "x_train": _read_idx_gz(FASHION_DIR / "train-images-idx3-ubyte.gz"),
        "y_train": _read_idx_gz(FASHION_DIR / "train-labels-idx1-ubyte.gz"),
        "x_test": _read_idx_gz(FASHION_DIR / "t10k-images-idx3-ubyte.gz"),
        "y_test": _read_idx_gz(FASHION_DIR / "t10k-labels-idx1-ubyte.gz"),
    }


def _take(x: np.ndarray, y: np.ndarray, per_class: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([np.flatnonzero(y == c)[skip: skip + per_class] for c in range(10)])
    return x[idx].copy(), y[idx].astype(np.int64)


@pytest.fixture(scope="session")
def fashion_small(fashion_raw) -> tuple[np.ndarray, np.ndarray]:
    """PER_CLASS real training images of each of the 10 classes: x (300, 28, 28) uint8, y (300,) int64."""
    return _take(fashion_raw["x_train"], fashion_raw["y_train"], PER_CLASS)


@pytest.fixture(scope="session")
def fashion_small_test(fashion_raw) -> tuple[np.ndarray, np.ndarray]:
    """6 real test images of each class: x (60, 28, 28) uint8, y (60,) int64."""
    return _take(fashion_raw["x_test"], fashion_raw["y_test"], 6)


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="session")
def small_npz(inputs_dir, fashion_small) -> Path:
    """A 10-class .npz (x uint8 (300, 28, 28), y int64) of real Fashion-MNIST images."""
    path = inputs_dir / "fmnist-small.npz"
    np.savez(path, x=fashion_small[0], y=fashion_small[1])
    return path


def write_factory(path: Path, num_classes: int, arch: str = "resnet_slim_050") -> str:
    """A `file.py:build` model factory returning a zoo model with `num_classes` outputs; returns the spec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("from edgecompress.models import create\n\n\n"
                    f"def build():\n    return create({arch!r}, 1, {num_classes})\n")
    return f"{path}:build"


@pytest.fixture(scope="session")
def teacher_spec(inputs_dir) -> str:
    """A fast factory teacher for 10-class, 1-channel data (untrained: these tests never distil)."""
    return write_factory(inputs_dir / "teacher10" / "teacher.py", 10)


@pytest.fixture(scope="module")
def one_thread():
    """Small batches run faster on one thread, and far faster on a loaded machine (no spinning OpenMP peers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
