"""Several teachers' soft targets combined into one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import BadInput
from .base import Distiller, ce, register, soft_kd_loss, standardize


def confidence_weights(teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CA-MKD's per-sample teacher weights, shape (K, B): w_k = (1 - softmax_k(CE_k)) / (K - 1), so the teacher
    with the lower cross-entropy on the true label weighs more (Zhang, Chen, Wang, arXiv:2201.00007)."""
    k = teacher_logits.shape[0]
    losses = torch.stack([F.cross_entropy(z.float(), y, reduction="none") for z in teacher_logits])
    return (1 - F.softmax(losses, dim=0)) / (k - 1)


@register
class MultiTeacher(Distiller):
    """Several teachers' soft targets combined into one, then Hinton KD against it.

    combine = average: p = 1/K sum_k softmax(z_k / T) (You, Xu, Xu, Tao, "Learning from Multiple Teacher
    Networks", KDD 2017). combine = confidence: p = sum_k w_k softmax(z_k / T) with the per-sample weights
    w_k = (1 - softmax_k(CE(z_k, y))) / (K - 1) of Zhang, Chen, Wang, "Confidence-Aware Multi-Teacher Knowledge
    Distillation", ICASSP 2022, arXiv:2201.00007.
    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p || softmax(z_s / T)), T = 4, alpha = 0.9.
    standardize=true standardises the student's and every teacher's logits before the softmaxes (logit
    standardisation, Sun et al., CVPR 2024): teachers of different logit scales then weigh by their rankings.
    """

    name, family, paper = "multi-teacher", "multi-teacher", "KDD 2017 (average); arXiv:2201.00007 (confidence)"
    defaults = {"combine": "average", "temperature": 4.0, "alpha": 0.9, "standardize": False}
    many_teachers = kd_config = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        if hp["combine"] not in ("average", "confidence"):
            raise BadInput(f"multi-teacher: combine must be average or confidence, got {hp['combine']!r}")

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        z = teacher_logits if teacher_logits.dim() == 3 else teacher_logits[None]
        t = self.hp["temperature"]
        student = standardize(logits) if self.hp["standardize"] else logits
        shaped = torch.stack([standardize(k) for k in z]) if self.hp["standardize"] else z.float()
        probs = F.softmax(shaped / t, dim=2)
        if self.hp["combine"] == "confidence" and len(z) > 1:
            target = (confidence_weights(z, y)[:, :, None] * probs).sum(0)
        else:
            target = probs.mean(0)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * soft_kd_loss(student, target, t)}
