"""The distillation methods: golden values for KD and DKD computed by hand, and a contract every registered
method meets on real Fashion-MNIST images (finite, differentiable, the loss falls over a few steps)."""
import math

import pytest
import torch

from edgecompress import distill
from edgecompress.distill import methods as distillers
from edgecompress.errors import BadInput
from edgecompress.models import create
from edgecompress.models.loaders import build_model, load_teacher

MEAN, STD = [0.286], [0.353]  # Fashion-MNIST's pixel statistics


pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kd_loss_matches_hand_computed_value():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    temperature = 2.0
    # softmax([1, 0]) = [e/(e+1), 1/(e+1)], softmax([0, 1]) its mirror; KL(p_t || p_s) * T^2
    p_s = [math.e / (math.e + 1), 1 / (math.e + 1)]
    p_t = [p_s[1], p_s[0]]
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s)) * temperature**2
    assert distillers.kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_averages_over_the_batch():
    s, t = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
    expected = sum(kl(softmax(b), softmax(a)) for a, b in zip(s, t)) / 2  # T = 1
    assert distillers.kd_loss(torch.tensor(s), torch.tensor(t), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10)
    assert distillers.kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_terms_match_hand_computed_values():
    z_s, z_t, target, temperature = [2.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5], 1, 2.0
    p_s, p_t = softmax([v / temperature for v in z_s]), softmax([v / temperature for v in z_t])
    # TCKD: KL between the binary (target, rest) distributions
    tckd = kl([p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]]) * temperature**2
    # NCKD: KL between the distributions renormalised over the three non-target classes
    rest = [i for i in range(4) if i != target]
    q_s, q_t = softmax([z_s[i] / temperature for i in rest]), softmax([z_t[i] / temperature for i in rest])
    nckd = kl(q_t, q_s) * temperature**2
    got = distillers.dkd_loss(torch.tensor([z_s]), torch.tensor([z_t]), torch.tensor([target]), temperature)
    assert got[0].item() == pytest.approx(tckd, rel=1e-5)
    assert got[1].item() == pytest.approx(nckd, rel=1e-5)


def test_dkd_total_weights_and_warmup():
    torch.manual_seed(0)
    student = create("resnet_slim_050", 1, 10)
    x, y, t = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), torch.randn(4, 10)
    method = distillers.build("dkd", student, alpha=1.0, beta=8.0, warmup=0.5)
    method.progress = 0.25  # half-way through the warm-up: half the weight
    logits, losses = method.forward_train(x, y, t)
    tckd, nckd = distillers.dkd_loss(logits, t, y, 4.0)
    assert losses["tckd"].item() == pytest.approx(0.5 * tckd.item(), rel=1e-5)
    assert losses["nckd"].item() == pytest.approx(0.5 * 8.0 * nckd.item(), rel=1e-5)


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


def test_confidence_weights_favour_the_teacher_right_on_the_label():
    right, wrong = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    w = distillers.confidence_weights(torch.stack([right, wrong]), torch.tensor([0]))
    ce_right, ce_wrong = -math.log(softmax([5, 0])[0]), -math.log(softmax([0, 5])[0])
    expected_right = 1 - math.exp(ce_right) / (math.exp(ce_right) + math.exp(ce_wrong))  # (K - 1) = 1
    assert w[0, 0].item() == pytest.approx(expected_right, rel=1e-5) and w[0, 0] > w[1, 0]
    assert (w.sum(0) - 1).abs().max() < 1e-6


def test_registry_refuses_duplicates_unknown_names_and_options():
    with pytest.raises(ValueError):
        distillers.register(distillers.METHODS["hinton"])
    with pytest.raises(BadInput, match="did you mean 'hinton'"):
        distillers.build("hintn", create("resnet_slim_050", 1, 10))
    with pytest.raises(BadInput, match="did you mean 'temperature'"):
        distillers.resolve_options("hinton", {"temprature": "2"})
    with pytest.raises(BadInput, match="must be float"):
        distillers.resolve_options("hinton", {"temperature": "hot"})
    assert distillers.resolve_options("fitnet", {"student_layers": "stages.0,stages.1"})["student_layers"] == \
        ["stages.0", "stages.1"]


def test_every_method_documents_its_paper_and_loss():
    for name, cls in distillers.METHODS.items():
        assert cls.name == name and cls.family and cls.paper, name
        if name != "none":
            assert cls.__doc__ and "L" in cls.__doc__ and any(v in cls.__doc__ for v in ("arXiv", "KDD", "CVPR")), name


@pytest.fixture(scope="module")
def real_batch(fashion_small):
    x, y = fashion_small
    pick = torch.arange(0, 300, 5)  # 60 images, 6 of each class
    return torch.from_numpy(x).float().div(255)[pick, None], torch.from_numpy(y)[pick]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("resnet18_half", "", "fashion-mnist", 1, 10, MEAN, STD)[0]


def student_model() -> torch.nn.Module:
    return build_model("resnet_slim_050", "", 1, 10, MEAN, STD, "student")[0]


CONTRACT = [name for name, cls in distillers.METHODS.items() if not cls.supplies_inputs]


@pytest.mark.parametrize("method", CONTRACT)
def test_method_contract_on_real_images(method, real_batch, teacher):
    """Finite, differentiable losses that fall over a few SGD steps on one real batch."""
    x, y = real_batch
    cls = distillers.METHODS[method]
    torch.manual_seed(0)
    prepared = distill.prepare(method, distillers.resolve_options(method, {}), student_model(), teacher, 10, y,
                               student_model, x[:2])
    d = prepared.distiller
    views = distill.pair_transform(d)
    x_s, x_t = views(x) if views else (x, x)
    with torch.no_grad():
        t_logits = teacher(x_t)
        t_feats = prepared.teacher_tap.take() if prepared.teacher_tap else None
        if cls.many_teachers:  # a second, different teacher: an untrained slim network
            t_logits = torch.stack([t_logits, student_model().eval()(x_t)])
    opt = torch.optim.SGD(d.parameters(), lr=0.002, momentum=0.9)  # small: the relation losses' paper weights are large at init
    index = torch.arange(len(y))
    totals = []
    for _ in range(8):
        logits, losses = d.forward_train(x_s, y, t_logits if cls.uses_teacher else None, t_feats, index)
        assert logits.shape == (len(y), 10) and losses
        for name, value in losses.items():
            assert value.dim() == 0 and torch.isfinite(value), f"{method}: {name} = {value}"
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        grads = [p.grad for p in d.student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        opt.step()
        totals.append(total.item())
    assert totals[-1] < totals[0], f"{method}: loss did not fall: {totals}"


def test_onnx_teacher_is_refused_for_feature_methods(tmp_path):
    """Checked by the trainer before any training: one line naming the method and the fix."""
    from edgecompress.config import RunConfig
    from edgecompress.runner import RunContext

    import numpy as np
    import warnings

    onnx_path = tmp_path / "t.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(create("resnet_slim_050", 1, 10).eval(), (torch.zeros(1, 1, 28, 28),), str(onnx_path),
                          dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), y=np.arange(60) % 10)
    config = RunConfig(data=str(data))
    config.teacher.spec, config.distill.method, config.distill.student = str(onnx_path), "at", "resnet_slim_050"
    with pytest.raises(BadInput, match="needs the teacher's intermediate features.*onnx teacher"):
        distill.run(RunContext(tmp_path / "run", config, quiet=True))


def test_methods_command_lists_every_method_with_its_options(capsys):
    from edgecompress.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in distillers.METHODS.items():
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert cls.family in line and cls.paper in line
    assert "temperature=4 alpha=0.9" in out
    assert "beta=2 " in next(line for line in out.splitlines() if line.startswith("dkd "))


@pytest.mark.parametrize("args, needle", [
    (["--method", "hintn"], "unknown distillation method 'hintn' (did you mean 'hinton'?)"),
    (["--method-opt", "temperature"], "--method-opt 'temperature' is not key=value"),
    (["--method-opt", "temprature=2"], "method hinton has no option 'temprature' (did you mean 'temperature'?)"),
    (["--method", "dkd", "--method-opt", "beta=lots"], "--method-opt beta for dkd must be float, got 'lots'"),
    (["--teacher", "resnet18_half", "--teacher", "resnet18", "--teacher-weights", "a.pt"],
     "2 --teacher but 1 --teacher-weights"),
])
def test_bad_method_flags_exit_2_with_one_line(args, needle, tmp_path, capsys):
    from edgecompress.cli import main

    assert main(["compress", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run").exists()
