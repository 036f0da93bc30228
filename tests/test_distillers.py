import math

import pytest
import torch

from edgecompress import distillers
from edgecompress.errors import BadInput
from edgecompress.models import create


def test_kd_loss_matches_hand_computed_value():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    temperature = 2.0
    # softmax([1, 0]) = [e/(e+1), 1/(e+1)], softmax([0, 1]) its mirror; KL(p_t || p_s) * T^2
    p_s = [math.e / (math.e + 1), 1 / (math.e + 1)]
    p_t = [p_s[1], p_s[0]]
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s)) * temperature**2
    assert distillers.kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10)
    assert distillers.kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hinton_weights_ce_and_kd_terms():
    torch.manual_seed(0)
    student = create("resnet_slim_050", 1, 10)
    x, y, t = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), torch.randn(4, 10)
    method = distillers.build("hinton", student, temperature=4.0, alpha=0.75)
    logits, losses = method.forward_train(x, y, t)
    assert set(losses) == {"ce", "kd"}
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert losses["ce"].item() == pytest.approx(0.25 * ce.item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.75 * distillers.kd_loss(logits, t, 4.0).item(), rel=1e-5)


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError):
        distillers.register(distillers.HintonKD)
    with pytest.raises(BadInput, match="hinton"):
        distillers.build("no-such-method", create("resnet_slim_050", 1, 10))
