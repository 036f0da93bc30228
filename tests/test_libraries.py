"""torchvision:NAME and timm:NAME models (models/libraries.py) through the loaders, the layer pairing, the
contract resolution and whole `compress` runs on photos; and the core without the vision extra."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgecompress.cli import main
from edgecompress.errors import BadInput

torchvision = pytest.importorskip("torchvision", reason="needs the vision extra (pip install '.[vision]')")
timm = pytest.importorskip("timm", reason="needs the vision extra (pip install '.[vision]')")

from edgecompress.distill.layers import pair_layers, stage_ends  # noqa: E402
from edgecompress.kernels import kernel_report  # noqa: E402
from edgecompress.models import libraries, train_teacher  # noqa: E402
from edgecompress.models.loaders import build_model, load_teacher, teacher_preprocess  # noqa: E402
from edgecompress.select import candidates  # noqa: E402

from testkit import FAST_VERIFY, lenient_target, write_photo_folder  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _grey_images(fashion_small, n=4) -> torch.Tensor:
    return torch.from_numpy(fashion_small[0][:n]).unsqueeze(1).float() / 255


# --- building ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:efficientnet_lite0"])
def test_library_models_take_the_data_s_channels_and_classes(spec, fashion_small):
    model, info = build_model(spec, "", 1, 7, [0.286], [0.353], "student")
    assert info["kind"] == spec.partition(":")[0]
    x = torch.nn.functional.interpolate(_grey_images(fashion_small), size=64)
    assert model(x).shape == (4, 7)


def test_an_unknown_architecture_is_one_line_with_the_nearest_names():
    with pytest.raises(BadInput, match=r"torchvision has no classification model 'resnet19' \(did you mean resnet18"):
        build_model("torchvision:resnet19", "", 3, 10, IMAGENET_MEAN, IMAGENET_STD, "student")
    with pytest.raises(BadInput, match="timm has no classification model"):
        libraries.check("timm:not_a_model_at_all")


def test_a_library_teacher_without_weights_is_refused_not_downloaded():
    with pytest.raises(BadInput, match="needs its trained weights: pass --teacher-weights"):
        load_teacher("torchvision:resnet18", "", "photos", 3, 10, IMAGENET_MEAN, IMAGENET_STD)


def test_weights_saved_from_the_library_model_load_under_every_wrapper(tmp_path, fashion_small):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "t.pt")
    model, info = build_model("torchvision:resnet18", str(tmp_path / "t.pt"), 3, 10, IMAGENET_MEAN, IMAGENET_STD,
                              "teacher")
    x = torch.nn.functional.interpolate(_grey_images(fashion_small), size=64).expand(-1, 3, -1, -1)
    expected = source((x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert info["checkpoint_key"] == "model"


# --- the preprocessing the libraries record ----------------------------------------------------------------------

# Written from the libraries' documentation, not from the code under test: timm's pretrained_cfg for
# efficientnet_lite0 (224 px, crop_pct 0.875, bicubic, ImageNet statistics) gives a 256-px resize (floor(224 /
# 0.875)); torchvision's weights enums give resnet18 crop 224 / resize 256 / bilinear and regnet_x_400mf's V2
# recipe crop 224 / resize 232.
@pytest.mark.parametrize("spec, size, resize, interpolation", [
    ("timm:efficientnet_lite0", [224, 224], 256, "bicubic"),
    ("torchvision:resnet18", [224, 224], 256, "bilinear"),
    ("torchvision:regnet_x_400mf", [224, 224], 232, "bilinear")])
def test_the_teacher_contract_comes_from_the_library_s_recipe(spec, size, resize, interpolation):
    fields, source = teacher_preprocess(spec, "", "photos")
    assert fields == {"size": size, "resize": resize, "interpolation": interpolation, "mean": IMAGENET_MEAN,
                      "std": IMAGENET_STD}
    assert spec in source


def test_a_checkpoint_s_own_record_wins_over_the_library_s(tmp_path):
    meta = {"input_size": [64, 64], "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
            "preprocess": {"size": [64, 64], "resize": 73, "interpolation": "bilinear"}}
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=10).state_dict(), "meta": meta},
               tmp_path / "t.pt")
    fields, source = teacher_preprocess("torchvision:resnet18", str(tmp_path / "t.pt"), "photos")
    assert fields["size"] == [64, 64] and fields["resize"] == 73 and fields["mean"] == [0.5] * 3
    assert "t.pt" in source


# --- feature pairing ----------------------------------------------------------------------------------------------

def test_stage_ends_of_a_timm_model_are_its_feature_info_and_pair_with_a_torchvision_teacher():
    x = torch.rand(2, 3, 64, 64)
    student, _ = build_model("timm:mobilenetv4_conv_small", "", 3, 10, IMAGENET_MEAN, IMAGENET_STD, "student")
    teacher, _ = build_model("torchvision:resnet18", "", 3, 10, IMAGENET_MEAN, IMAGENET_STD, "teacher")
    recorded = [f"net.{i['module']}" for i in student.net.feature_info]
    assert [p for p, _ in stage_ends(student, x)] == recorded
    assert [p for p, _ in stage_ends(teacher, x)] == ["net.layer1.1", "net.layer2.1", "net.layer3.1", "net.layer4.1"]
    s_layers, t_layers = pair_layers(student, teacher, {}, x)
    # paired by spatial size: 16, 8, 4 and 2 px at 64-px input
    assert s_layers == ["net.blocks.0", "net.blocks.1", "net.blocks.2", "net.blocks.4"]
    assert t_layers == ["net.layer1.1", "net.layer2.1", "net.layer3.1", "net.layer4.1"]


def test_auto_selection_considers_photo_students_only_at_photo_sizes():
    at_64 = candidates(30_000_000, (3, 64, 64))
    assert set(libraries.PHOTO_STUDENTS) <= set(at_64)
    assert not set(libraries.PHOTO_STUDENTS) & set(candidates(30_000_000, (1, 28, 28)))
    assert "torchvision:resnet18" not in candidates(11_000_000, (3, 64, 64))  # not smaller than such a teacher


# --- whole runs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory, fashion_raw) -> Path:
    """800 training and 100 test photos of 72-120 px (Fashion-MNIST's real images, RGB-tinted JPEGs)."""
    root = tmp_path_factory.mktemp("photos")
    x, y = fashion_raw["x_train"], fashion_raw["y_train"]
    tr = np.concatenate([np.flatnonzero(y == c)[:80] for c in range(10)])
    te = np.concatenate([np.flatnonzero(fashion_raw["y_test"] == c)[:10] for c in range(10)])
    write_photo_folder(root / "train", x[tr], y[tr], CLASSES)
    write_photo_folder(root / "test", fashion_raw["x_test"][te], fashion_raw["y_test"][te], CLASSES, seed=1)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Every way out of the process fails and is recorded: the run under test must not need any."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access during a test run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _compress(tmp_path, photos, teacher, weights, student, *extra) -> tuple[int, dict]:
    config = tmp_path / "config.toml"
    config.write_text(FAST_VERIFY + "[distill]\nbatch = 32\n")  # 25 steps an epoch on these 800 photos
    code = main(["compress", "--teacher", teacher, "--teacher-weights", str(weights), "--student", student,
                 "--data", str(photos), "--input-size", "64", "--epochs", "8", "--config", str(config),
                 "--target", str(lenient_target(tmp_path / "target.toml")), "--out", str(tmp_path / "run"),
                 "--quiet", *extra])
    report = tmp_path / "run" / "verify" / "report.json"
    return code, json.loads(report.read_text()) if report.is_file() else {}


def _check_artifact(run: Path, report: dict) -> None:
    artifact = run / "export" / "test-cpu" / "model.onnx"
    dims = [d.dim_value for d in onnx.load(str(artifact)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 64]
    kernels = kernel_report(artifact)
    # every convolution and Gemm runs an int8 kernel, but those the quantize stage chose to keep in float
    # (the excluded nodes also name the activations kept in float with them: count the weighted ones)
    kept = [n for n in report["quantization"]["excluded_nodes"] if n.rsplit("/", 1)[-1].startswith(("Conv", "Gemm",
                                                                                                      "MatMul"))]
    assert kernels["int8_compute_layers"] > 10
    assert len(kernels["float_compute_layers"]) == len(kept), (kernels["float_compute_layers"], kept)
    assert report["data"]["preprocess"]["size"] == [64, 64]
    # A few hundred steps from scratch teach these students little, but what they learnt survives to the artifact:
    # above chance (10%), and not collapsed onto one class, as a MobileNetV3 exported with running statistics that
    # trail its weights (BN momentum 0.01) is: 10% top-1, every image one class, before BN adaptation.
    per_class = report["artifact"]["per_class_accuracy"]
    assert report["artifact"]["accuracy"] >= 0.15, report["artifact"]["accuracy"]
    assert sum(a > 0 for a in per_class) >= 4, per_class


@pytest.mark.slow
def test_compress_a_torchvision_pair_on_photos_without_the_network(tmp_path, photos, no_network):
    weights = train_teacher.train("torchvision:resnet18", str(photos), 3, 0, 32, 0.05, [64], tmp_path / "t.pt")
    code, report = _compress(tmp_path, photos, "torchvision:resnet18", weights, "torchvision:mobilenet_v3_small")
    assert code == 0
    _check_artifact(tmp_path / "run", report)
    # the contract: the size asked, the rest from the teacher checkpoint train_teacher wrote (its recipe's
    # 256/224 resize ratio at 64 px: 73, ImageNet statistics)
    assert report["data"]["preprocess"]["resize"] == 73 and report["data"]["preprocess"]["mean"] == IMAGENET_MEAN
    assert report["teacher"]["checkpoint_key"] == "state_dict"  # train_teacher's {"state_dict", "meta"}
    assert no_network == []


@pytest.mark.slow
def test_compress_a_timm_pair_with_a_feature_method_without_the_network(tmp_path, photos, no_network):
    weights = train_teacher.train("timm:resnet18", str(photos), 3, 0, 32, 0.05, [64], tmp_path / "t.pt")
    code, report = _compress(tmp_path, photos, "timm:resnet18", weights, "timm:efficientnet_lite0",
                             "--method", "fitnet")
    assert code == 0
    _check_artifact(tmp_path / "run", report)
    history = json.loads((tmp_path / "run" / "distill" / "history.json").read_text())
    student = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    assert history["student_layers"] == [f"net.{i['module']}" for i in student.feature_info]
    assert no_network == []


# --- without the extra --------------------------------------------------------------------------------------------

WITHOUT_EXTRA = ("import sys; sys.modules['torchvision'] = None; sys.modules['timm'] = None; "
                 "from edgecompress.cli import main; sys.exit(main(sys.argv[1:]))")


def test_without_the_extra_a_library_spec_is_one_line_saying_how_to_install_it(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA, "compress", "--student",
                           "torchvision:mobilenet_v3_small", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgecompress[vision]'" in lines[0], done.stderr
    assert not (tmp_path / "run" / "distill").exists()  # refused before any stage ran


def test_without_the_extra_the_zoo_lists_and_says_what_is_missing():
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA, "models"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resnet_fast_100" in done.stdout and "not installed" in done.stdout


def test_qat_folds_timm_batchnorm_with_its_activation_like_the_onnx_export():
    """timm's BatchNormAct2d (BatchNorm2d subclass with the activation inside) is folded into its conv for QAT,
    as the ONNX export folds it: otherwise QAT's layers are not the exported graph's and QAT cannot start."""
    from edgecompress import qat

    torch.manual_seed(0)
    model, _ = build_model("timm:efficientnet_lite0", "", 3, 10, IMAGENET_MEAN, IMAGENET_STD, "student")
    for m in model.modules():  # statistics other than the defaults, so an unfolded or lost BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    prepared = qat.prepare(model.eval(), signed_activations=False)
    folded = qat.float_copy(prepared).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-3, atol=1e-3)
