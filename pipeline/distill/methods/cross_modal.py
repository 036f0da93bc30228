"""Cross-modal distillation: teacher and student see different views of a sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, ce, kd_loss, register


def downsample_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """A low-resolution sensor: area-downsampled to size x size, then shown at the original size (nearest), so
    the student's input shape and its exported artifact stay the same."""
    h, w = x.shape[-2:]
    return F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=(h, w), mode="nearest")


def noise_view(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A noisy sensor: additive Gaussian noise of std sigma (pixels in [0, 1]), clipped to [0, 1]."""
    return (x + sigma * torch.randn_like(x)).clamp_(0, 1)


VIEWS = ("downsample", "noise")


@register
class CrossModal(Distiller):
    """Cross-modal distillation: the teacher sees one view of a sample, the student another (Gupta, Hoffman,
    Malik, "Cross Modal Distillation for Supervision Transfer", CVPR 2016, arXiv:1507.00448, transfer
    supervision between paired modalities; here at the logit level).

    L = (1 - alpha) * CE(z_s(v_s(x)), y) + alpha * T^2 * KL(softmax(z_t(v_t(x)) / T) || softmax(z_s(v_s(x)) / T)).
    Built-in student views: `downsample` (a size x size sensor, default 14) and `noise` (Gaussian, sigma 0.3);
    the teacher sees the full image, so its logits stay cached. `view=path/to/file.py:function` runs the user's
    pair transform f(x) -> (x_student, x_teacher) on each batch of [0, 1] pixels; the teacher then runs every
    step on its view.
    """

    name, family, paper = "cross-modal", "cross-modal", "arXiv:1507.00448"
    defaults = {"view": "downsample", "size": 14, "sigma": 0.3, "temperature": 4.0, "alpha": 0.9}
    kd_config = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        self.pair_transform = self._builtin if hp["view"] in VIEWS else None  # set by the trainer for user files

    def _builtin(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = downsample_view(x, self.hp["size"]) if self.hp["view"] == "downsample" else noise_view(x, self.hp["sigma"])
        return view, x

    @property
    def teacher_view_is_input(self) -> bool:
        return self.hp["view"] in VIEWS

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * kd_loss(logits, teacher_logits, self.hp["temperature"])}
