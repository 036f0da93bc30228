"""Every distillation loss against its paper's formula, written here independently in plain torch (loops and
explicit sums where the method vectorises), on fixed random inputs, to 1e-5 relative."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgecompress.distill import methods
from edgecompress.distill.methods import contrastive, feature, relation, response

B, C = 6, 5
RTOL = 1e-5


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, C, generator=g) * 3, torch.randn(B, C, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 0])


def close(got: torch.Tensor, want: float) -> None:
    assert got.item() == pytest.approx(want, rel=RTOL, abs=1e-7)


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def hinton(zs: torch.Tensor, zt: torch.Tensor, t: float) -> float:
    """Hinton et al. 2015: T^2 * mean_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))."""
    return t * t * sum(kl(softmax([v / t for v in b]), softmax([v / t for v in a]))
                       for a, b in zip(zs.tolist(), zt.tolist())) / len(zs)


def standardized(z: torch.Tensor) -> torch.Tensor:
    """Sun et al. 2024: (z - mean) / (unbiased std + 1e-7), per sample."""
    rows = []
    for row in z.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        rows.append([(v - mean) / (std + 1e-7) for v in row])
    return torch.tensor(rows)


# --- response ----------------------------------------------------------------------------------------------------

def test_hinton_and_logit_standardised_kd(logits):
    zs, zt, y = logits
    close(methods.kd_loss(zs, zt, 4.0), hinton(zs, zt, 4.0))
    close(methods.kd_loss(zs, zt, 2.0, standardized=True), hinton(standardized(zs), standardized(zt), 2.0))
    student = torch.nn.Linear(3, C)
    method = methods.build("hinton", student, alpha=0.7, temperature=2.0, standardize=True)
    x = torch.randn(B, 3)
    out, losses = method.forward_train(x, y, zt)
    close(losses["kd"], 0.7 * hinton(standardized(out.detach()), standardized(zt), 2.0))
    close(losses["ce"], 0.3 * F.cross_entropy(out.detach(), y).item())


def test_dkd_and_its_standardised_form(logits):
    """Zhao et al. 2022: TCKD = KL([p_t, 1 - p_t] || [p_s, 1 - p_s]) on the target probability; NCKD = KL of the
    softmaxes over the non-target classes only; both times T^2."""
    zs, zt, y = logits
    t = 4.0

    def parts(a, b, label):
        ps, pt = softmax([v / t for v in a]), softmax([v / t for v in b])
        tckd = kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
        others = [k for k in range(C) if k != label]
        nckd = kl(softmax([b[k] / t for k in others]), softmax([a[k] / t for k in others]))
        return tckd * t * t, nckd * t * t

    want = [parts(a, b, label) for a, b, label in zip(zs.tolist(), zt.tolist(), y.tolist())]
    tckd, nckd = response.dkd_loss(zs, zt, y, t)
    close(tckd, sum(w[0] for w in want) / B)
    close(nckd, sum(w[1] for w in want) / B)
    method = methods.build("dkd", torch.nn.Identity(), standardize=True, temperature=t, beta=8.0, warmup=0.0)
    _, losses = method.forward_train(zs, y, zt)
    want = [parts(a, b, label) for a, b, label in zip(standardized(zs).tolist(), standardized(zt).tolist(), y.tolist())]
    close(losses["nckd"], 8.0 * sum(w[1] for w in want) / B)


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((u - ma) * (v - mb) for u, v in zip(a, b))
    return num / (math.sqrt(sum((u - ma) ** 2 for u in a)) * math.sqrt(sum((v - mb) ** 2 for v in b)) + 1e-8)


def test_dist(logits):
    """Huang et al. 2022: inter = 1 - mean over samples of the Pearson correlation of the two class
    distributions; intra = 1 - mean over classes of the correlation across the batch; both times T^2."""
    zs, zt, y = logits
    t = 4.0
    ps = [softmax([v / t for v in row]) for row in zs.tolist()]
    pt = [softmax([v / t for v in row]) for row in zt.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt)) / B
    intra = 1 - sum(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in range(C)) / C
    got_inter, got_intra = response.dist_losses(zs, zt, t)
    close(got_inter, inter * t * t)
    close(got_intra, intra * t * t)
    method = methods.build("dist", torch.nn.Identity(), beta=2.0, gamma=2.0, temperature=t)
    _, losses = method.forward_train(zs, y, zt)
    close(losses["inter"], 2.0 * inter * t * t)
    close(losses["intra"], 2.0 * intra * t * t)


def test_mlkd(logits):
    """Jin et al. 2023: per temperature, instance KD (T^2 KL), batch-level ||P_t P_t^T - P_s P_s^T||^2 / B and
    class-level ||P_t^T P_t - P_s^T P_s||^2 / C, summed over the temperatures."""
    zs, zt, y = logits
    want = {"instance": 0.0, "batch": 0.0, "class": 0.0}
    for t in (2.0, 3.0, 4.0, 5.0, 6.0):
        ps = [softmax([v / t for v in row]) for row in zs.tolist()]
        pt = [softmax([v / t for v in row]) for row in zt.tolist()]
        want["instance"] += hinton(zs, zt, t)
        want["batch"] += sum((sum(pt[i][c] * pt[j][c] for c in range(C)) - sum(ps[i][c] * ps[j][c] for c in range(C)))
                             ** 2 for i in range(B) for j in range(B)) / B
        want["class"] += sum((sum(pt[i][a] * pt[i][b] for i in range(B)) - sum(ps[i][a] * ps[i][b] for i in range(B)))
                             ** 2 for a in range(C) for b in range(C)) / C
    _, losses = methods.build("mlkd", torch.nn.Identity(), kd_weight=0.9, class_weight=1.0).forward_train(zs, y, zt)
    for key, value in want.items():  # at the authors' weights
        close(losses[key], 0.9 * value)
    close(losses["ce"], 0.1 * F.cross_entropy(zs, y).item())
    _, losses = methods.build("mlkd", torch.nn.Identity()).forward_train(zs, y, zt)  # the tuned defaults
    close(losses["class"], 0.2 * 0.01 * want["class"])
    close(losses["batch"], 0.2 * want["batch"])
    close(losses["instance"], 0.2 * want["instance"])


# --- feature -----------------------------------------------------------------------------------------------------

def test_attention_transfer_weight_is_beta_on_the_mean_squared_difference():
    """Zagoruyko & Komodakis as their code, RepDistiller and mdistiller weigh it: beta * sum over stages of the
    mean over batch and positions of (Q_s - Q_t)^2, Q = vec(mean_c F^2) / ||vec(mean_c F^2)||, beta = 1000."""
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(B, 4, 5, 5, generator=g), torch.randn(B, 8, 3, 3, generator=g)]
    ft = [torch.randn(B, 6, 5, 5, generator=g), torch.randn(B, 2, 3, 3, generator=g)]
    want = 0.0
    for s, t in zip(fs, ft):
        for i in range(B):
            qs = [sum(s[i, c, h, w].item() ** 2 for c in range(s.shape[1])) / s.shape[1]
                  for h in range(s.shape[2]) for w in range(s.shape[3])]
            qt = [sum(t[i, c, h, w].item() ** 2 for c in range(t.shape[1])) / t.shape[1]
                  for h in range(t.shape[2]) for w in range(t.shape[3])]
            ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
            want += sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt)) / len(qs) / B
    method = methods.build("at", torch.nn.Identity(), beta=1000.0)
    method.student_forward = lambda x: (x, methods.Features(fs))
    _, losses = method.forward_train(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                                     teacher=methods.Features(ft))
    close(losses["at"], 1000.0 * want)


def test_fitnet_regressor_is_conv_bn_relu_and_the_hint_loss_its_mse():
    g = torch.Generator().manual_seed(2)
    fs, ft = torch.randn(B, 4, 3, 3, generator=g), torch.randn(B, 6, 3, 3, generator=g)
    setup = methods.Setup(num_classes=C, student_shapes=[(4, 3, 3)], teacher_shapes=[(6, 3, 3)])
    method = methods.build("fitnet", torch.nn.Identity(), setup, weight=100.0)
    kinds = [type(m).__name__ for m in method.regressor]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]
    method.student_forward = lambda x: (x, methods.Features([fs]))
    _, losses = method.forward_train(torch.zeros(B, C), torch.zeros(B, dtype=torch.long),
                                     teacher=methods.Features([ft]))
    with torch.no_grad():
        guided = method.regressor(fs)
    close(losses["hint"], 100.0 * ((guided - ft) ** 2).sum().item() / guided.numel())


def test_reviewkd_hierarchical_context_loss():
    """Chen et al. 2021: MSE of the maps plus the 4x4, 2x2, 1x1 pooled MSEs weighted 1/2, 1/4, 1/8 (levels smaller
    than the map), divided by the weights' sum."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)

    def pooled(x, size):  # average over equal blocks (8 divides by 4, 2, 1)
        k = x.shape[-1] // size
        return torch.tensor([[[[x[n, c, i * k:(i + 1) * k, j * k:(j + 1) * k].mean().item() for j in range(size)]
                               for i in range(size)] for c in range(x.shape[1])] for n in range(x.shape[0])])

    terms = [(1.0, ((s - t) ** 2).mean().item())]
    for weight, size in ((0.5, 4), (0.25, 2), (0.125, 1)):
        terms.append((weight, ((pooled(s, size) - pooled(t, size)) ** 2).mean().item()))
    close(feature.hcl_loss(s, t), sum(w * v for w, v in terms) / sum(w for w, _ in terms))
    small = feature.hcl_loss(s[..., :2, :2], t[..., :2, :2])  # 2x2 maps: only the 1x1 level is smaller
    close(small, (((s[..., :2, :2] - t[..., :2, :2]) ** 2).mean().item()
                  + 0.5 * ((s[..., :2, :2].mean((2, 3)) - t[..., :2, :2].mean((2, 3))) ** 2).mean().item()) / 1.5)


# --- relation ----------------------------------------------------------------------------------------------------

def test_pkt_is_the_mean_over_all_pairs():
    """Passalis & Tefas as their code and RepDistiller compute it: mean over the B x B matrix of
    P_t log((P_t + eps) / (P_s + eps)), P(i|j) = K(i, j) / sum_k K(k, j), K = (cos + 1) / 2."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(B, 7, generator=g), torch.randn(B, 9, generator=g)

    def conditional(e):
        rows = e.tolist()
        norm = [math.sqrt(sum(v * v for v in r)) for r in rows]
        k = [[(sum(a * b for a, b in zip(rows[i], rows[j])) / (norm[i] * norm[j]) + 1) / 2 for j in range(B)]
             for i in range(B)]
        return [[k[i][j] / sum(k[i]) for j in range(B)] for i in range(B)]

    ps, pt = conditional(s), conditional(t)
    want = sum(pt[i][j] * math.log((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7)) for i in range(B) for j in range(B)) / B ** 2
    close(relation.pkt_loss(s, t), want)


def test_rkd_distance_and_angle():
    """Park et al. 2019: Huber loss between mean-normalised pairwise distances, and between the cosines of the
    angles formed by every triplet (at the middle point)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    n = len(s)

    def distances(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def huber(a, b):
        diff = abs(a - b)
        return 0.5 * diff * diff if diff < 1 else diff - 0.5

    ds, dt = distances(s.tolist()), distances(t.tolist())
    want_distance = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n ** 2

    def cosines(e):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(e[i], e[j])]
                    v = [a - b for a, b in zip(e[k], e[j])]
                    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
                    out.append(sum(a * b for a, b in zip(u, v)) / max(nu, 1e-12) / max(nv, 1e-12))
        return out

    cs, ct = cosines(s.tolist()), cosines(t.tolist())
    want_angle = sum(huber(a, b) for a, b in zip(cs, ct)) / len(cs)
    distance, angle = relation.rkd_losses(s, t)
    close(distance, want_distance)
    close(angle, want_angle)


def test_similarity_preserving():
    """Tung & Mori 2019: ||G_s - G_t||_F^2 / b^2, G = F F^T with each row L2-normalised."""
    g = torch.Generator().manual_seed(6)
    fs, ft = torch.randn(B, 2, 3, 3, generator=g), torch.randn(B, 4, 3, 3, generator=g)

    def gram(f):
        rows = f.flatten(1).tolist()
        gm = [[sum(a * b for a, b in zip(rows[i], rows[j])) for j in range(B)] for i in range(B)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in gm]

    gs, gt = gram(fs), gram(ft)
    want = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(B) for j in range(B)) / B ** 2
    close(relation.similarity_loss(fs, ft), want)


# --- contrastive -------------------------------------------------------------------------------------------------

def test_crd_contrasts_each_anchor_with_other_class_negatives_only():
    """Tian et al. 2020 (InfoNCE form): -log(e^{a.p/tau} / (e^{a.p/tau} + sum over negatives of other classes of
    e^{a.n/tau})), averaged over anchors."""
    g = torch.Generator().manual_seed(7)
    anchors = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    positives = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    negatives = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    labels, negative_labels, tau = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]), 0.07
    want = 0.0
    for a, p, label in zip(anchors.tolist(), positives.tolist(), labels.tolist()):
        pos = math.exp(sum(u * v for u, v in zip(a, p)) / tau)
        neg = sum(math.exp(sum(u * v for u, v in zip(a, n)) / tau)
                  for n, nl in zip(negatives.tolist(), negative_labels.tolist()) if nl != label)
        want += -math.log(pos / (pos + neg)) / len(anchors)
    close(contrastive.crd_contrast(anchors, positives, negatives, labels, negative_labels, tau), want)


def test_crd_loss_ignores_what_the_bank_holds_for_the_anchors_class():
    """Changing the memory entries of the batch's own class (other samples than the batch's) must not change the
    loss: they are never negatives. On the code before the fix they were drawn like any other sample."""
    labels = torch.tensor([0] * 10 + [1] * 10)
    setup = methods.Setup(num_classes=2, train_labels=labels, student_embedding_dim=4, teacher_embedding_dim=4)
    torch.manual_seed(0)
    method = methods.build("crd", torch.nn.Identity(), setup, negatives=8)
    method.student_forward = lambda x: (x, methods.Features(embedding=x))
    x, y, index = torch.randn(3, 4), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])
    teacher = methods.Features(embedding=torch.randn(3, 4))
    results = []
    for change in (False, True):
        bank = method.bank.clone()
        if change:
            method.bank[:, 3:10] = F.normalize(torch.randn(2, 7, method.bank.shape[2]), dim=2)
        torch.manual_seed(1)
        results.append(method.forward_train(x, y, teacher=teacher, index=index)[1]["crd"].item())
        method.bank.copy_(bank)
    assert results[0] == pytest.approx(results[1], rel=1e-6)


# --- online, self, multi-teacher, adversarial, cross-modal -------------------------------------------------------

def test_mutual_learning(logits):
    """Zhang et al. 2018: L_k = CE(z_k, y) + mean over the other networks l of KL(p_l || p_k), at T = 1."""
    zs, zt, y = logits
    peer = torch.nn.Linear(C, C)
    setup = methods.Setup(num_classes=C, new_student=lambda: peer)
    method = methods.build("dml", torch.nn.Identity(), setup)
    _, losses = method.forward_train(zs, y)
    z_peer = peer(zs).detach()
    close(losses["kl_student"], hinton(zs, z_peer, 1.0))
    close(losses["kl_peer1"], hinton(z_peer, zs, 1.0))


def test_self_distillation_feature_term_is_the_norm_over_the_batch():
    """BYOT as its authors' code computes the feature term: lambda * ||F_i - F_C||_2 over the whole batch."""
    g = torch.Generator().manual_seed(8)
    maps = [torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 5, 2, 2, generator=g)]
    setup = methods.Setup(num_classes=C, student_stage_shapes=[(3, 4, 4), (5, 2, 2)])
    method = methods.build("self-distill", torch.nn.Identity(), setup, feature_weight=0.03)  # the authors' lambda
    method.student_forward = lambda x: (x, methods.Features(maps))
    zs = torch.randn(B, C, generator=g)
    _, losses = method.forward_train(zs, torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        f = method.bottlenecks[0](maps[0])
    want = math.sqrt(sum((a - b) ** 2 for a, b in zip(f.flatten().tolist(), maps[1].flatten().tolist())))
    close(losses["feat_head0"], 0.03 * want)


def test_multi_teacher_average_confidence_and_standardised(logits):
    """You et al. 2017 (average of the teachers' softened outputs), Zhang et al. 2022 (weights
    (1 - softmax_k(CE_k)) / (K - 1)), and the same with standardised logits."""
    zs, zt, y = logits
    z2 = zt.flip(1)
    t = 4.0
    stacked = torch.stack([zt, z2])

    def expected(student, teachers, weights):
        total = 0.0
        for i in range(B):
            target = [sum(w[i] * softmax([v / t for v in z[i].tolist()])[c] for w, z in zip(weights, teachers))
                      for c in range(C)]
            total += kl(target, softmax([v / t for v in student[i].tolist()]))
        return t * t * total / B

    half = [[0.5] * B, [0.5] * B]
    _, losses = methods.build("multi-teacher", torch.nn.Identity()).forward_train(zs, y, stacked)
    close(losses["kd"], 0.9 * expected(zs, [zt, z2], half))
    ce_k = [[-math.log(softmax(z[i].tolist())[y[i]]) for i in range(B)] for z in (zt, z2)]
    weights = [[(1 - math.exp(ce_k[k][i]) / (math.exp(ce_k[0][i]) + math.exp(ce_k[1][i]))) / 1 for i in range(B)]
               for k in range(2)]
    _, losses = methods.build("multi-teacher", torch.nn.Identity(), combine="confidence").forward_train(zs, y, stacked)
    close(losses["kd"], 0.9 * expected(zs, [zt, z2], weights))
    _, losses = methods.build("multi-teacher", torch.nn.Identity(), standardize=True).forward_train(zs, y, stacked)
    close(losses["kd"], 0.9 * expected(standardized(zs), [standardized(zt), standardized(z2)], half))


def test_adversarial(logits):
    """Xu et al. 2018: the student's term BCE(D(z_s, y), 1); the discriminator's BCE(D(z_t, y), 1) +
    BCE(D(z_s, y), 0), with D scoring (softmax(z), one-hot y)."""
    zs, zt, y = logits
    method = methods.build("adversarial", torch.nn.Identity(), methods.Setup(num_classes=C), hidden=8)
    _, losses = method.forward_train(zs, y, zt)

    def score(z):
        return method.discriminator.net(torch.cat([F.softmax(z, 1), F.one_hot(y, C).float()], 1)).squeeze(1).tolist()

    def bce(scores, target):
        return sum(-(target * math.log(1 / (1 + math.exp(-s))) + (1 - target) * math.log(1 - 1 / (1 + math.exp(-s))))
                   for s in scores) / len(scores)

    with torch.no_grad():
        fake, real = score(zs), score(zt)
    close(losses["adv"], bce(fake, 1.0))
    close(losses["disc"], bce(real, 1.0) + bce(fake, 0.0))


def test_cross_modal_and_data_free_are_hinton_kd_on_their_inputs(logits):
    zs, zt, y = logits
    _, losses = methods.build("cross-modal", torch.nn.Identity(), methods.Setup(num_classes=C)).forward_train(zs, y, zt)
    close(losses["kd"], 0.9 * hinton(zs, zt, 4.0))
    _, losses = methods.build("datafree", torch.nn.Identity()).forward_train(zs, None, zt)
    close(losses["kd"], hinton(zs, zt, 4.0))
