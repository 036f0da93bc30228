"""End-to-end runs of `edgecompress compress` on small real Fashion-MNIST subsets."""
import json
import shutil
from pathlib import Path

import onnx
import pytest
from PIL import Image

from edgecompress import config as cfg
from edgecompress import data
from edgecompress.cli import main
from edgecompress.models.loaders import WEIGHTS_DIR

from testkit import config_file, lenient_target, small_run_dir, subset_npz

SHIPPED_TEACHER = WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"


@pytest.fixture(scope="module")
def fashion():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    return small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)


def test_a_stage_command_rewrites_run_toml_with_every_setting_and_the_versions_that_ran(small_run, tmp_path,
                                                                                       teacher_spec):
    """A run directory from an older edgecompress lacks the keys added since (here quantize.bias_correction)
    and names older versions: a one-stage command writes run.toml again, same settings, every key named."""
    run = shutil.copytree(small_run, tmp_path / "run")
    before = cfg.read_toml(run / "run.toml")
    old = (run / "run.toml").read_text()
    assert "bias_correction = " in old and before["versions"]["torch"] != "0.0"
    older = "\n".join(line for line in old.splitlines() if not line.startswith("bias_correction"))
    (run / "run.toml").write_text(older.replace(f'torch = "{before["versions"]["torch"]}"', 'torch = "0.0"'))
    assert "bias_correction" not in cfg.read_toml(run / "run.toml")["quantize"]

    assert main(["export", str(run), "--quiet", "--trust", str(Path(teacher_spec.rpartition(":")[0]).parent)]) == 0

    after = cfg.read_toml(run / "run.toml")
    assert after["quantize"]["bias_correction"] is True and after["versions"]["torch"] == before["versions"]["torch"]
    assert cfg.from_dict(after, "after") == cfg.from_dict(before, "before")


def quant_activation_types(model_path: Path) -> set[int]:
    graph = onnx.load(str(model_path)).graph
    zero_points = {t.name: t.data_type for t in graph.initializer}
    return {zero_points[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}


@pytest.mark.slow
def test_compress_with_shipped_teacher_then_skip_on_rerun(fashion, tmp_path, capsys):
    npz = subset_npz(fashion, tmp_path / "fmnist-small.npz", 3000, 1000)
    args = ["compress", "--teacher", "resnet18_half", "--teacher-weights", str(SHIPPED_TEACHER), "--data", str(npz),
            "--student", "resnet_slim_100", "--target", str(lenient_target(tmp_path / "t.toml")),
            "--config", str(config_file(tmp_path / "c.toml", 3)), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    run = tmp_path / "run"
    report = json.loads((run / "verify" / "report.json").read_text())
    for key in ("schema", "target", "teacher", "student_fp32", "artifact", "speedup_vs_teacher", "size_ratio",
                "accuracy_drop_pt", "budgets", "unverified"):
        assert key in report
    assert report["teacher"]["accuracy"] > 0.88  # the shipped teacher on real test images
    assert report["artifact"]["accuracy"] > 0.70
    assert report["artifact"]["agreement"] > 0.70
    assert set(report["artifact"]["latency_ms"]) == {"bs1", "bs64"}
    assert report["size_ratio"] > 10
    assert quant_activation_types(run / "export" / "test-cpu" / "model.onnx") == {onnx.TensorProto.UINT8}
    assert (run / "verify" / "report.md").read_text().startswith("# edgecompress report")
    assert "torch" in (run / "run.toml").read_text()

    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("up to date, skipped") == 4


def write_png_folder(fashion, root: Path, per_class: int) -> Path:
    for split, x, y in (("train", fashion.x_train, fashion.y_train), ("test", fashion.x_eval, fashion.y_eval)):
        idx = data.stratified_sample(y, per_class * 10, 1)
        for n, i in enumerate(idx.tolist()):
            folder = root / split / f"class_{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(folder / f"{n}.png")
    return root


@pytest.mark.slow
def test_factory_teacher_with_state_dict_on_an_image_folder(fashion, tmp_path, monkeypatch):
    """compress is given its files by names relative to the working directory; a one-stage command run later from
    another directory still finds them (run.toml holds them resolved), which it could not if they stayed relative."""
    write_png_folder(fashion, tmp_path / "images", 60)
    (tmp_path / "my_teacher.py").write_text("from edgecompress.models import create\n\n\n"
                                            "def build():\n    return create('resnet18_half', 1, 10)\n")
    lenient_target(tmp_path / "t.toml")
    config_file(tmp_path / "c.toml", 2)
    monkeypatch.chdir(tmp_path)
    args = ["compress", "--teacher", "my_teacher.py:build", "--teacher-weights", str(SHIPPED_TEACHER),
            "--data", "images", "--student", "resnet_slim_050", "--target", "t.toml", "--config", "c.toml",
            "--out", "run", "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "verify" / "report.json").read_text())
    assert report["data"]["eval_images"] == 600
    assert report["teacher"]["accuracy"] > 0.85  # weights loaded and PNG pixels read as trained
    run_toml = cfg.read_toml(tmp_path / "run" / "run.toml")
    assert (run_toml["data"], run_toml["target"]) == (str(tmp_path / "images"), str(tmp_path / "t.toml"))
    assert run_toml["teacher"]["spec"] == f"{tmp_path / 'my_teacher.py'}:build"

    # one stage against the finished run directory, from a different working directory: none of the relative
    # names above exists there
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "run" / "verify" / "report.json").unlink()
    assert main(["verify", str(tmp_path / "run"), "--force", "--quiet", "--trust", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "run" / "verify" / "report.json").read_text())
    assert again["data"]["eval_images"] == 600 and again["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    assert again["artifact"]["accuracy"] == report["artifact"]["accuracy"]
    assert main(["quantize", str(tmp_path / "no-such-run")]) == 2
