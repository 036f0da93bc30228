"""The teacher's features of every training image, computed once, for feature, relation and contrastive methods.

Without augmentation an image's teacher features never change, so running the teacher every step (what makes
these methods 1.6 to 3 times slower than Hinton KD, whose logits are cached: benchmarks/results/kd_methods-full.md)
repeats the same forward once per epoch. The cache is one teacher pass, its logits and hooked features kept in
the dtype the teacher computed them in (bf16 under autocast: what the online teacher hands over too), saved in
the distill directory and read back through mmap. It is used only when it takes at most distill.feature_cache_gb.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import data as datasets
from ..errors import StageFailed
from ..runner import RunContext, digest
from . import trainer
from .methods.base import Features, FeatureTap
from .trainer import Distributed

FILE = "teacher_features.pt"


@dataclass
class CachedFeatures:
    logits: torch.Tensor                 # (N, classes), float32
    maps: list[torch.Tensor]             # (N, C, H, W) per hooked layer
    embedding: torch.Tensor | None       # (N, D) or None

    def take(self, idx: torch.Tensor, device: torch.device) -> Features:
        """The features of images `idx`, as the teacher's hooks would have shown them for that batch."""
        maps = [m[idx].to(device, non_blocking=True) for m in self.maps]
        embedding = self.embedding[idx].to(device, non_blocking=True) if self.embedding is not None else None
        return Features(maps, embedding)


def forward(model: nn.Module, tap: FeatureTap, x: torch.Tensor, device: torch.device,
            autocast: torch.dtype | None) -> tuple[torch.Tensor, Features]:
    x = datasets.to_float(x).to(device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(x).float()
    return logits, tap.take()


def bytes_per_image(model: nn.Module, tap: FeatureTap, x_one: torch.Tensor, device: torch.device,
                    autocast: torch.dtype | None) -> int:
    _, feats = forward(model, tap, x_one, device, autocast)
    shown = [*feats.maps, *([feats.embedding] if feats.embedding is not None else [])]
    return sum(t[0].numel() * t.element_size() for t in shown)


@torch.inference_mode()
def build(ctx: RunContext, model: nn.Module, tap: FeatureTap, device: torch.device, autocast: torch.dtype | None,
          dist: Distributed, limit_gb: float) -> CachedFeatures | None:
    """The cache for `tap`'s layers, loaded or computed; None when it would exceed `limit_gb`."""
    x_all = ctx.data.x_train
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    total = bytes_per_image(model, tap, x_all[:1], device, autocast) * len(x_all)
    if total > limit_gb * 1e9:
        ctx.log(f"[distill] the teacher's features would take {total / 1e9:.1f} GB, more than "
                f"distill.feature_cache_gb = {limit_gb}: the teacher runs every step")
        return None
    path = ctx.stage_dir("distill") / FILE
    key = digest({"seed": ctx.config.seed, "data": ctx.data.sha256_16, **ctx.teacher_inputs, "layers": tap.layers,
                  "embedding": tap.embedding_path, "autocast": str(autocast)})

    saved = trainer.computed_once(path, key, lambda: compute(ctx, model, tap, device, autocast), dist)
    return CachedFeatures(saved["logits"], saved["maps"], saved["embedding"])


def compute(ctx: RunContext, model: nn.Module, tap: FeatureTap, device: torch.device,
            autocast: torch.dtype | None) -> dict:
    """One teacher pass over the training images: {"logits", "maps", "embedding"}, all images in order."""
    x_all = ctx.data.x_train
    batch = datasets.inference_batch(x_all, 500)
    logits, maps, embedding = None, [], None
    with ctx.progress(range(0, len(x_all), batch), "teacher features") as bar:
        for i in bar:
            out, feats = forward(model, tap, x_all[i:i + batch], device, autocast)
            if logits is None:  # sized from the first batch
                logits = torch.empty(len(x_all), out.shape[1])
                maps = [torch.empty(len(x_all), *m.shape[1:], dtype=m.dtype) for m in feats.maps]
                if feats.embedding is not None:
                    embedding = torch.empty(len(x_all), *feats.embedding.shape[1:], dtype=feats.embedding.dtype)
            rows = slice(i, i + len(out))
            logits[rows] = out.cpu()
            for kept, m in zip(maps, feats.maps):
                kept[rows] = m.cpu()
            if embedding is not None:
                embedding[rows] = feats.embedding.cpu()
    if not torch.isfinite(logits).all():
        raise StageFailed("the teacher gives NaN or Inf logits on the training data: check its weights")
    return {"logits": logits, "maps": maps, "embedding": embedding}
