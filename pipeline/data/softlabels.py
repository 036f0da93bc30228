"""The FKD soft-label cache: each epoch's augmented views and the teacher's answers on them, stored once.

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022): with augmented
inputs the teacher's logits change every epoch, so plain KD runs the teacher on every batch. FKD stores, per
image and epoch, the crop parameters and the teacher's top-k soft labels, and replays them, so later epochs of
another run (another student, another method, a rerun after --force) need no teacher forward.

Stored per epoch in memory-mapped .npy files, for T teachers: the crop parameters (N, 5) float32, the top-k logits
(T, N, k) float32 exactly as the teacher gave them, with their class indices, the log-sum-exp of all logits and
the probability left outside the top k, 1 - sum_topk p (T, N) float32. Replayed logits are the stored ones for
the top k and give the other C - k classes the logit that spreads the remaining probability evenly over them
(FKD's marginal smoothing): z_other = lse + log((1 - sum_topk p) / (C - k)). With k = C (the default up to 16
classes) the replay is bit-exact: a student trained on replayed epochs is the one trained with the teacher online.
An epoch is written into a temporary folder
and renamed into place when every image is in, so a killed run leaves no half epoch behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

DEFAULT_TOPK = 16


class SoftLabelCache:
    def __init__(self, folder: Path, key: str, count: int, num_classes: int, teachers: int, topk: int = DEFAULT_TOPK):
        self.folder, self.key, self.count, self.num_classes = folder, key, count, num_classes
        self.teachers, self.k = teachers, min(topk, num_classes)
        self.index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32

    def _dir(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch + 1}"

    def ready(self, epoch: int) -> bool:
        meta = self._dir(epoch) / "meta.json"
        try:
            return json.loads(meta.read_text()).get("key") == self.key
        except (OSError, ValueError):
            return False

    def open(self, epoch: int) -> "EpochLabels":
        return EpochLabels(self, self._dir(epoch), write=False)

    def create(self, epoch: int) -> "EpochLabels":
        tmp = self.folder / f".epoch-{epoch + 1}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a run killed mid-epoch left this
        tmp.mkdir(parents=True)
        return EpochLabels(self, tmp, write=True)


class EpochLabels:
    """One epoch's crop parameters and soft labels, memory-mapped."""

    def __init__(self, cache: SoftLabelCache, folder: Path, write: bool):
        self.cache, self.folder = cache, folder
        t, n, k = cache.teachers, cache.count, cache.k
        mode = "w+" if write else "r"
        shapes = {"params": ((n, 5), np.float32), "topk_logits": ((t, n, k), np.float32),
                  "topk_index": ((t, n, k), cache.index_dtype), "lse": ((t, n), np.float32),
                  "rest": ((t, n), np.float32), "filled": ((n,), np.bool_)}
        self.arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode=mode, dtype=dtype, shape=shape)
                       if write else np.load(folder / f"{name}.npy", mmap_mode="r")
                       for name, (shape, dtype) in shapes.items()}

    @property
    def params(self) -> np.ndarray:
        return self.arrays["params"]

    def record(self, idx: torch.Tensor, params: torch.Tensor, logits: torch.Tensor) -> None:
        """Store the views' parameters and the teachers' logits (T, B, C) for training images `idx`."""
        rows = idx.cpu().numpy()
        logits = logits.detach().float().cpu()
        values, classes = logits.topk(self.cache.k, dim=-1)
        lse = torch.logsumexp(logits.double(), dim=-1)
        self.arrays["params"][rows] = params.cpu().numpy()
        self.arrays["topk_logits"][:, rows] = values.numpy()
        self.arrays["topk_index"][:, rows] = classes.numpy().astype(self.cache.index_dtype)
        self.arrays["lse"][:, rows] = lse.numpy()
        self.arrays["rest"][:, rows] = (1 - (values.double() - lse[..., None]).exp().sum(-1)).clamp_min(0).numpy()
        self.arrays["filled"][rows] = True

    def missing(self) -> torch.Tensor:
        """Training images not recorded yet (those an epoch's last partial batch left out): the epoch is complete,
        for any batch size a later run uses, only once they are in too."""
        return torch.from_numpy(np.flatnonzero(~np.asarray(self.arrays["filled"])))

    def finish(self) -> None:
        if len(self.missing()):
            raise ValueError(f"{len(self.missing())} images have no soft labels in {self.folder}")
        for array in self.arrays.values():
            array.flush()
        (self.folder / "meta.json").write_text(json.dumps({"key": self.cache.key, "k": self.cache.k,
                                                           "classes": self.cache.num_classes}))
        final = self.folder.parent / self.folder.name.lstrip(".").removesuffix(".tmp")
        shutil.rmtree(final, ignore_errors=True)
        self.folder.rename(final)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The teachers' logits (T, B, C) for training images `idx`, rebuilt from the top k."""
        rows = idx.cpu().numpy()
        values = torch.from_numpy(np.asarray(self.arrays["topk_logits"][:, rows]))
        classes = torch.from_numpy(np.asarray(self.arrays["topk_index"][:, rows], dtype=np.int64))
        lse = torch.from_numpy(np.asarray(self.arrays["lse"][:, rows]))
        c, k = self.cache.num_classes, self.cache.k
        rest = torch.from_numpy(np.asarray(self.arrays["rest"][:, rows])).clamp_min(1e-12)
        fill = lse + (torch.log(rest / (c - k)) if k < c else 0)
        out = fill[..., None].expand(*lse.shape, c).clone()
        out.scatter_(-1, classes, values)
        return out
