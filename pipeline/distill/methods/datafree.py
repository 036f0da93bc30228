"""The data-free method and its settings (synthesis and stage: edgecompress.distill.datafree)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ...errors import BadInput
from .base import Distiller, kd_loss, register

METHOD_DATAFREE = "datafree"  # the distill.method value that selects the data-free stage


@dataclass
class DataFreeConfig:
    """Synthesis and student-training settings. The paper's CIFAR-10 settings (Adam lr 0.05 with betas (0.5, 0.9),
    2k iterations, batch 256, BN weight 10, jitter 2 px and flips) are scaled down for a 2-core CPU: 30 iterations
    with a cosine-decayed learning rate, a BN weight of 1 (at 10 the class term was still at chance after 30
    steps), the ImageNet code's weight of 10 on the first BN layer, and no jitter: with wrapping shifts every
    position looks alike to the objective, which then tiles the frame with texture."""

    images: int = 1200              # synthetic images, target classes sampled evenly
    batch: int = 100                # images optimised together: BN statistics are matched over a batch (paper 256)
    iterations: int = 30            # Adam steps per batch (paper 2000)
    lr: float = 0.05                # Adam learning rate on [0, 1] pixels, cosine-decayed (paper 0.05)
    bn_weight: float = 1.0          # weight of the BN statistics term (paper's CIFAR-10 setting 10)
    first_bn_multiplier: float = 10.0  # extra weight on the first BN layer (the paper's ImageNet code uses 10)
    tv_weight: float = 3.0          # squared total variation prior (on mean squared differences, see total_variation)
    l2_weight: float = 3.0          # mean squared pixel prior: pulls what the teacher does not need to black
    jitter: int = 0                 # random wrapping shift in pixels each step (paper: 2 px on 32x32)
    flip: bool = True               # random horizontal flip each step
    init: str = "blob"              # blob: a centred ellipse on black; noise: N(mean, std) of the teacher's input
    shift: int = 2                  # student training: random per-image shift in pixels (zero padding)
    mixup: bool = True              # student training: mix random pairs of synthetic images

    def check(self) -> DataFreeConfig:
        for name in ("images", "batch", "iterations"):
            if getattr(self, name) <= 0:
                raise BadInput(f"datafree option {name} must be > 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BadInput(f"datafree option lr must be > 0, got {self.lr}")
        if self.init not in ("blob", "noise"):
            raise BadInput(f"datafree option init must be blob or noise, got {self.init!r}")
        for name in ("bn_weight", "first_bn_multiplier", "tv_weight", "l2_weight", "jitter", "shift"):
            if getattr(self, name) < 0:
                raise BadInput(f"datafree option {name} must be >= 0, got {getattr(self, name)}")
        return self



@register
class DataFree(Distiller):
    """Data-free KD: DeepInversion (Yin et al., CVPR 2020, arXiv:1912.08795) synthesises the inputs from the teacher
    alone (loss in this module's docstring), then Hinton KD on augmented synthetic images:

    L = T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) on synthetic x' (no label term: there are no labels)
    """

    name, family, paper = METHOD_DATAFREE, "data-free", "arXiv:1912.08795"
    supplies_inputs = True
    defaults = {**asdict(DataFreeConfig()), "temperature": 4.0}

    def forward_train(self, x, y=None, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        return logits, {"kd": kd_loss(logits, teacher_logits, self.hp["temperature"])}
