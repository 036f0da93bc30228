"""Feature-based methods: the student matches the teacher's intermediate feature maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from .base import FeatureDistiller, ce, register

@register
class FitNet(FeatureDistiller):
    """Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550.

    L = CE(z_s, y) + weight * mean((r(F_s) - F_t)^2), with r a learned 1x1 conv + BN regressor from the student's
    guided layer to the teacher's hint layer (default: the middle pair of the pairing, the paper's choice of
    middle layers). Trained in one stage with CE, as mdistiller does, weight 100 (mdistiller's CIFAR setting);
    the paper's two-stage schedule (hints first, then KD) is not reproduced.
    """

    name, family, paper = "fitnet", "feature", "arXiv:1412.6550"
    defaults = {"weight": 100.0, "hint": -1}  # hint: index into the pairing; -1 means the middle pair

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        pairs = len(setup.student_shapes)
        self.hint = pairs // 2 if hp["hint"] == -1 else hp["hint"]
        if not 0 <= self.hint < pairs:
            raise BadInput(f"fitnet: hint={hp['hint']} but there are {pairs} paired layers (0..{pairs - 1})")
        cs, ct = setup.student_shapes[self.hint][0], setup.teacher_shapes[self.hint][0]
        self.regressor = nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        guided = self.regressor(feats.maps[self.hint])
        hint = teacher.maps[self.hint].float()
        return logits, {"ce": ce(logits, y), "hint": self.hp["weight"] * F.mse_loss(guided.float(), hint)}


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """Q = normalize(vec(mean_c |F|^p)): the spatial attention of a feature map (Zagoruyko & Komodakis)."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


@register
class AttentionTransfer(FeatureDistiller):
    """Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR 2017, arXiv:1612.03928.

    L = CE(z_s, y) + beta / 2 * sum_j || Q_s^j - Q_t^j ||_2^2 (averaged over the batch and positions),
    Q = normalize(vec(mean_c |F|^p)), p = 2, beta = 1000 (the paper), over every paired stage end.
    """

    name, family, paper = "at", "feature", "arXiv:1612.03928"
    defaults = {"beta": 1000.0, "p": 2.0}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        p = self.hp["p"]
        at = sum((attention_map(s, p) - attention_map(t, p)).pow(2).mean() for s, t in zip(feats.maps, teacher.maps))
        return logits, {"ce": ce(logits, y), "at": self.hp["beta"] / 2 * at}
