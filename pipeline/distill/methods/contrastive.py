"""Contrastive methods: the student's embedding is contrasted against the teacher's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import RelationDistiller, ce, register

@register
class CRD(RelationDistiller):
    """Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.

    Embeddings are projected (linear, 128-d, L2-normalised) and contrasted against memory banks holding every
    training sample's last projected embedding (updated with momentum 0.5):
    L = CE(z_s, y) + beta * (NCE(g_s(s), bank_t) + NCE(g_t(t), bank_s)), beta = 0.8, tau = 0.07, K = 16384
    negatives (the paper). NCE here is the softmax (InfoNCE) form over 1 positive + K negatives, and the K
    negatives are shared by the whole batch, so the cost is one (B x d) @ (d x K) product instead of B x K x d.
    """

    name, family, paper = "crd", "contrastive", "arXiv:1910.10699"
    defaults = {"beta": 0.8, "feat_dim": 128, "negatives": 16384, "tau": 0.07, "momentum": 0.5}
    needs_index = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        d, n = hp["feat_dim"], setup.num_train
        self.embed_s = nn.Linear(setup.student_embedding_dim, d)
        self.embed_t = nn.Linear(setup.teacher_embedding_dim, d)
        bank = torch.randn(2, n, d)  # random unit vectors until each sample has been seen once
        self.register_buffer("bank", F.normalize(bank, dim=2))

    def _contrast(self, anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        pos = (anchor * positives).sum(1, keepdim=True)
        neg = anchor @ negatives.t()
        logits = torch.cat([pos, neg], 1) / self.hp["tau"]
        return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        s = F.normalize(self.embed_s(feats.embedding.float()), dim=1)
        t = F.normalize(self.embed_t(teacher.embedding.float()), dim=1)
        k = min(self.hp["negatives"], self.bank.shape[1] - 1)
        neg = torch.randint(0, self.bank.shape[1], (k,), device=x.device)
        bank_s, bank_t = self.bank[0], self.bank[1]
        loss = self._contrast(s, bank_t[index], bank_t[neg]) + self._contrast(t, bank_s[index], bank_s[neg])
        with torch.no_grad():
            m = self.hp["momentum"]
            self.bank[0, index] = F.normalize(m * bank_s[index] + (1 - m) * s.detach(), dim=1)
            self.bank[1, index] = F.normalize(m * bank_t[index] + (1 - m) * t.detach(), dim=1)
        return logits, {"ce": ce(logits, y), "crd": self.hp["beta"] * loss}
