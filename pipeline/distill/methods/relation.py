"""Relation-based methods: the student matches how the teacher relates the samples of a batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeatureDistiller, RelationDistiller, ce, register


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12).sqrt() * (1 - torch.eye(len(e), device=e.device))


def rkd_losses(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, angle) terms of RKD on embeddings s, t of shape (B, D)."""
    s, t = s.float().flatten(1), t.float().flatten(1)
    with torch.no_grad():
        d_t = pairwise_distances(t)
        d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    distance = F.smooth_l1_loss(d_s, d_t)
    with torch.no_grad():
        v_t = F.normalize(t[None, :, :] - t[:, None, :], dim=2)
        angle_t = torch.bmm(v_t, v_t.transpose(1, 2)).flatten()
    v_s = F.normalize(s[None, :, :] - s[:, None, :], dim=2)
    angle_s = torch.bmm(v_s, v_s.transpose(1, 2)).flatten()
    return distance, F.smooth_l1_loss(angle_s, angle_t)


@register
class RKD(RelationDistiller):
    """Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068.

    L = CE(z_s, y) + w_d * sum huber(psi_D(s_i, s_j) - psi_D(t_i, t_j)) + w_a * sum huber(psi_A(s_i, s_j, s_k) -
    psi_A(t_i, t_j, t_k)); psi_D: pairwise distance divided by the batch's mean distance, psi_A: cosine of the
    angle at s_j; on the embeddings (penultimate features). w_d = 2.5, w_a = 5, a tenth of the paper's 25 and 50:
    tuned on the validation split for the tuning's short schedule (4 epochs, OneCycle to lr 0.2;
    benchmarks/results/kd_tuning-rkd-subset.json).
    """

    name, family, paper = "rkd", "relation", "arXiv:1904.05068"
    defaults = {"distance_weight": 2.5, "angle_weight": 5.0}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        distance, angle = rkd_losses(feats.embedding, teacher.embedding)
        return logits, {"ce": ce(logits, y), "rkd_distance": self.hp["distance_weight"] * distance,
                        "rkd_angle": self.hp["angle_weight"] * angle}


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """|| G_s - G_t ||_F^2 / b^2 with G = row-normalised (F F^T), F the flattened activations (b, chw)."""
    g_s = F.normalize(f_s.float().flatten(1) @ f_s.float().flatten(1).t(), dim=1)
    g_t = F.normalize(f_t.float().flatten(1) @ f_t.float().flatten(1).t(), dim=1)
    return (g_s - g_t).pow(2).sum() / len(f_s) ** 2


@register
class SimilarityPreserving(FeatureDistiller):
    """Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682.

    L = CE(z_s, y) + gamma / b^2 * || G_s - G_t ||_F^2, G = row-normalised F F^T of the last paired stage end's
    activations over the batch; gamma = 3000 (the paper's CIFAR-10 setting).
    """

    name, family, paper = "sp", "relation", "arXiv:1907.09682"
    defaults = {"gamma": 3000.0}
    last_pair_only = True

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        return logits, {"ce": ce(logits, y), "sp": self.hp["gamma"] * similarity_loss(feats.maps[-1], teacher.maps[-1])}


def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean_{i,j} P_t(i|j) log((P_t(i|j) + eps) / (P_s(i|j) + eps)), P(i|j) = K(i, j) / sum_k K(k, j) with the
    cosine kernel K(a, b) = (cos(a, b) + 1) / 2 over the batch: the mean over the whole B x B matrix, as the
    authors' code and RepDistiller's cosine_similarity_loss take it (a sum over one axis would make the loss B
    times larger and its weight mean something else at every batch size)."""
    s, t = F.normalize(s.float().flatten(1), dim=1), F.normalize(t.float().flatten(1), dim=1)
    k_s, k_t = (s @ s.t() + 1) / 2, (t @ t.t() + 1) / 2
    p_s, p_t = k_s / k_s.sum(1, keepdim=True), k_t / k_t.sum(1, keepdim=True)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register
class PKT(RelationDistiller):
    """Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
    arXiv:1803.10837.

    L = CE(z_s, y) + weight * KL(P_t || P_s), P the conditional probabilities from the cosine-similarity kernel
    over the batch's embeddings, averaged over the B x B pairs (pkt_loss); weight 30000 (RepDistiller's setting
    for PKT, with the same averaging).
    """

    name, family, paper = "pkt", "relation", "arXiv:1803.10837"
    defaults = {"weight": 30000.0}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        return logits, {"ce": ce(logits, y), "pkt": self.hp["weight"] * pkt_loss(feats.embedding, teacher.embedding)}
