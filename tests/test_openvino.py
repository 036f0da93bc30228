"""The x86-openvino target: the pipeline's calibrated Q/DQ model as OpenVINO IR, checked against ONNX Runtime on
eval images at export, and run by OpenVINO's CPU plugin in verify. Skips where the `openvino` extra is absent."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecompress import targets
from edgecompress.backends import openvino as ov_backend
from edgecompress.backends.onnxruntime import OrtRunner
from edgecompress.errors import BadInput

from testkit import small_run_dir

# OpenVINO runs in the CLI's own processes, never in the test process: its native thread pool then cannot meet
# the test process's other runtimes over a whole session
if importlib.util.find_spec("openvino") is None:
    pytest.skip("the openvino extra is not installed: pip install 'edgecompress[openvino]'", allow_module_level=True)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    return small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)


@pytest.fixture(scope="module")
def openvino_run(small_run, tmp_path_factory, teacher_spec) -> Path:
    """`edgecompress compress --target x86-openvino` in a copy of the small run: its student, quantized, exported and
    verified for OpenVINO, by the CLI in its own process."""
    out = tmp_path_factory.mktemp("openvino") / "run"
    shutil.copytree(small_run, out, ignore=shutil.ignore_patterns("export", "verify", ".lock"))
    target = tmp_path_factory.mktemp("target") / "x86-openvino.toml"
    target.write_text((targets.PROFILE_DIR / "x86-openvino.toml").read_text()
                      .replace("max_accuracy_drop = 2.0", "max_accuracy_drop = 100.0")
                      .replace("min_speedup = 10.0", "min_speedup = 0.0"))
    base = small_run.parent  # the small run's data and config (testkit.small_run_dir)
    done = subprocess.run([sys.executable, "-m", "edgecompress", "compress", "--teacher", teacher_spec, "--data",
                           str(base / "fmnist.npz"), "--student", "resnet_slim_050", "--epochs", "1", "--target",
                           str(target), "--config", str(base / "config.toml"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "[distill] up to date, skipped" in done.stderr  # the student is the small run's: only the target changed
    return out


def test_openvino_export_writes_ir_that_gives_the_qdq_models_classes(openvino_run):
    out = openvino_run / "export" / "x86-openvino"
    build = json.loads((out / "build.json").read_text())
    assert build["runtime"] == "openvino" and build["format"] == "openvino-ir-int8"
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    check = build["converted"]["matches_source"]
    assert check["images"] > 0 and check["top1_agreement"] > 0.9
    assert build["compile_options"] == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                        "INFERENCE_PRECISION_HINT": "f32"}
    # the IR keeps int8: OpenVINO reads the Q/DQ pairs as FakeQuantize layers
    assert 'type="FakeQuantize"' in (out / "model.xml").read_text()


def test_verify_runs_the_ir_in_openvino_and_scores_it_like_onnx_runtime(openvino_run, small_run):
    report = json.loads((openvino_run / "verify" / "report.json").read_text())
    artifact = report["artifact"]
    assert artifact["runtime"] == "openvino-int8" and artifact["path"] == "export/x86-openvino/model.xml"
    assert artifact["settings"]["openvino"] and artifact["settings"]["PERFORMANCE_HINT"] == "LATENCY"
    assert artifact["settings"]["INFERENCE_NUM_THREADS"] == 1
    assert "measured_with" not in artifact and report["unverified"] == []
    # the same test images through ONNX Runtime on the Q/DQ model: OpenVINO's int8 kernels score alike
    data = np.load(small_run.parent / "fmnist.npz")
    x = data["x_test"][:, None].astype(np.float32) / 255
    ort = OrtRunner(openvino_run / "quantize" / "student.int8.onnx", 1, "ort")(x)
    assert artifact["accuracy"] == pytest.approx(float((ort.argmax(1) == data["y_test"]).mean()), abs=0.03)


def test_a_class_change_beyond_rounding_is_a_contradiction():
    reference = np.array([[3.0, 1.0, 0.0], [1.0, 1.01, 0.0]])
    rounded = reference + np.array([[0.01, 0.0, 0.0], [0.02, 0.0, 0.0]])  # the near-tie flips: rounding
    assert ov_backend.contradictions(reference, rounded, 0.02) == 0
    wrong = np.array([[1.0, 3.0, 0.0], [1.0, 1.01, 0.0]])
    assert ov_backend.contradictions(reference, wrong, 0.02) == 1


def test_an_openvino_table_needs_the_openvino_runtime(tmp_path):
    text = (targets.PROFILE_DIR / "x86-cpu.toml").read_text() + "\n[openvino]\nnum_streams = 2\n"
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(BadInput, match=r"an \[openvino\] table needs runtime = 'openvino'"):
        targets.load(str(tmp_path / "t.toml"))
    bad = (targets.PROFILE_DIR / "x86-openvino.toml").read_text().replace('"LATENCY"', '"FASTEST"')
    (tmp_path / "t.toml").write_text(bad)
    with pytest.raises(BadInput, match="performance_hint"):
        targets.load(str(tmp_path / "t.toml"))
