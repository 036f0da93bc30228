"""Response-based methods: the student matches the teacher's outputs (logits)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, ce, kd_loss, register

@register
class Supervised(Distiller):
    """The student trained alone on labels: the baseline every method is measured against.

    L = CE(z_s, y)
    """

    name, family, paper = "none", "baseline", "-"
    uses_teacher = False

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        return logits, {"ce": ce(logits, y)}


@register
class HintonKD(Distiller):
    """Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531 (2015).

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones as T changes.
    """

    name, family, paper = "hinton", "response", "arXiv:1503.02531"
    kd_config = True
    defaults = {"temperature": 4.0, "alpha": 0.9}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * kd_loss(logits, teacher_logits, self.hp["temperature"])}


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Zhao et al. 2022, both times T^2 and averaged over the batch.

    TCKD = KL(b_t || b_s) with b = [p_target, 1 - p_target] from softmax(z / T);
    NCKD = KL(p^_t || p^_s) with p^ the softmax over the non-target classes only.
    """
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, 1), F.softmax(t, 1)
    b_s = torch.stack([p_s[target], 1 - p_s[target]], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[target], 1 - p_t[target]], 1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temperature**2
    # softmax over the non-target classes: the target logit is pushed to -inf-like so it takes no mass
    masked = -1e4 * target
    log_q_s, log_q_t = F.log_softmax(s + masked, 1), F.log_softmax(t + masked, 1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0).sum(1).mean() * temperature**2
    return tckd, nckd


@register
class DKD(Distiller):
    """Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.

    L = CE(z_s, y) + w(t) * (alpha * TCKD + beta * NCKD), alpha = 1, beta = 8, T = 4 (the paper's CIFAR
    setting); w(t) ramps linearly from 0 to 1 over the first warmup fraction of training (the paper: 20 of
    240 epochs).
    """

    name, family, paper = "dkd", "response", "arXiv:2203.08679"
    defaults = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20 / 240}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        tckd, nckd = dkd_loss(logits, teacher_logits, y, self.hp["temperature"])
        ramp = min(1.0, self.progress / self.hp["warmup"]) if self.hp["warmup"] > 0 else 1.0
        return logits, {"ce": ce(logits, y), "tckd": ramp * self.hp["alpha"] * tckd,
                        "nckd": ramp * self.hp["beta"] * nckd}
