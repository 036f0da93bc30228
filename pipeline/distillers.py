"""Distillation methods, mdistiller-style: each is one small class whose `forward_train` returns
`(student_logits, {loss_name: loss})`; the trainer (distill/trainer.py) sums the losses.

A method declares what it needs as class attributes, so the trainer builds hooks, teacher forwards and extra
optimised modules only when asked:

- `uses_teacher`: False for schemes without a fixed teacher (the baseline, mutual learning, self-distillation).
- `teacher_features`: the teacher must be a torch model run every step with feature hooks (feature, relation
  and contrastive methods); an ONNX teacher is refused. Otherwise the teacher's logits are computed once and
  cached, or with augmentation recorded per epoch in the FKD cache (data/softlabels.py).
- `student_features`: the student's features are captured by hooks: `feature_maps` (paired stage ends) and/or
  `embeddings` (the input of the last linear layer, for relation and contrastive methods).
- `kd_config`: the method takes distill.temperature / distill.alpha (its KD term is Hinton's).
- `many_teachers`: accepts several teachers (their logits stacked as (K, B, C)); every other method refuses more
  than one.
- `needs_index`: the dataset index of each sample (CRD's memory bank).
- `supplies_inputs`: the method makes its own training inputs (data-free distillation): the pipeline then runs
  its own distill stage (distill/datafree.py), which never reads the training images or labels.

Trainable parts beyond the student (regressors, projection heads, discriminators, auxiliary heads, peer students)
are submodules of the distiller, so `distiller.parameters()` hands them to the one optimizer; `distiller.student`
is what gets saved.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput

METHODS: dict[str, type["Distiller"]] = {}


def register(cls: type["Distiller"]) -> type["Distiller"]:
    if cls.name in METHODS:
        raise ValueError(f"distillation method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


@dataclass
class Features:
    """What one network showed on a batch: paired feature maps (same order for student and teacher) and the
    embedding (the input of its last linear layer)."""

    maps: list[torch.Tensor] = field(default_factory=list)
    embedding: torch.Tensor | None = None


@dataclass
class Setup:
    """Facts about the models and data that methods size their extra modules from (filled by the trainer)."""

    num_classes: int
    num_train: int = 0
    student_shapes: list[tuple[int, ...]] = field(default_factory=list)  # (C, H, W) of each paired student map
    teacher_shapes: list[tuple[int, ...]] = field(default_factory=list)
    student_embedding_dim: int = 0
    teacher_embedding_dim: int = 0
    student_stage_shapes: list[tuple[int, ...]] = field(default_factory=list)  # every student stage end
    new_student: Callable[[], nn.Module] | None = None  # a fresh student of the same architecture (DML peers)


class FeatureTap:
    """Forward hooks that keep the outputs of modules named by path, and the input of one linear layer."""

    def __init__(self, model: nn.Module, layers: list[str], embedding: str = ""):
        modules = dict(model.named_modules())
        for path in [*layers, *([embedding] if embedding else [])]:
            if path not in modules:
                hint = difflib.get_close_matches(path, list(modules), n=1)
                raise BadInput(f"no module {path!r} in {type(model).__name__}"
                               f"{f' (did you mean {hint[0]!r}?)' if hint else ''}")
        self.layers, self.outputs, self.embedding = layers, {}, None
        self.handles = [modules[p].register_forward_hook(self._keep(p)) for p in layers]
        if embedding:
            self.handles.append(modules[embedding].register_forward_pre_hook(self._keep_input))

    def _keep(self, path: str):
        def hook(_module, _inputs, output):
            self.outputs[path] = output
        return hook

    def _keep_input(self, _module, inputs):
        self.embedding = inputs[0]

    def take(self) -> Features:
        """The features of the last forward, and forget them (they hold the autograd graph)."""
        found = Features([self.outputs[p] for p in self.layers], self.embedding)
        self.outputs, self.embedding = {}, None
        return found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Distiller(nn.Module):
    name = ""
    family = ""
    paper = ""
    defaults: dict = {}
    uses_teacher = True
    teacher_features = False
    student_features = False
    feature_maps = False
    embeddings = False
    kd_config = False
    many_teachers = False
    needs_index = False
    supplies_inputs = False

    def __init__(self, student: nn.Module, setup: Setup, **hparams):
        super().__init__()
        self.student = student
        self.setup = setup
        self.hp = hparams
        self.tap: FeatureTap | None = None
        self.progress = 0.0  # fraction of training done, set by the trainer (for warm-ups)

    def attach(self, layers: list[str], embedding: str) -> None:
        """Hook the student's paired layers and embedding (called by the trainer for feature methods)."""
        self.tap = FeatureTap(self.student, layers, embedding)

    def forward(self, *args, **kwargs):  # DistributedDataParallel calls forward
        return self.forward_train(*args, **kwargs)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      teacher: Features | None = None, index: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        logits = self.student(x)
        return logits, (self.tap.take() if self.tap else Features())


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch (Hinton et al., 2015)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def soft_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """kd_loss against given teacher probabilities (already softened at T), e.g. a combination of teachers."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, teacher_probs.float(), reduction="batchmean") * temperature**2


@register
class Supervised(Distiller):
    """The student trained alone on labels: the baseline every method is measured against.

    L = CE(z_s, y)
    """

    name, family, paper = "none", "baseline", "-"
    uses_teacher = False

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        return logits, {"ce": ce(logits, y)}


@register
class HintonKD(Distiller):
    """Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531 (2015).

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones as T changes.
    """

    name, family, paper = "hinton", "response", "arXiv:1503.02531"
    kd_config = True
    defaults = {"temperature": 4.0, "alpha": 0.9}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * kd_loss(logits, teacher_logits, self.hp["temperature"])}


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Zhao et al. 2022, both times T^2 and averaged over the batch.

    TCKD = KL(b_t || b_s) with b = [p_target, 1 - p_target] from softmax(z / T);
    NCKD = KL(p^_t || p^_s) with p^ the softmax over the non-target classes only.
    """
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, 1), F.softmax(t, 1)
    b_s = torch.stack([p_s[target], 1 - p_s[target]], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[target], 1 - p_t[target]], 1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temperature**2
    # softmax over the non-target classes: the target logit is pushed to -inf-like so it takes no mass
    masked = -1e4 * target
    log_q_s, log_q_t = F.log_softmax(s + masked, 1), F.log_softmax(t + masked, 1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0).sum(1).mean() * temperature**2
    return tckd, nckd


@register
class DKD(Distiller):
    """Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.

    L = CE(z_s, y) + w(t) * (alpha * TCKD + beta * NCKD), alpha = 1, beta = 8, T = 4 (the paper's CIFAR
    setting); w(t) ramps linearly from 0 to 1 over the first warmup fraction of training (the paper: 20 of
    240 epochs).
    """

    name, family, paper = "dkd", "response", "arXiv:2203.08679"
    defaults = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20 / 240}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        tckd, nckd = dkd_loss(logits, teacher_logits, y, self.hp["temperature"])
        ramp = min(1.0, self.progress / self.hp["warmup"]) if self.hp["warmup"] > 0 else 1.0
        return logits, {"ce": ce(logits, y), "tckd": ramp * self.hp["alpha"] * tckd,
                        "nckd": ramp * self.hp["beta"] * nckd}


class FeatureDistiller(Distiller):
    uses_teacher = teacher_features = student_features = feature_maps = True


class RelationDistiller(Distiller):
    uses_teacher = teacher_features = student_features = embeddings = True


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
    angle at s_j; on the embeddings (penultimate features); w_d = 25, w_a = 50 (the paper).
    """

    name, family, paper = "rkd", "relation", "arXiv:1904.05068"
    defaults = {"distance_weight": 25.0, "angle_weight": 50.0}

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

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        return logits, {"ce": ce(logits, y), "sp": self.hp["gamma"] * similarity_loss(feats.maps[-1], teacher.maps[-1])}


def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL(P_t || P_s) where P_{i|j} = K(i, j) / sum_i K(i, j), K(a, b) = (cos(a, b) + 1) / 2."""
    s, t = F.normalize(s.float().flatten(1), dim=1), F.normalize(t.float().flatten(1), dim=1)
    k_s, k_t = (s @ s.t() + 1) / 2, (t @ t.t() + 1) / 2
    p_s, p_t = k_s / k_s.sum(1, keepdim=True), k_t / k_t.sum(1, keepdim=True)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(1).mean()


@register
class PKT(RelationDistiller):
    """Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
    arXiv:1803.10837.

    L = CE(z_s, y) + weight * KL(P_t || P_s), P the conditional probabilities from the cosine-similarity kernel
    over the batch's embeddings; weight 30000 (the setting of the CRD benchmark code that mdistiller follows).
    """

    name, family, paper = "pkt", "relation", "arXiv:1803.10837"
    defaults = {"weight": 30000.0}

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits, feats = self.student_forward(x)
        return logits, {"ce": ce(logits, y), "pkt": self.hp["weight"] * pkt_loss(feats.embedding, teacher.embedding)}


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


@register
class SelfDistillation(Distiller):
    """Zhang et al., "Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation", ICCV 2019,
    arXiv:1905.08094.

    Auxiliary heads on the student's own stage ends (a 1x1 conv + BN + ReLU bottleneck to the deepest stage's
    channels and size, then pool + linear); the deepest classifier teaches the shallow ones:
    L = sum_i [(1 - alpha) * CE(q_i, y) + alpha * T^2 * KL(q_C || q_i) + lambda * ||F_i - F_C||^2] + CE(q_C, y),
    alpha = 0.3, T = 3, lambda = 0.03 (the paper's CIFAR settings). The heads are training-only: the saved
    student is unchanged.
    """

    name, family, paper = "self-distill", "self", "arXiv:1905.08094"
    defaults = {"alpha": 0.3, "temperature": 3.0, "feature_weight": 0.03}
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
            losses[f"feat_head{i}"] = self.hp["feature_weight"] * (f.float() - deepest).pow(2).mean()
        return logits, losses


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
    """

    name, family, paper = "multi-teacher", "multi-teacher", "KDD 2017 (average); arXiv:2201.00007 (confidence)"
    defaults = {"combine": "average", "temperature": 4.0, "alpha": 0.9}
    many_teachers = kd_config = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        if hp["combine"] not in ("average", "confidence"):
            raise BadInput(f"multi-teacher: combine must be average or confidence, got {hp['combine']!r}")

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        z = teacher_logits if teacher_logits.dim() == 3 else teacher_logits[None]
        t = self.hp["temperature"]
        probs = F.softmax(z.float() / t, dim=2)
        if self.hp["combine"] == "confidence" and len(z) > 1:
            target = (confidence_weights(z, y)[:, :, None] * probs).sum(0)
        else:
            target = probs.mean(0)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * soft_kd_loss(logits, target, t)}


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


def downsample_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """A low-resolution sensor: area-downsampled to size x size, then shown at the original size (nearest), so
    the student's input shape and its exported artifact stay the same."""
    h, w = x.shape[-2:]
    return F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=(h, w), mode="nearest")


def noise_view(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A noisy sensor: additive Gaussian noise of std sigma (pixels in [0, 1]), clipped to [0, 1]."""
    return (x + sigma * torch.randn_like(x)).clamp_(0, 1)


VIEWS = ("downsample", "noise")


@register
class CrossModal(Distiller):
    """Cross-modal distillation: the teacher sees one view of a sample, the student another (Gupta, Hoffman,
    Malik, "Cross Modal Distillation for Supervision Transfer", CVPR 2016, arXiv:1507.00448, transfer
    supervision between paired modalities; here at the logit level).

    L = (1 - alpha) * CE(z_s(v_s(x)), y) + alpha * T^2 * KL(softmax(z_t(v_t(x)) / T) || softmax(z_s(v_s(x)) / T)).
    Built-in student views: `downsample` (a size x size sensor, default 14) and `noise` (Gaussian, sigma 0.3);
    the teacher sees the full image, so its logits stay cached. `view=path/to/file.py:function` runs the user's
    pair transform f(x) -> (x_student, x_teacher) on each batch of [0, 1] pixels; the teacher then runs every
    step on its view.
    """

    name, family, paper = "cross-modal", "cross-modal", "arXiv:1507.00448"
    defaults = {"view": "downsample", "size": 14, "sigma": 0.3, "temperature": 4.0, "alpha": 0.9}
    kd_config = True

    def __init__(self, student, setup, **hp):
        super().__init__(student, setup, **hp)
        self.pair_transform = self._builtin if hp["view"] in VIEWS else None  # set by the trainer for user files

    def _builtin(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = downsample_view(x, self.hp["size"]) if self.hp["view"] == "downsample" else noise_view(x, self.hp["sigma"])
        return view, x

    @property
    def teacher_view_is_input(self) -> bool:
        return self.hp["view"] in VIEWS

    def forward_train(self, x, y, teacher_logits=None, teacher=None, index=None):
        logits = self.student(x)
        a = self.hp["alpha"]
        return logits, {"ce": (1 - a) * ce(logits, y), "kd": a * kd_loss(logits, teacher_logits, self.hp["temperature"])}


# options every method comparing feature maps accepts; the trainer reads them to pair layers
# (distill.pair_layers): module paths, paired by position
LAYER_OPTIONS = ("student_layers", "teacher_layers")


def options(cls: type[Distiller]) -> dict:
    return {**cls.defaults, **({k: [] for k in LAYER_OPTIONS} if cls.feature_maps else {})}


def coerce(method: str, key: str, value, default):
    """`value` (a string from --method-opt, or a TOML value) as the type of the option's default."""
    where = f"--method-opt {key} for {method}"
    if isinstance(default, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise BadInput(f"{where} must be a comma-separated list of module paths, got {value!r}")
        return [i.strip() for i in items]
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip().lower()
        try:
            value = {"true": True, "false": False}[text] if isinstance(default, bool) else \
                int(text) if isinstance(default, int) else float(text)
        except (KeyError, ValueError):
            raise BadInput(f"{where} must be {type(default).__name__}, got {value!r}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise BadInput(f"{where} must be {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"{where} must be a finite number, got {value!r}")
    return value


def resolve_options(method: str, given: dict) -> dict:
    """The method's defaults updated by `given`, each value typed; unknown keys refused with the nearest one."""
    if method not in METHODS:
        hint = difflib.get_close_matches(method, list(METHODS), n=1)
        raise BadInput(f"unknown distillation method {method!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}: "
                       f"choose one of {', '.join(METHODS)} (see `edgecompress methods`)")
    known = options(METHODS[method])
    resolved = dict(known)
    for key, value in given.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            valid = ", ".join(known) or "none"
            raise BadInput(f"method {method} has no option {key!r}"
                           f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; its options: {valid}")
        resolved[key] = coerce(method, key, value, known[key])
    return resolved


def build(method: str, student: nn.Module, setup: Setup | None = None, **given) -> Distiller:
    """The method `method` around `student`, its hyperparameters the paper's defaults updated by `given`."""
    hp = resolve_options(method, given)
    hp = {k: v for k, v in hp.items() if k not in LAYER_OPTIONS}
    return METHODS[method](student, setup or Setup(num_classes=0), **hp)


def method_options(conf) -> dict:
    """The options given to the method of a [distill] config: distill.temperature/alpha for the methods that take
    them (Hinton-style KD terms), then distill.method_opts, which win."""
    cls = METHODS[conf.method]
    given = {k: v for k, v in (("temperature", conf.temperature), ("alpha", conf.alpha)) if cls.kd_config}
    return resolve_options(conf.method, {**given, **conf.method_opts})


# --- data-free (its synthesis and stage are in datafree.py) -------------------------------------------------------

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
