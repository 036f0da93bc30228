"""Contrastive methods: the student's embedding is contrasted against the teacher's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from .base import RelationDistiller, ce, register


def crd_contrast(anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, anchor_labels: torch.Tensor,
                 negative_labels: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of each anchor against its positive and the negatives of other classes only:
    mean_i -log(exp(a_i . p_i / tau) / (exp(a_i . p_i / tau) + sum_{k: y_k != y_i} exp(a_i . n_k / tau))).
    A negative of the anchor's own class (the anchor's own bank entry among them) is left out, as CRD's
    reference code draws negatives from the other classes' samples only (RepDistiller's cls_negative)."""
    pos = (anchor * positives).sum(1, keepdim=True)
    neg = (anchor @ negatives.t()).masked_fill(negative_labels[None, :] == anchor_labels[:, None], float("-inf"))
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


@register
class CRD(RelationDistiller):
    """Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.

    Embeddings are projected (linear, 128-d, L2-normalised) and contrasted against memory banks holding every
    training sample's last projected embedding (updated with momentum 0.5):
    L = CE(z_s, y) + beta * (NCE(g_s(s), bank_t) + NCE(g_t(t), bank_s)), tau = 0.07, K = 16384 negatives (the
    paper); beta = 0.2, not the paper's 0.8: tuned on the validation split for the tuning's short schedule (4
    epochs, OneCycle to lr 0.2; benchmarks/results/kd_tuning-crd-subset.json). NCE here is the softmax (InfoNCE)
    form over 1 positive + the negatives (crd_contrast), not the paper's NCE with a fixed normaliser. The
    negatives are drawn from the bank once per batch and shared by its anchors, so the cost is one (B x d) @
    (d x K') product instead of B x K x d; each anchor uses those of other classes only, as the reference code
    draws them, and K' = K * C / (C - 1) keeps about K per anchor.
    """

    name, family, paper = "crd", "contrastive", "arXiv:1910.10699"
    defaults = {"beta": 0.2, "feat_dim": 128, "negatives": 16384, "tau": 0.07, "momentum": 0.5}
    needs_index = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        if setup.train_labels is None:
            raise BadInput("crd needs the training labels (a memory bank entry per training image)")
        d, n = hp["feat_dim"], len(setup.train_labels)
        self.embed_s = nn.Linear(setup.student_embedding_dim, d)
        self.embed_t = nn.Linear(setup.teacher_embedding_dim, d)
        bank = torch.randn(2, n, d)  # random unit vectors until each sample has been seen once
        self.register_buffer("bank", F.normalize(bank, dim=2))
        self.register_buffer("bank_labels", setup.train_labels.long().clone())
        classes = max(2, setup.num_classes)
        self.draw = min(n, round(hp["negatives"] * classes / (classes - 1)))

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        s = F.normalize(self.embed_s(feats.embedding.float()), dim=1)
        t = F.normalize(self.embed_t(teacher.embedding.float()), dim=1)
        neg = torch.randint(0, self.bank.shape[1], (self.draw,), device=x.device)
        bank_s, bank_t, labels, tau = self.bank[0], self.bank[1], self.bank_labels[neg], self.hp["tau"]
        loss = crd_contrast(s, bank_t[index], bank_t[neg], y, labels, tau) + \
            crd_contrast(t, bank_s[index], bank_s[neg], y, labels, tau)
        with torch.no_grad():
            m = self.hp["momentum"]
            self.bank[0, index] = F.normalize(m * bank_s[index] + (1 - m) * s.detach(), dim=1)
            self.bank[1, index] = F.normalize(m * bank_t[index] + (1 - m) * t.detach(), dim=1)
        return logits, {"ce": ce(logits, y), "crd": self.hp["beta"] * loss}
