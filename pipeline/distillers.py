"""Distillation methods, mdistiller-style: each is one small class whose `forward_train` returns
`(student_logits, {loss_name: loss})`; the trainer sums the losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput

METHODS: dict[str, type["Distiller"]] = {}


def register(cls: type["Distiller"]) -> type["Distiller"]:
    if cls.name in METHODS:
        raise ValueError(f"distillation method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


class Distiller(nn.Module):
    name = ""
    family = ""
    paper = ""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward_train(self, x: torch.Tensor, y: torch.Tensor,
                      teacher_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@register
class Supervised(Distiller):
    """The student trained alone on labels: the baseline every method is measured against.

    L = CE(z_s, y)
    """

    name, family, paper = "none", "baseline", "-"

    def __init__(self, student: nn.Module, **_):
        super().__init__(student)

    def forward_train(self, x, y, teacher_logits):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits.float(), y)}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch (Hinton et al., 2015)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@register
class HintonKD(Distiller):
    """Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531 (2015).

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones as T changes.
    """

    name, family, paper = "hinton", "response", "arXiv:1503.02531"

    def __init__(self, student: nn.Module, temperature: float = 4.0, alpha: float = 0.9, **_):
        super().__init__(student)
        self.temperature, self.alpha = temperature, alpha

    def forward_train(self, x, y, teacher_logits):
        logits = self.student(x)
        return logits, {"ce": (1 - self.alpha) * F.cross_entropy(logits.float(), y),
                        "kd": self.alpha * kd_loss(logits, teacher_logits, self.temperature)}


def build(method: str, student: nn.Module, **hparams) -> Distiller:
    if method not in METHODS:
        raise BadInput(f"unknown distillation method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[method](student, **hparams)
