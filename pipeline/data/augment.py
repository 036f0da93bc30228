"""Training augmentation on batches of images already at the model's size: random-resized-crop + horizontal flip.

Each image's crop of each epoch is drawn up front from a generator seeded by (seed, epoch), so an epoch's views
are the same in a resumed run, on every rank, and when its teacher soft labels are replayed from the FKD cache
(softlabels.py). The crop box follows torchvision's RandomResizedCrop (area fraction in `scale`, aspect ratio
log-uniform in [3/4, 4/3], ten tries, then the whole image); the crop is resized to the input size (bilinear)
and flipped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("none", "flip", "crop-flip")
RATIO = (3 / 4, 4 / 3)


def crop_params(count: int, height: int, width: int, mode: str, scale: tuple[float, float], seed: int,
                epoch: int) -> torch.Tensor:
    """(count, 5) float32: the crop box (top, left, height, width in pixels of the stored image) and a flip flag
    for each image of the epoch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    params = torch.zeros(count, 5)
    params[:, 2], params[:, 3] = height, width
    if mode == "crop-flip":
        area = height * width
        tries = 10
        target = area * torch.empty(count, tries).uniform_(scale[0], scale[1], generator=gen)
        log_ratio = torch.empty(count, tries).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(target * ratio).round()
        h = torch.sqrt(target / ratio).round()
        fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((count,), -1))
        rows = torch.arange(count)
        found = first >= 0
        pick = first.clamp_min(0)
        ch = torch.where(found, h[rows, pick], torch.full((count,), float(height)))
        cw = torch.where(found, w[rows, pick], torch.full((count,), float(width)))
        u = torch.rand(count, 2, generator=gen)
        params[:, 0] = torch.floor(u[:, 0] * (height - ch + 1))
        params[:, 1] = torch.floor(u[:, 1] * (width - cw + 1))
        params[:, 2], params[:, 3] = ch, cw
    if mode in ("flip", "crop-flip"):
        params[:, 4] = (torch.rand(count, generator=gen) < 0.5).float()
    return params


def apply(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The views of float images `x` (B, C, H, W) for their rows of `crop_params`, at the same size: each crop
    resized by bilinear interpolation (align_corners=False, as torchvision's RandomResizedCrop on tensors), then
    flipped. One interpolation per image: 2.5x faster here than one batched grid_sample at 224 px."""
    batch, _, height, width = x.shape
    out = torch.empty_like(x)
    for i, (top, left, h, w, flip) in enumerate(params.tolist()):
        view = x[i:i + 1]
        if (h, w) != (height, width):
            view = F.interpolate(view[:, :, int(top):int(top) + int(h), int(left):int(left) + int(w)],
                                 size=(height, width), mode="bilinear", align_corners=False)
        out[i] = view[0].flip(2) if flip else view[0]
    return out
