"""The Dataset every stage reads, and the sources small enough to hold in memory: the embedded Fashion-MNIST,
IDX files, an .npz file. Image folders and lists are streamed (folder.py) behind the same fields.

Images stay uint8 (N, C, H, W) until a batch is taken; `to_float` gives float pixels in [0, 1].
Normalisation is not applied here: it travels inside each model (models.Normalized).
"""
from __future__ import annotations

import gzip
import hashlib
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from .packed import take

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
EVAL_FRACTION = 1 / 6  # when a source has no test split of its own (Fashion-MNIST's own ratio)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    classes: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was left out
    content_key: str = ""  # for streamed sources: the hash of the file listing, labels and geometry


    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_eval.shape[1:])  # the same as the training images' (checked on loading)

    @cached_property
    def sha256_16(self) -> str:
        """Content hash of all images and labels (cached: stages ask for it several times a run); a streamed
        source's is its listing's (folder.fingerprint), which changes with any file or label."""
        if self.content_key:
            return self.content_key
        digest = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_eval, self.y_eval):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "input_shape": list(self.input_shape),
                "train": len(self.y_train), "eval": len(self.y_eval), "sha256_16": self.sha256_16,
                "skipped_images": len(self.skipped)}


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


BATCH_BYTES = 64 << 20  # float pixels per inference batch: 500 Fashion-MNIST images, 111 RGB images at 224 px


def inference_batch(images, wanted: int) -> int:
    """`wanted`, lowered so that one batch of float pixels stays under BATCH_BYTES: an eval batch sized for 28-px
    images would take 300 MB of input (and an ONNX Runtime arena to match) at 224 px."""
    per_image = 4 * int(np.prod(images.shape[1:]))
    return max(1, min(wanted, BATCH_BYTES // per_image))


def stratified_sample(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices drawn evenly from every class (as far as each class allows), fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    per_class = max(1, count // len(classes))
    picked = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    picked = torch.cat(picked)
    return picked[torch.randperm(len(picked), generator=gen)].sort().values


def _check(ds: Dataset) -> Dataset:
    if len(ds.y_train) == 0 or len(ds.y_eval) == 0:
        raise BadInput(f"data {ds.name} has no images in its train or eval split")
    present = len(ds.y_train.unique())
    if present < 2:
        raise BadInput(f"data {ds.name} has 1 class in its training split; classification needs at least 2")
    if ds.x_eval.shape[1:] != ds.x_train.shape[1:]:
        raise BadInput(f"data {ds.name}: eval images have shape {tuple(ds.x_eval.shape[1:])} but training images "
                       f"{tuple(ds.x_train.shape[1:])}")
    return ds


def _labels(y: np.ndarray, count: int, source: str, what: str) -> torch.Tensor:
    y = np.asarray(y).reshape(-1)
    if len(y) != count:
        raise BadInput(f"{source}: {count} images but {len(y)} labels in {what}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise BadInput(f"{source}: labels in {what} must be integers >= 0 (class indices)")
    return torch.from_numpy(y.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise BadInput(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise BadInput(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise BadInput(f"{path} is truncated inside its header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BadInput(f"{path} is truncated: header promises {dims}, file holds {data.size} values")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise BadInput(f"missing {stem}[.gz] in {folder}")


def _load_idx_dir(folder: Path, name: str, classes: list[str] | None) -> Dataset:
    parts = {}
    for split, prefix in (("train", "train"), ("eval", "t10k")):
        x = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise BadInput(f"{folder}: {prefix} has {len(x)} images but {len(y)} labels")
        parts[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    classes = classes or [str(i) for i in range(_class_count((None, parts["train"][1], None, parts["eval"][1]),
                                                              str(folder)))]
    return _check(Dataset(name, *parts["train"], *parts["eval"], classes))


def split(x, y: torch.Tensor, seed: int) -> tuple:
    """A stratified sixth of the images held out for eval, fixed by `seed` (packed images stay packed)."""
    eval_idx = stratified_sample(y, int(len(y) * EVAL_FRACTION), seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[eval_idx] = False
    return take(x, mask.numpy()), y[mask], take(x, eval_idx.numpy()), y[eval_idx]


def _to_nchw(x: np.ndarray, source: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise BadInput(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype from its .npy header, checked against the bytes the archive holds for it,
    before any array is read: an object array (pickled code) or a header claiming more data than the file has
    (a 10^13-element shape in a small file) is refused here, not met as a MemoryError."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                name = info.filename.removesuffix(".npy")
                if dtype.hasobject:
                    raise BadInput(f"{path}: array {name} holds Python objects; save plain numeric arrays")
                if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                    raise BadInput(f"{path}: array {name} claims shape {shape} ({dtype}), more than the "
                                   f"{info.file_size} bytes the file holds for it")
                headers[name] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BadInput(f"cannot read {path}: {str(exc)[:160]}") from None
    return headers


def _load_npz(path: Path, seed: int) -> Dataset:
    keys = set(_npz_headers(path))
    if not {"x", "y"} <= keys:
        raise BadInput(f"{path} must hold arrays `x` and `y` (found: {', '.join(sorted(keys)) or 'none'})")
    try:
        arrays = np.load(path, allow_pickle=False)
        x = _to_nchw(arrays["x"], str(path))
        y = _labels(arrays["y"], len(x), str(path), "y")
        if {"x_test", "y_test"} <= keys:
            x_test = _to_nchw(arrays["x_test"], str(path))
            parts = (x, y, x_test, _labels(arrays["y_test"], len(x_test), str(path), "y_test"))
        else:
            parts = split(x, y, seed)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a bad CRC surfaces on reading
        raise BadInput(f"cannot read {path}: {str(exc)[:160]}") from None
    return _check(Dataset(path.stem, *parts, [str(i) for i in range(_class_count(parts, str(path)))]))


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841: a larger label is a broken file, not a data set


def _class_count(parts, source: str) -> int:
    largest = int(max(parts[1].max(), parts[3].max()))
    if largest >= MAX_CLASSES:
        raise BadInput(f"{source}: label {largest} means more than {MAX_CLASSES} classes; labels are class indices "
                       "0..C-1")
    return largest + 1


def channel_stats(x, sample: int = 20000, chunk: int = 500) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1] over the first `sample` images, the normalisation a model
    trained on `x` carries; summed in float64 chunk by chunk, so memory stays that of one chunk."""
    count = min(len(x), sample)
    total = squares = 0
    for i in range(0, count, chunk):
        block = to_float(x[i:min(i + chunk, count)]).double()
        total = total + block.sum(dim=(0, 2, 3))
        squares = squares + (block * block).sum(dim=(0, 2, 3))
    n = count * x.shape[2] * x.shape[3]
    mean = total / n
    std = ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()
    return [float(v) for v in mean], [float(v) for v in std]
