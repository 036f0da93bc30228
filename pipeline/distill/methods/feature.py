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

    L = CE(z_s, y) + weight * mean((r(F_s) - F_t)^2), with r a learned regressor from the student's guided layer
    to the teacher's hint layer (default: the middle pair of the pairing, the paper's choice of middle layers):
    conv + BN + ReLU, as mdistiller's ConvReg (the paper's regressor is a convolution; the BN and ReLU are the
    reference code's), a 1x1 conv (the pairing gives maps of one spatial size). Trained in one stage with CE, as
    mdistiller does; the paper's two-stage schedule (hints first, then KD) is not reproduced. weight 0.1, not
    mdistiller's CIFAR 100: tuned on the validation split for the tuning's short schedule (4 epochs, OneCycle
    to lr 0.2; benchmarks/results/kd_tuning-fitnet-subset.json), where every weight from 10 up trains the student
    below the student alone.
    """

    name, family, paper = "fitnet", "feature", "arXiv:1412.6550"
    defaults = {"weight": 0.1, "hint": -1}  # hint: index into the pairing; -1 means the middle pair

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        pairs = len(setup.student_shapes)
        self.hint = pairs // 2 if hp["hint"] == -1 else hp["hint"]
        if not 0 <= self.hint < pairs:
            raise BadInput(f"fitnet: hint={hp['hint']} but there are {pairs} paired layers (0..{pairs - 1})")
        cs, ct = setup.student_shapes[self.hint][0], setup.teacher_shapes[self.hint][0]
        self.regressor = nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct), nn.ReLU(inplace=True))

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

    L = CE(z_s, y) + beta * sum_j mean((Q_s^j - Q_t^j)^2) (the mean over the batch and positions),
    Q = normalize(vec(mean_c |F|^p)), p = 2, over every paired stage end. The paper writes
    beta / 2 * sum_j || Q_s^j - Q_t^j ||_p; the authors' code, RepDistiller and mdistiller apply beta = 1000 to the
    mean squared difference without the 1/2, as done here. beta = 30, not 1000: tuned on the validation split for
    the tuning's short schedule (4 epochs, OneCycle to lr 0.2; benchmarks/results/kd_tuning-at-subset.json),
    where 1000 trains the student far below the student alone.
    """

    name, family, paper = "at", "feature", "arXiv:1612.03928"
    defaults = {"beta": 30.0, "p": 2.0}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        p = self.hp["p"]
        at = sum((attention_map(s, p) - attention_map(t, p)).pow(2).mean() for s, t in zip(feats.maps, teacher.maps))
        return logits, {"ce": ce(logits, y), "at": self.hp["beta"] * at}


class AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF): the student's map x, reduced to `mid` channels, is blended with
    the fused map y of the next deeper stage by two per-pixel attention weights from both; a 3x3 conv then
    gives the map compared with the teacher's. Returns (output, fused map for the next shallower stage)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.out = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None and y is not None:
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
            z = self.attention(torch.cat([x, y], 1))
            x = x * z[:, :1] + y * z[:, 1:]
        return self.out(x), x


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss for one stage: the mean squared error of the maps, plus that of their
    4x4, 2x2 and 1x1 average-pooled versions (those smaller than the map) weighted 1/2, 1/4, 1/8, all divided by
    the sum of the weights used."""
    s, t = student.float(), teacher.float()
    loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= s.shape[-1]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
        total += weight
    return loss / total


@register
class ReviewKD(FeatureDistiller):
    """Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv:2104.09044.

    The student's stage ends are fused deepest first by attention-based fusion (AttentionFusion), so each output
    sees its own stage and every deeper one, and each output is compared with the teacher's map of its stage by
    the hierarchical context loss (hcl_loss): L = CE(z_s, y) + w(t) * weight * sum_j HCL(ABF_j, F_t^j); w(t) ramps
    from 0 to 1 over the first warmup fraction of training. weight 1 and a 20-of-240-epoch warm-up are
    mdistiller's defaults (its CIFAR-100 config uses 5); the weight here is 30, tuned on the validation split
    (README, kd-methods: 1: 87.13%, 10: 88.39%, 30: 88.77%, 100: 86.52%); mid channels min(512, deepest student
    channels).
    mdistiller also adds the pooled embedding as a 1x1 level; here the levels are the paired stage ends only.
    """

    name, family, paper = "reviewkd", "feature", "arXiv:2104.09044"
    defaults = {"weight": 30.0, "warmup": 20 / 240}

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        mid = min(512, setup.student_shapes[-1][0])
        last = len(setup.student_shapes) - 1
        # deepest first: the deepest stage has nothing deeper to fuse with
        self.fusions = nn.ModuleList(
            AttentionFusion(s[0], mid, t[0], fuse=i != last)
            for i, (s, t) in reversed(list(enumerate(zip(setup.student_shapes, setup.teacher_shapes)))))

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        outputs, fused = [], None
        for fusion, f in zip(self.fusions, reversed(feats.maps)):
            out, fused = fusion(f, fused)
            outputs.insert(0, out)
        ramp = min(1.0, self.progress / self.hp["warmup"]) if self.hp["warmup"] > 0 else 1.0
        review = sum(hcl_loss(s, t) for s, t in zip(outputs, teacher.maps))
        return logits, {"ce": ce(logits, y), "review": ramp * self.hp["weight"] * review}
