"""The distill stage as users run it: multi-teacher with two architectures and cross-modal KD from the CLI,
and the same training under torchrun with 2 processes (gloo) matching a single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompress import config as cfg
from edgecompress import data
from edgecompress.cli import main
from edgecompress.models import Normalized, create
from edgecompress.models.loaders import WEIGHTS_DIR

SHIPPED_TEACHER = WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"
FAST = ("[verify]\nlatency_runs_bs1 = 20\nlatency_runs_batch = 2\nwarmup_runs = 2\n"
        "[distill]\nepochs = 1\nbatch = 100\n")


@pytest.fixture(scope="module")
def fashion():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def small(fashion, tmp_path_factory) -> Path:
    """1,000 real training images (100 per class) and 300 test images."""
    i, j = data.stratified_sample(fashion.y_train, 1000, 1), data.stratified_sample(fashion.y_eval, 300, 1)
    path = tmp_path_factory.mktemp("data") / "fmnist-1k.npz"
    np.savez(path, x=fashion.x_train[i, 0].numpy(), y=fashion.y_train[i].numpy(),
             x_test=fashion.x_eval[j, 0].numpy(), y_test=fashion.y_eval[j].numpy())
    return path


def lenient_target(path: Path) -> Path:
    """x86-cpu without budgets: these runs train for seconds; they test the plumbing, not the quality."""
    text = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text().replace('name = "x86-cpu"', 'name = "t"')
    path.write_text(text.split("[budgets]")[0] + "[budgets]\nmax_accuracy_drop = 100.0\nmin_speedup = 0.0\n")
    return path


def train_second_teacher(fashion, path: Path) -> float:
    """A MobileNetV2-style teacher (another architecture than the shipped ResNet) trained for one epoch on
    6,000 real images; returns its accuracy on 1,000 test images."""
    torch.manual_seed(0)
    mean, std = data.channel_stats(fashion.x_train)
    model = Normalized(create("mobilenet_v2_050", 1, 10), mean, std)
    i = data.stratified_sample(fashion.y_train, 6000, 2)
    x, y = data.to_float(fashion.x_train[i]), fashion.y_train[i]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(0, len(y), 100):
        loss = torch.nn.functional.cross_entropy(model(x[step:step + 100]), y[step:step + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"state_dict": model.net.state_dict(), "meta": {"mean": mean, "std": std}}, path)
    j = data.stratified_sample(fashion.y_eval, 1000, 0)
    with torch.no_grad():
        return (model.eval()(data.to_float(fashion.x_eval[j])).argmax(1) == fashion.y_eval[j]).float().mean().item()


@pytest.mark.slow
def test_multi_teacher_with_two_architectures_from_the_cli(fashion, small, tmp_path):
    second = tmp_path / "mobilenet_teacher.pt"
    assert train_second_teacher(fashion, second) > 0.6  # a real teacher, not noise
    (tmp_path / "c.toml").write_text(FAST)
    run = tmp_path / "run"
    code = main(["compress", "--data", str(small), "--student", "resnet_slim_050", "--quiet",
                 "--teacher", "resnet18_half", "--teacher", "mobilenet_v2_050",
                 "--teacher-weights", str(SHIPPED_TEACHER), "--teacher-weights", str(second),
                 "--method", "multi-teacher", "--method-opt", "combine=confidence",
                 "--target", str(lenient_target(tmp_path / "t.toml")), "--config", str(tmp_path / "c.toml"),
                 "--out", str(run)])
    assert code == 0
    history = json.loads((run / "distill" / "history.json").read_text())
    assert history["method"] == "multi-teacher" and history["options"]["combine"] == "confidence"
    assert history["teachers"] == ["resnet18_half", "mobilenet_v2_050"]
    assert (run / "distill" / "teacher_logits.pt").is_file() and (run / "distill" / "teacher_logits.1.pt").is_file()
    # ten classes, 30 test images each: one class for every image scores 0.1 (this run scored 0.29 when written)
    assert json.loads((run / "verify" / "report.json").read_text())["artifact"]["accuracy"] > 0.2
    run_toml = cfg.read_toml(run / "run.toml")
    assert run_toml["teacher"]["extra"] == ["mobilenet_v2_050"]


@pytest.mark.slow
def test_cross_modal_with_a_user_pair_transform_from_the_cli(small, tmp_path):
    pair = tmp_path / "pair.py"
    pair.write_text("import torch.nn.functional as F\n\n\n"
                    "def blurred_student(x):\n"
                    "    \"\"\"The student sees a 7x7 sensor; the teacher the full image.\"\"\"\n"
                    "    low = F.interpolate(F.interpolate(x, size=(7, 7), mode='area'), size=x.shape[-2:])\n"
                    "    return low, x\n")
    (tmp_path / "c.toml").write_text(FAST)
    run = tmp_path / "run"
    code = main(["compress", "--data", str(small), "--student", "resnet_slim_050", "--quiet",
                 "--teacher-weights", str(SHIPPED_TEACHER), "--method", "cross-modal",
                 "--method-opt", f"view={pair}:blurred_student",
                 "--target", str(lenient_target(tmp_path / "t.toml")), "--config", str(tmp_path / "c.toml"),
                 "--out", str(run)])
    assert code == 0
    history = json.loads((run / "distill" / "history.json").read_text())
    assert history["options"]["view"] == f"{pair}:blurred_student"
    assert not (run / "distill" / "teacher_logits.pt").exists()  # the teacher ran on its own view each step
    assert (run / "verify" / "report.json").is_file()


@pytest.mark.slow
def test_cross_modal_builtin_view_keeps_the_teacher_cache_and_bad_view_is_refused(small, tmp_path, capsys):
    run = tmp_path / "run"
    config = cfg.RunConfig(data=str(small))
    config.teacher.weights = str(SHIPPED_TEACHER)
    config.distill.student, config.distill.epochs, config.distill.batch = "resnet_slim_050", 1, 250
    config.distill.method, config.distill.method_opts = "cross-modal", {"view": "noise", "sigma": "0.5"}
    (run).mkdir()
    (run / "run.toml").write_text(cfg.to_toml(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "edgecompress", "distill", str(run), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (run / "distill" / "teacher_logits.pt").is_file()
    assert json.loads((run / "distill" / "history.json").read_text())["options"]["sigma"] == 0.5
    config.distill.method_opts = {"view": "thermal"}
    (run / "run.toml").write_text(cfg.to_toml(config.to_dict()))
    assert main(["distill", str(run), "--quiet"]) == 2
    assert "view must be one of downsample, noise or path/to/file.py:function" in capsys.readouterr().err


NO_BN_STUDENT = '''
from torch import nn


def build():
    """A student without batch norm, so that splitting a batch across processes changes no statistic."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''


def make_run(root: Path, small: Path, student: str, method: str = "hinton") -> Path:
    config = cfg.RunConfig(data=str(small))
    config.teacher.weights = str(SHIPPED_TEACHER)
    config.distill.student, config.distill.method = student, method
    config.distill.epochs, config.distill.batch, config.distill.precision = 2, 100, "fp32"
    root.mkdir(parents=True)
    (root / "run.toml").write_text(cfg.to_toml(config.resolve_paths().to_dict()))
    return root


@pytest.mark.slow  # two torchrun processes and a single one, about a minute
def test_two_process_gloo_ddp_matches_a_single_process_run(small, tmp_path):
    (tmp_path / "student.py").write_text(NO_BN_STUDENT)
    student = f"{tmp_path / 'student.py'}:build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = make_run(tmp_path / "single", small, student), make_run(tmp_path / "ddp", small, student)
    one = subprocess.run([sys.executable, "-m", "edgecompress", "distill", str(single), "--quiet", "--trust",
                          str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "edgecompress", "distill", str(ddp), "--trust", str(tmp_path)], env=env,
                         capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = json.loads((single / "distill" / "history.json").read_text())
    h2 = json.loads((ddp / "distill" / "history.json").read_text())
    assert h1["processes"] == 1 and h2["processes"] == 2
    for e1, e2 in zip(h1["epochs"], h2["epochs"], strict=True):
        for key in ("ce", "kd", "train_top1"):
            assert e2[key] == pytest.approx(e1[key], rel=1e-3, abs=1e-4), (key, e1, e2)
    w1 = torch.load(single / "distill" / "student.pt", weights_only=True)["state_dict"]
    w2 = torch.load(ddp / "distill" / "student.pt", weights_only=True)["state_dict"]
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-4)
    assert json.loads((ddp / "distill" / "done.json").read_text())["artifact"] == "distill/student.pt"


@pytest.mark.parametrize("method", ["hinton", "fitnet"])  # cached teacher logits; the teacher run online
def test_distill_hands_the_shared_teacher_back_on_the_cpu_in_the_standard_layout(small, tmp_path, method):
    """compress shares one loaded teacher between its stages, and quantize and verify run it on the CPU: a
    teacher left on the GPU (or in channels_last) after distill failed compress at quantize on a CUDA machine."""
    from edgecompress import distill
    from edgecompress.runner import RunContext, run_stage

    config = cfg.RunConfig(data=str(small))
    config.teacher.weights = str(SHIPPED_TEACHER)
    config.distill.student, config.distill.method = "resnet_slim_050", method
    config.distill.epochs, config.distill.batch, config.distill.precision = 1, 250, "fp32"
    ctx = RunContext(tmp_path / "run", config.validate(), quiet=True)
    teacher = ctx.teacher[0]
    run_stage(ctx, distill.STAGE)
    assert ctx.teacher[0] is teacher
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in teacher.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (AMP and pinned-memory path)")
def test_distill_on_cuda_uses_amp(small, tmp_path):
    run = make_run(tmp_path / "cuda", small, "resnet_slim_050", "fitnet")
    text = (run / "run.toml").read_text().replace('precision = "fp32"', 'precision = "auto"')
    (run / "run.toml").write_text(text)
    assert main(["distill", str(run), "--quiet"]) == 0
    history = json.loads((run / "distill" / "history.json").read_text())
    assert history["device"].startswith("cuda") and history["autocast"] == "torch.bfloat16"
    assert all(np.isfinite(e["ce"]) for e in history["epochs"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (trains there, ONNX Runtime on the CPU)")
def test_compress_trains_on_cuda_and_quantizes_and_verifies_on_the_cpu(small, tmp_path):
    run = tmp_path / "run"
    assert main(["compress", "--data", str(small), "--teacher-weights", str(SHIPPED_TEACHER), "--epochs", "1",
                 "--target", str(lenient_target(tmp_path / "t.toml")), "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "distill" / "history.json").read_text())["device"].startswith("cuda")
    assert json.loads((run / "verify" / "report.json").read_text())["artifact"]["accuracy"] > 0.2  # ten classes


def test_batchnorm_adaptation_sets_the_population_statistics_of_the_final_weights(fashion_small):
    """Written from the definition: after adaptation, a BN's running mean and (unbiased) variance are the
    per-channel mean and variance of its input over all the images, whatever they were before and whatever
    its momentum (0.01 here, as torchvision's MobileNetV3 uses)."""
    from edgecompress.distill.trainer import adapt_batchnorm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3)
    bn = torch.nn.BatchNorm2d(4, momentum=0.01)
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU(), torch.nn.Dropout(0.5)).train()
    images = torch.from_numpy(fashion_small[0][:96]).unsqueeze(1)  # uint8, as the stage passes them
    assert adapt_batchnorm(model, images, 32, torch.device("cpu")) == 96
    with torch.no_grad():
        feats = conv(images.float() / 255).transpose(0, 1).reshape(4, -1)
    assert torch.allclose(bn.running_mean, feats.mean(1), atol=1e-5)
    # equal-weight average of the three batches' unbiased variances, as BatchNorm's cumulative mode keeps
    per_batch = [conv(images[i:i + 32].float() / 255).transpose(0, 1).reshape(4, -1).var(1) for i in (0, 32, 64)]
    assert torch.allclose(bn.running_var, torch.stack(per_batch).mean(0).detach(), atol=1e-5)
    assert bn.momentum == 0.01 and model.training  # restored
