"""Adversarial distillation: a discriminator tells teacher outputs from student outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, ce, register


class Discriminator(nn.Module):
    """An MLP scoring (class probabilities, one-hot label) as teacher-made (1) or student-made (0). It sees
    softmax outputs, not raw logits: bounded inputs keep the student from chasing the teacher's logit scale,
    which on raw logits collapsed the student to one class in our runs."""

    def __init__(self, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=1)
        return self.net(torch.cat([probs, F.one_hot(y, logits.shape[1]).float()], 1)).squeeze(1)


@register
class Adversarial(Distiller):
    """Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with
    Conditional Adversarial Networks", ICLR 2018 workshop, arXiv:1709.00513.

    A discriminator D, conditioned on the label, learns to tell the teacher's outputs from the student's; the
    student learns to fool it. Both are updated by the same step: D's parameters are detached in the student's term, and
    the student's logits are detached in D's term, so each gradient reaches only its own player.
    L_S = CE(z_s, y) + adv * BCE(D(z_s, y), 1);  L_D = BCE(D(z_t, y), 1) + BCE(D(z_s, y), 0); adv = 1.
    """

    name, family, paper = "adversarial", "adversarial", "arXiv:1709.00513"
    defaults = {"adv": 1.0, "hidden": 256}

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        self.discriminator = Discriminator(setup.num_classes, hp["hidden"])

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fooled = torch.func.functional_call(self.discriminator, frozen, (logits, y))
        real, fake = self.discriminator(teacher_logits, y), self.discriminator(logits.detach(), y)
        bce = F.binary_cross_entropy_with_logits
        return logits, {"ce": ce(logits, y), "adv": self.hp["adv"] * bce(fooled, torch.ones_like(fooled)),
                        "disc": bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))}
