"""Self-distillation: the student's deepest classifier teaches heads on its own shallower stages."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import BadInput
from .base import Distiller, ce, kd_loss, register


@register
class SelfDistillation(Distiller):
    """Zhang et al., "Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation", ICCV 2019,
    arXiv:1905.08094.

    Auxiliary heads on the student's own stage ends (a 1x1 conv + BN + ReLU bottleneck to the deepest stage's
    channels and size, then pool + linear); the deepest classifier teaches the shallow ones:
    L = CE(q_C, y) + sum_i [(1 - alpha) * CE(q_i, y) + alpha * T^2 * KL(q_C || q_i) + lambda * ||F_i - F_C||_2],
    ||.||_2 the L2 norm of the difference over the whole batch (torch.dist). alpha = 0.3, T = 3, lambda = 0.03
    are the defaults of the authors' code (ArchipLab-LinfengZhang/pytorch-self-distillation-final, train.py:
    loss_coefficient, temperature, feature_loss_coefficient); the paper does not state them. lambda here is
    0.0003, tuned on the validation split (README, kd-methods): 0.03 trains the student 2.9 points below it,
    and at every lambda tried the method stays below the student trained alone on this schedule. As there, the
    feature term is the norm over the batch, not a mean over elements (which made it about B*C*H*W times
    smaller) nor the paper's squared norm; unlike there, the KD term keeps Hinton's T^2 factor, so that alpha
    weighs it against CE at any T. The heads are training-only: the saved student is unchanged.
    """

    name, family, paper = "self-distill", "self", "arXiv:1905.08094"
    defaults = {"alpha": 0.3, "temperature": 3.0, "feature_weight": 0.0003}
    uses_teacher = False
    student_features = feature_maps = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        stages = setup.student_stage_shapes
        if len(stages) < 2:
            raise BadInput("self-distill needs a student with at least 2 stage ends; name them with "
                           "--method-opt student_layers=a,b")
        deep_c, deep_h, deep_w = stages[-1]
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, deep_c, 1, bias=False), nn.BatchNorm2d(deep_c), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d((deep_h, deep_w))) for c, _, _ in stages[:-1])
        self.heads = nn.ModuleList(nn.Linear(deep_c, setup.num_classes) for _ in stages[:-1])

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        deepest, a, t = feats.maps[-1].float().detach(), self.hp["alpha"], self.hp["temperature"]
        losses = {"ce": ce(logits, y)}
        for i, (neck, head) in enumerate(zip(self.bottlenecks, self.heads)):
            f = neck(feats.maps[i])
            z = head(f.float().mean((2, 3)))
            losses[f"ce_head{i}"] = (1 - a) * ce(z, y)
            losses[f"kd_head{i}"] = a * kd_loss(z, logits.detach(), t)
            losses[f"feat_head{i}"] = self.hp["feature_weight"] * torch.dist(f.float(), deepest)
        return logits, losses
