"""Data: the sources (embedded Fashion-MNIST, IDX, .npz in memory; image folders and CSV/TSV lists streamed
from a packed file), the preprocessing contract, and `load`, which gives every stage the same Dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import BadInput
from ..progress import NoBar
from . import folder
from .folder import IMAGE_SUFFIXES, default_workers
from .packed import PackedImages, take
from .preprocess import CHANNELS, Geometry, Preprocess, crop_box, output_size, parse_size, scaled_resize
from .sources import (EVAL_FRACTION, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, Dataset, _check, _load_idx_dir,
                      _load_npz, channel_stats, inference_batch, split, stratified_sample, to_float)

__all__ = ["Dataset", "Geometry", "IMAGE_SUFFIXES", "PackedImages", "Preprocess", "EVAL_FRACTION",
           "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "channel_stats", "inference_batch", "load", "split",
           "stratified_sample", "take", "to_float", "default_workers", "convert", "parse_size",
           "scaled_resize"]

IN_MEMORY_BYTES = 1 << 30  # an in-memory source converted to more than this is refused: write an image folder


def load(spec: str, seed: int = 0, skip_bad_images: bool = False, geometry: Geometry | None = None,
         cache_dir: Path | None = None, workers: int = 0, progress: Callable = NoBar) -> Dataset:
    """Load a data spec: `fashion-mnist`, a folder of IDX files, an .npz with x/y, an image folder, or a
    CSV/TSV list of `path,label` lines, with its images prepared by `geometry` (None: as stored).

    Streamed sources are packed into `cache_dir` (a temporary folder when None, removed with the Dataset).
    An unreadable file is an error unless `skip_bad_images`, which leaves it out and records it in
    `Dataset.skipped`."""
    geometry = geometry or Geometry()
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise BadInput(f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install it with "
                           "`apt-get install dataset-fashion-mnist`, or pass --data PATH")
        return _conform(_load_idx_dir(FASHION_MNIST_DIR, "fashion-mnist", FASHION_MNIST_CLASSES), geometry)
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"data not found: {spec} (give `fashion-mnist`, an image folder, a .csv/.tsv image list, "
                       "an .npz file or an IDX folder)")
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv"):
            return _streamed(path, folder.index_list(path), seed, skip_bad_images, geometry, cache_dir, workers,
                             progress)
        if path.suffix != ".npz":
            raise BadInput(f"unsupported data file {spec}: expected an .npz with `x` and `y` arrays, a .csv/.tsv "
                           "image list, or a folder")
        return _conform(_load_npz(path, seed), geometry)
    if not path.is_dir():
        raise BadInput(f"unsupported data {spec}: neither a regular file nor a folder")
    if any(path.glob("*-images-idx3-ubyte*")):
        return _conform(_load_idx_dir(path, path.name, None), geometry)
    return _streamed(path, folder.index_folder(path), seed, skip_bad_images, geometry, cache_dir, workers, progress)


def _streamed(path: Path, indexed, seed, skip_bad, geometry, cache_dir, workers, progress) -> Dataset:
    entries, classes, has_eval = indexed
    keepalive = None
    if cache_dir is None:
        import tempfile

        keepalive = tempfile.TemporaryDirectory(prefix="edgecompress-data-")
        cache_dir = Path(keepalive.name)
    listing = folder.fingerprint(entries)
    images, kept, bad, settled = folder.pack(entries, geometry, cache_dir, skip_bad, workers or default_workers(),
                                             progress, listing)
    images.keepalive = keepalive  # the temporary folder lives as long as the images read from it
    labels = torch.tensor([e.label for e in kept], dtype=torch.int64)
    if has_eval:
        is_eval = torch.tensor([e.split == "eval" for e in kept], dtype=torch.bool)
        parts = (images.subset(~is_eval.numpy()), labels[~is_eval], images.subset(is_eval.numpy()), labels[is_eval])
    else:
        parts = split(images, labels, seed)
    key = listing + "-" + "-".join(map(str, (*settled.size, settled.channels)))
    name = path.stem if path.is_file() else path.name
    return _check(Dataset(name, *parts, classes, bad, content_key=key))


def _conform(ds: Dataset, geometry: Geometry) -> Dataset:
    """An in-memory source brought to the contract's size and channels (torch's resize; an image folder
    goes through PIL instead, like the user's own training script most likely did)."""
    channels = ds.input_shape[0]
    want_channels = CHANNELS.get(geometry.channels or "", channels)
    height, width = ds.input_shape[1:]
    if (geometry.size in (None, (height, width)) and not geometry.resize) and want_channels == channels:
        return ds
    settled = Geometry(geometry.size or (height, width), geometry.resize, geometry.interpolation,
                       "rgb" if want_channels == 3 else "grey")
    if int(np.prod(settled.image_shape)) * (len(ds.y_train) + len(ds.y_eval)) > IN_MEMORY_BYTES:
        raise BadInput(f"data {ds.name} at {'x'.join(map(str, settled.image_shape))} would take more than "
                       f"{IN_MEMORY_BYTES >> 30} GiB in memory: write it as an image folder, which is streamed")
    return _check(Dataset(ds.name, convert(ds.x_train, settled), ds.y_train, convert(ds.x_eval, settled), ds.y_eval,
                          ds.classes, ds.skipped))


def convert(x: torch.Tensor, geometry: Geometry, chunk: int = 2000) -> torch.Tensor:
    """uint8 images resized and cropped by the contract's arithmetic (preprocess.output_size, crop_box)."""
    import torch.nn.functional as F

    channels, mode, out = CHANNELS[geometry.channels], geometry.interpolation, []
    for i in range(0, len(x), chunk):
        block = to_float(x[i:i + chunk]) * 255.0
        if block.shape[1] == 1 and channels == 3:
            block = block.expand(-1, 3, -1, -1)
        elif block.shape[1] == 3 and channels == 1:
            block = (block * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        h, w = block.shape[2:]
        new_w, new_h = output_size(w, h, geometry)
        if (new_h, new_w) != (h, w):
            block = F.interpolate(block, size=(new_h, new_w), mode=mode, antialias=mode != "nearest",
                                  **({} if mode == "nearest" else {"align_corners": False}))
        if geometry.resize:
            left, top, right, bottom = crop_box(new_w, new_h, geometry.size)
            block = block[:, :, top:bottom, left:right]
        out.append(block.round().clamp(0, 255).to(torch.uint8).contiguous())
    return torch.cat(out)
