"""Images decoded once into one file at the model's input size, read back by position (FFCV's idea, plainly).

A `PackedImages` behaves like the uint8 (N, C, H, W) tensors the in-memory sources hold, for what the stages
do with them: `len`, `.shape`, and indexing with an int, a slice or an index tensor, which returns a tensor
read from the file with pread. Reads go through the page cache, not a memory map, so the process's resident
memory does not grow with the number of images however many epochs read them. `subset` gives a view (a
train/eval split) without reading anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class PackedImages:
    dtype = torch.uint8

    def __init__(self, path: Path, count: int, image_shape: tuple[int, int, int], rows: np.ndarray | None = None):
        self.path, self.count, self.image_shape = Path(path), count, tuple(image_shape)
        self.rows = np.arange(count, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.image_bytes = int(np.prod(self.image_shape))
        expected = count * self.image_bytes
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, expected {expected}")
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self):  # DataLoader workers reopen the file in their own process
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None, _pid=-1)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.image_shape)

    def subset(self, positions) -> "PackedImages":
        """A view of the images at `positions` (ints or a bool mask), reading nothing."""
        view = PackedImages.__new__(PackedImages)
        view.__dict__.update(self.__getstate__(), rows=self.rows[np.asarray(positions)], _fd=None, _pid=-1)
        return view

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self[[int(key)]][0]
        positions = np.arange(len(self.rows))[key] if isinstance(key, slice) else np.asarray(
            key.cpu() if isinstance(key, torch.Tensor) else key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        index_shape = positions.shape  # () for a 0-d index tensor: one image, as a tensor gives
        rows = self.rows[positions.astype(np.int64).reshape(-1)]
        out = np.empty((len(rows), self.image_bytes), dtype=np.uint8)
        fd, size = self._file(), self.image_bytes
        order = np.argsort(rows, kind="stable")  # ascending offsets: the disk and the page cache read ahead
        start = 0
        while start < len(order):  # one pread per run of consecutive rows
            end = start + 1
            while end < len(order) and rows[order[end]] == rows[order[end - 1]] + 1 and \
                    order[end] == order[end - 1] + 1:
                end += 1
            first = int(rows[order[start]])
            block = out[order[start]:order[start] + (end - start)]
            got = os.preadv(fd, [memoryview(block).cast("B")], first * size)
            if got != block.nbytes:
                raise OSError(f"{self.path}: short read at image {first}")
            start = end
        return torch.from_numpy(out.reshape(*index_shape, *self.image_shape))


def take(images, positions):
    """The images at `positions` without copying pixels where they are packed (a view), else as a tensor."""
    return images.subset(positions) if isinstance(images, PackedImages) else images[positions]
