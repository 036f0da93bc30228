"""The distill stage's trainer on paths the method and CLI tests do not drive: teacher feature hooks for the
feature, relation and contrastive methods (CRD's per-image index included), and bf16 autocast on the CPU."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompress import config as cfg
from edgecompress import distill
from edgecompress.distill.trainer import Schedule, device_and_precision, optimizer_step
from edgecompress.errors import StageFailed
from edgecompress.models.loaders import WEIGHTS_DIR
from edgecompress.runner import RunContext, run_stage

SHIPPED_TEACHER = WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"


def distill_once(tmp_path, small_npz, method: str, precision: str = "fp32", epochs: int = 1,
                 max_grad_norm: float = 0.0, feature_cache_gb: float = 4.0) -> dict:
    config = cfg.RunConfig(data=str(small_npz))
    config.distill.max_grad_norm, config.distill.feature_cache_gb = max_grad_norm, feature_cache_gb
    config.teacher.weights = str(SHIPPED_TEACHER)
    config.distill.student, config.distill.method = "resnet_slim_050", method
    config.distill.epochs, config.distill.batch, config.distill.precision = epochs, 60, precision
    ctx = RunContext(tmp_path / method, config.validate(), quiet=True)
    run_stage(ctx, distill.STAGE)
    return json.loads((ctx.out / "distill" / "history.json").read_text())


# fitnet pairs intermediate layers through hooks on both models; crd taps the penultimate embeddings and reads
# each image's index for its memory bank
@pytest.mark.parametrize("method, term, pairs_layers", [("fitnet", "hint", True), ("crd", "crd", False)])
def test_methods_reading_teacher_features_train_through_the_stage(tmp_path, small_npz, method, term, pairs_layers):
    history = distill_once(tmp_path, small_npz, method, feature_cache_gb=0)
    assert bool(history["teacher_layers"] and history["student_layers"]) == pairs_layers
    assert history["epochs"][0]["teacher"] == "online"
    terms = [epoch[term] for epoch in history["epochs"]]
    assert all(np.isfinite(terms)) and min(terms) > 0, history["epochs"]


def test_bf16_autocast_trains_on_the_cpu(tmp_path, small_npz):
    history = distill_once(tmp_path, small_npz, "hinton", precision="bf16")
    assert history["device"] == "cpu" and history["autocast"] == "torch.bfloat16"
    assert all(np.isfinite(e["kd"]) and e["kd"] > 0 for e in history["epochs"])


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device always gets bf16 autocast; this checks the CPU rule")
    assert device_and_precision("auto")[1] == (torch.bfloat16 if cfg.cpu_has_bf16() else None)
    assert device_and_precision("fp32")[1] is None and device_and_precision("bf16")[1] == torch.bfloat16


def test_an_onnx_teacher_teaches_through_the_stage(tmp_path, small_npz):
    """An ONNX teacher runs in ONNX Runtime on the normalised images: the logits the stage caches are the torch
    teacher's, and the student trains on them."""
    import warnings

    from edgecompress import data
    from edgecompress.models.loaders import load_teacher

    meta = torch.load(SHIPPED_TEACHER, weights_only=True)["meta"]
    torch_teacher, _ = load_teacher("resnet18_half", str(SHIPPED_TEACHER), "fashion-mnist", 1, 10, meta["mean"],
                                    meta["std"])
    onnx_path = tmp_path / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_teacher.net.eval(), (torch.zeros(1, 1, 28, 28),), str(onnx_path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    config = cfg.RunConfig(data=str(small_npz))
    config.teacher.spec = str(onnx_path)
    config.preprocess.mean, config.preprocess.std = meta["mean"], meta["std"]
    config.distill.student, config.distill.epochs, config.distill.batch = "resnet_slim_050", 1, 60
    ctx = RunContext(tmp_path / "run", config.validate(), quiet=True)
    run_stage(ctx, distill.STAGE)
    cached = torch.load(ctx.out / "distill" / "teacher_logits.pt", weights_only=True)["logits"]
    with torch.no_grad():
        expected = torch_teacher(data.to_float(ctx.data.x_train))
    torch.testing.assert_close(cached, expected, rtol=1e-3, atol=1e-3)
    history = json.loads((ctx.out / "distill" / "history.json").read_text())
    assert history["teachers"] == [str(onnx_path)] and all(np.isfinite(e["kd"]) for e in history["epochs"])


def one_step(loss_of, max_grad_norm: float, lr: float = 0.01):
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = torch.optim.SGD([w], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    norm = optimizer_step(loss_of(w), opt, sched, 0, Schedule(1, lr, 0.0, 0, max_grad_norm), Path("last.ckpt"))
    return w.detach(), norm


def test_the_step_clips_the_gradient_to_max_grad_norm_and_returns_the_norm_before():
    # loss = 10 * (w . [3, -4]): gradient 10 * [3, -4], norm 50; clipped to 5 it is [3, -4]
    w, norm = one_step(lambda w: 10 * (w * torch.tensor([3.0, -4.0])).sum(), max_grad_norm=5.0)
    assert norm.item() == pytest.approx(50.0)
    assert torch.allclose(w, torch.tensor([3.0 - 0.01 * 3, -4.0 + 0.01 * 4]))
    w, norm = one_step(lambda w: 10 * (w * torch.tensor([3.0, -4.0])).sum(), max_grad_norm=0.0)  # 0: never
    assert norm.item() == pytest.approx(50.0)
    assert torch.allclose(w, torch.tensor([3.0 - 0.01 * 30, -4.0 + 0.01 * 40]))


def test_an_infinite_gradient_under_a_finite_loss_stops_the_stage():
    # d sqrt(u) / du is infinite at u = 0 while the loss is 0: clipping would turn it into NaN weights
    with pytest.raises(StageFailed, match="gradient became .*distill.max_grad_norm"):
        one_step(lambda w: (w - torch.tensor([3.0, -4.0])).sum().sqrt(), max_grad_norm=5.0)


def test_the_history_reports_gradient_norms_and_the_clipped_steps(tmp_path, small_npz):
    clipped = distill_once(tmp_path / "tiny", small_npz, "hinton", max_grad_norm=1e-4)["epochs"][0]
    free = distill_once(tmp_path / "free", small_npz, "hinton")["epochs"][0]
    assert clipped["clipped_steps"] == 1.0 and "clipped_steps" not in free
    assert 0 < free["grad_norm_p50"] <= free["grad_norm_max"] and clipped["grad_norm_p50"] > 1e-4


@pytest.mark.parametrize("method, term", [("sp", "sp"), ("crd", "crd"), ("at", "at")])
def test_cached_teacher_features_train_the_student_as_the_teacher_online_does(tmp_path, small_npz, method, term):
    """Without augmentation the teacher's features of an image never change: one teacher pass kept on disk gives
    the student the same losses, step for step, as running the teacher every step."""
    cached = distill_once(tmp_path / "cached", small_npz, method, epochs=2)
    online = distill_once(tmp_path / "online", small_npz, method, epochs=2, feature_cache_gb=0)
    assert [e["teacher"] for e in cached["epochs"]] == ["cached features"] * 2
    assert [e["teacher"] for e in online["epochs"]] == ["online"] * 2
    assert (tmp_path / "cached" / method / "distill" / "teacher_features.pt").is_file()
    for c, o in zip(cached["epochs"], online["epochs"]):
        # equal up to float rounding: the teacher ran at another batch size (other conv algorithms)
        assert c[term] == pytest.approx(o[term], rel=5e-3) and c["ce"] == pytest.approx(o["ce"], rel=5e-3), (c, o)


def test_sp_hooks_only_the_last_pair_of_layers(tmp_path, small_npz):
    history = distill_once(tmp_path, small_npz, "sp")
    assert len(history["student_layers"]) == len(history["teacher_layers"]) == 1


def test_features_over_the_cache_limit_run_the_teacher_every_step(tmp_path, small_npz):
    history = distill_once(tmp_path, small_npz, "sp", feature_cache_gb=1e-6)
    assert history["epochs"][0]["teacher"] == "online"
    assert not (tmp_path / "sp" / "distill" / "teacher_features.pt").exists()
