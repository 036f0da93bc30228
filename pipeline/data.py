"""Datasets held in memory as tensors: the embedded Fashion-MNIST, IDX files, an image folder, an .npz file.

Images stay uint8 (N, C, H, W) until a batch is taken; `batch()` gives float pixels in [0, 1].
Normalisation is not applied here: it travels inside each model (models.Normalized).
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
EVAL_FRACTION = 1 / 6  # when a source has no test split of its own (Fashion-MNIST's own ratio)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_eval.shape[1:])  # the same as the training images' (checked on loading)

    @cached_property
    def sha256_16(self) -> str:
        """Content hash of all images and labels (cached: stages ask for it several times a run)."""
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


def load(spec: str, seed: int = 0, skip_bad_images: bool = False) -> Dataset:
    """Load a data spec: `fashion-mnist`, a folder of IDX files, an image folder, or an .npz with x/y.

    An unreadable file in an image folder is an error unless `skip_bad_images`, which leaves it out and
    lists it in `Dataset.skipped`.
    """
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise BadInput(f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install it with "
                           "`apt-get install dataset-fashion-mnist`, or pass --data PATH")
        return _load_idx_dir(FASHION_MNIST_DIR, "fashion-mnist", FASHION_MNIST_CLASSES)
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"data not found: {spec} (give `fashion-mnist`, an image folder, an .npz file or an IDX folder)")
    if path.is_file():
        if path.suffix != ".npz":
            raise BadInput(f"unsupported data file {spec}: expected an .npz with `x` and `y` arrays, or a folder")
        return _load_npz(path, seed)
    if any(path.glob("*-images-idx3-ubyte*")):
        return _load_idx_dir(path, path.name, None)
    return _load_image_folder(path, seed, skip_bad_images)


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
    num_classes = int(max(parts["train"][1].max(), parts["eval"][1].max())) + 1
    classes = classes or [str(i) for i in range(num_classes)]
    return _check(Dataset(name, *parts["train"], *parts["eval"], classes))


def _split(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    eval_idx = stratified_sample(y, int(len(y) * EVAL_FRACTION), seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[eval_idx] = False
    return x[mask], y[mask], x[eval_idx], y[eval_idx]


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


def _load_npz(path: Path, seed: int) -> Dataset:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    if not {"x", "y"} <= keys:
        raise BadInput(f"{path} must hold arrays `x` and `y` (found: {', '.join(sorted(keys)) or 'none'})")
    x = _to_nchw(arrays["x"], str(path))
    y = _labels(arrays["y"], len(x), str(path), "y")
    if {"x_test", "y_test"} <= keys:
        x_test = _to_nchw(arrays["x_test"], str(path))
        parts = (x, y, x_test, _labels(arrays["y_test"], len(x_test), str(path), "y_test"))
    else:
        parts = _split(x, y, seed)
    num_classes = int(max(parts[1].max(), parts[3].max())) + 1
    return _check(Dataset(path.stem, *parts, [str(i) for i in range(num_classes)]))


def _read_image(path: Path, size: tuple[int, int] | None, mode: str | None) -> np.ndarray:
    """One image as (H, W, C) uint8, converted to `mode` and resized to `size` (None: as stored)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = mode or ("L" if im.mode in ("1", "L", "I", "I;16", "LA") else "RGB")
            im = im.convert(mode)
            if size and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            pixels = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BadInput(f"cannot read image {path}: {exc} (--skip-bad-images leaves such files out)") from None
    return pixels.reshape(*pixels.shape[:2], -1)


def _read_images(files: list[Path], labels: list[int], size, mode, skip_bad: bool, skipped: list[str]):
    images, kept = [], []
    for path, label in zip(files, labels):
        try:
            images.append(_read_image(path, size, mode))
            kept.append(label)
        except BadInput:
            if not skip_bad:
                raise
            skipped.append(str(path))
    return images, kept


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[sub.name] = files
    return classes


def _load_image_folder(folder: Path, seed: int, skip_bad: bool) -> Dataset:
    """One sub-folder per class; or `train/` and `test/` (or `val/`) folders each laid out that way."""
    eval_dir = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    train_dir = folder / "train" if eval_dir is not None and (folder / "train").is_dir() else folder
    train = _scan_classes(train_dir)
    if not train:
        raise BadInput(f"no images in {folder}: expected one sub-folder per class holding "
                       f"{'/'.join(sorted(IMAGE_SUFFIXES))} files")
    classes = sorted(train)
    skipped: list[str] = []
    # size and colour mode of the first readable image set those of the whole data set
    first_files = [f for files in train.values() for f in files][:50]
    probe, _ = _read_images(first_files, [0] * len(first_files), None, None, skip_bad, [])
    if not probe:
        raise BadInput(f"no readable image among the first files of {train_dir}")
    height, width, channels = probe[0].shape
    size, mode = (width, height), ("L" if channels == 1 else "RGB")

    def gather(by_class: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise BadInput(f"eval folder has classes the train folder lacks: {', '.join(unknown)}")
        files = [f for c in classes for f in by_class.get(c, [])]
        labels = [i for i, c in enumerate(classes) for _ in by_class.get(c, [])]
        images, kept = _read_images(files, labels, size, mode, skip_bad, skipped)
        if not images:
            return torch.empty(0, channels, height, width, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(kept, dtype=torch.int64)

    x, y = gather(train)
    parts = (x, y, *gather(_scan_classes(eval_dir))) if eval_dir is not None else _split(x, y, seed)
    return _check(Dataset(folder.name, *parts, classes, skipped))


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1], the normalisation a model trained on `x` carries."""
    sample = to_float(x[: min(len(x), 20000)])
    return sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).tolist()
