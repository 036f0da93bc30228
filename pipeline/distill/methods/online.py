"""Online distillation: students teach each other, no fixed teacher."""
from __future__ import annotations

from torch import nn

from ...errors import BadInput
from .base import Distiller, ce, kd_loss, register


@register
class MutualLearning(Distiller):
    """Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384.

    Online: no fixed teacher; the student and `peers` more students of the same architecture learn together.
    For each network k: L_k = CE(z_k, y) + 1 / (K - 1) * sum_{l != k} KL(p_l || p_k), p_l fixed (detached) in
    L_k; all networks are updated together from sum_k L_k (the paper alternates; one joint step is its
    simultaneous variant). The saved model is the first student.
    """

    name, family, paper = "dml", "online", "arXiv:1706.00384"
    defaults = {"peers": 1}
    uses_teacher = False

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        if hp["peers"] < 1:
            raise BadInput(f"dml: peers must be >= 1, got {hp['peers']}")
        self.peers = nn.ModuleList(setup.new_student() for _ in range(hp["peers"]))

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        outputs = [self.student(x)] + [peer(x) for peer in self.peers]
        losses, others = {}, len(outputs) - 1
        for k, z in enumerate(outputs):
            tag = "student" if k == 0 else f"peer{k}"
            losses[f"ce_{tag}"] = ce(z, y)
            losses[f"kl_{tag}"] = sum(kd_loss(z, outputs[j].detach(), 1.0) for j in range(len(outputs)) if j != k) / others
        return outputs[0], losses
