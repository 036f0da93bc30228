"""The exporters on real quantized models: ONNX Runtime's offline-optimised graph, the .ort file for ONNX Runtime
mobile, and TensorRT's Q/DQ ONNX with its builder settings, trtexec line and DLA report (no engine here)."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgecompress import data, export, quantize, targets
from edgecompress.backends import dla, ortmobile, tensorrt, trt_device
from edgecompress.backends.common import compare_outputs
from edgecompress.backends.qdq_check import unquantize_fused_add_inputs
from edgecompress.config import RunConfig
from edgecompress.errors import BadInput, StageFailed
from edgecompress.models import Normalized, create
from edgecompress.quantize import export_onnx
from edgecompress.runner import RunContext

SPEC = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}
TENSORRT_MISSING = trt_device.unavailable_reason()  # "" where this host has the tensorrt package and a CUDA device
NEEDS_NO_TENSORRT = pytest.mark.skipif(not TENSORRT_MISSING, reason="TensorRT and a CUDA device are here: export "
                                       "builds the engine (test_engine_build_on_a_cuda_device checks that path)")
# ONNX Runtime's quantize_static arguments for TensorRT's explicit quantization (written out here so this test
# does not depend on the quantize stage's scheme code): symmetric int8, float bias, Q/DQ on op inputs only.
TENSORRT_QDQ = {"WeightSymmetric": True, "ActivationSymmetric": True, "QuantizeBias": False,
                "QDQKeepRemovableActivations": True,
                "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose", "Gemm", "MatMul"]}


class Batches(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self.batches = [x[i:i + 32] for i in range(0, len(x), 32)]

    def get_next(self):
        return {"input": self.batches.pop()} if self.batches else None


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_npz) -> dict[str, Path]:
    """An fp32 ONNX student (untrained resnet_slim_050), its x86 QDQ (uint8 activations) and its TensorRT Q/DQ."""
    base = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    fp32 = base / "fp32.onnx"
    export_onnx(Normalized(create("resnet_slim_050", 1, 10), SPEC["mean"], SPEC["std"]).eval(), SPEC, 17, fp32)
    x = data.to_float(torch.from_numpy(np.load(small_npz)["x"][:64, None])).numpy()
    quant_pre_process(str(fp32), str(base / "pre.onnx"), skip_symbolic_shape=True)
    paths = {"fp32": fp32, "x86": base / "x86.onnx", "tensorrt": base / "trt.onnx"}
    quantize_static(str(base / "pre.onnx"), str(paths["x86"]), Batches(x), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_static(str(base / "pre.onnx"), str(paths["tensorrt"]), Batches(x), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options=TENSORRT_QDQ)
    trt = onnx.load(str(paths["tensorrt"]))  # residual Adds as TensorRT fuses them (tested in test_tensorrt.py)
    unquantize_fused_add_inputs(trt)
    onnx.save(trt, str(paths["tensorrt"]))
    return paths


def context(tmp_path: Path, small_npz: Path, target: str, model: Path) -> RunContext:
    """A run directory whose quantize stage holds `model`, for `target` (a name or a .toml path)."""
    config = RunConfig()
    config.target, config.data = target, str(small_npz)
    ctx = RunContext(tmp_path, config, quiet=True)
    (tmp_path / "quantize").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, quantize.artifact_path(tmp_path, ctx.target))
    return ctx


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def eval_images(ctx: RunContext) -> np.ndarray:
    return data.to_float(ctx.data.x_eval).numpy()


# --- ONNX Runtime ---------------------------------------------------------------------------------------------

def test_onnxruntime_export_writes_the_portable_optimised_graph(tmp_path, small_npz, models):
    ctx = context(tmp_path, small_npz, "x86-cpu", models["x86"])
    artifact = export.run(ctx)
    assert artifact == tmp_path / "export" / "x86-cpu" / "model.onnx"
    graph = onnx.load(str(artifact)).graph
    ops = {n.op_type for n in graph.node}
    # ORT_ENABLE_EXTENDED fused the Q/DQ pairs into int8 kernels, without ORT_ENABLE_ALL's host-specific layouts
    assert "QLinearConv" in ops and "Conv" not in ops
    assert not [n for n in graph.node if n.domain == "com.microsoft.nchwc"]
    build = json.loads((artifact.parent / "build.json").read_text())
    assert build["optimized_offline"]["level"] == "ORT_ENABLE_EXTENDED"
    assert build["optimized_offline"]["matches_source"]["top1_agreement"] == 1.0
    assert build["session_options"]["intra_op_num_threads"] == 1
    assert build["session_options"]["providers"] == ["CPUExecutionProvider"]
    assert build["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert build["sha256"] == __import__("hashlib").sha256(artifact.read_bytes()).hexdigest()
    assert build["profile"]["name"] == "x86-cpu" and build["unverified"] == []
    x = eval_images(ctx)
    np.testing.assert_allclose(logits(artifact, x), logits(models["x86"], x), atol=1e-3)


def test_a_lost_build_json_says_how_to_remake_it(tmp_path, small_npz, models):
    ctx = context(tmp_path, small_npz, "x86-cpu", models["x86"])
    export.run(ctx)
    assert export.artifact_path(ctx) == tmp_path / "export" / "x86-cpu" / "model.onnx"
    (tmp_path / "export" / "x86-cpu" / "build.json").unlink()
    with pytest.raises(StageFailed, match="build.json is missing or unreadable: run `edgecompress export .* --force`"):
        export.artifact_path(ctx)


def test_a_provider_this_build_lacks_is_recorded_not_pretended(tmp_path, small_npz, models):
    text = (targets.PROFILE_DIR / "x86-cpu.toml").read_text().replace(
        'execution_providers = ["CPUExecutionProvider"]',
        'execution_providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]')
    (tmp_path / "t.toml").write_text(text)
    ctx = context(tmp_path / "run", small_npz, str(tmp_path / "t.toml"), models["x86"])
    build = json.loads((export.run(ctx).parent / "build.json").read_text())
    assert "XnnpackExecutionProvider" not in ort.get_available_providers()
    assert build["verify_with"]["providers"] == ["CPUExecutionProvider"]
    assert len(build["unverified"]) == 1 and build["unverified"][0].startswith("execution provider Xnnpack")


def test_compare_outputs_refuses_a_different_model(models, fashion_small_test):
    x = data.to_float(torch.from_numpy(fashion_small_test[0][:, None])).numpy()
    with pytest.raises(StageFailed, match="outputs differ"):
        compare_outputs(logits(models["x86"], x), logits(models["x86"], x) + 0.01, "a test")


# --- ONNX Runtime mobile ----------------------------------------------------------------------------------------

def test_mobile_export_writes_an_ort_file_that_matches_the_onnx_model(tmp_path, small_npz, models):
    ctx = context(tmp_path, small_npz, "mobile-arm64", models["x86"])
    artifact = export.run(ctx)
    assert artifact.name == "model.ort" and artifact.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's identifier
    x = eval_images(ctx)
    np.testing.assert_allclose(logits(artifact, x), logits(models["x86"], x), atol=1e-3)
    config = (artifact.parent / ortmobile.CONFIG_NAME).read_text()
    assert "QLinearConv" in config and str(tmp_path) not in config
    build = json.loads((artifact.parent / "build.json").read_text())
    assert build["format"] == "ort-int8" and build["ort_format"]["target_platform"] == "arm"
    assert build["ort_format"]["matches_source"]["images"] == len(x)
    assert "QLinearConv" in sum(build["required_operators"]["ops"].values(), [])
    assert build["session_options"]["intra_op_num_threads"] == 4  # the profile's threads
    assert build["session_options"]["allow_spinning"] is False  # the profile's [onnxruntime] settings
    assert build["device_session"]["provider_options"]["XnnpackExecutionProvider"]["intra_op_num_threads"] == 4
    unverified = " ".join(build["unverified"])
    assert "XnnpackExecutionProvider" in unverified and "on-phone latency" in unverified
    assert build["verify_with"] == {"file": "model.ort", "runtime": "onnxruntime-int8",
                                    "providers": ["CPUExecutionProvider"]}


# --- TensorRT ---------------------------------------------------------------------------------------------------

def trt_target(tmp_path: Path, replace: dict[str, str], base: str = "x86-nvidia") -> targets.Target:
    text = (targets.PROFILE_DIR / f"{base}.toml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "t.toml").write_text(text)
    return targets.load(str(tmp_path / "t.toml"))


def test_profile_to_builder_settings(tmp_path, models):
    model = onnx.load(str(models["tensorrt"]))
    s = tensorrt.builder_settings(targets.load("x86-nvidia"), model)
    assert (s.input_name, s.min_shape, s.opt_shape, s.max_shape) == ("input", (1, 1, 28, 28), (1, 1, 28, 28),
                                                                      (64, 1, 28, 28))
    assert s.strongly_typed and s.network_flags == ("STRONGLY_TYPED",) and s.builder_flags == ()
    assert s.workspace_bytes == 2048 << 20 and s.dla_core == -1 and s.default_device_type == "GPU"
    assert s.timing_cache == "timing.cache"

    weak = tensorrt.builder_settings(trt_target(tmp_path, {"strongly_typed = true": "strongly_typed = false"}), model)
    assert weak.network_flags == () and weak.builder_flags == ("INT8",)

    # DLA on TensorRT 10: what trtexec's --useDLACore sets besides the profile's FP16 (sampleEngines.cpp)
    agx = tensorrt.builder_settings(targets.load("jetson-agx-orin"), model)
    assert set(agx.builder_flags) == {"FP16", "GPU_FALLBACK", "PREFER_PRECISION_CONSTRAINTS"}
    assert agx.dla_core == 0 and agx.default_device_type == "DLA"
    assert agx.min_shape == agx.opt_shape == agx.max_shape == (1, 1, 28, 28)  # DLA: one fixed shape

    no_fallback = trt_target(tmp_path, {"gpu_fallback = true": "gpu_fallback = false"}, "jetson-agx-orin")
    assert set(tensorrt.builder_settings(no_fallback, model).builder_flags) == {"FP16", "DIRECT_IO",
                                                                                 "PREFER_PRECISION_CONSTRAINTS"}
    strong_fp16 = trt_target(tmp_path, {'precision = "int8"': 'precision = "fp16"'}, "x86-nvidia")
    with pytest.raises(StageFailed, match="needs an fp16 graph"):
        tensorrt.builder_settings(strong_fp16, model)


def test_trtexec_lines_carry_every_setting(models):
    model = onnx.load(str(models["tensorrt"]))
    line = tensorrt.trtexec_build_command(tensorrt.builder_settings(targets.load("x86-nvidia"), model), "model.onnx")
    assert line == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", "--stronglyTyped",
                    "--memPoolSize=workspace:2048M", "--minShapes=input:1x1x28x28", "--optShapes=input:1x1x28x28",
                    "--maxShapes=input:64x1x28x28", "--timingCacheFile=timing.cache", "--profilingVerbosity=detailed",
                    "--exportLayerInfo=layer_info.json", "--skipInference"]
    agx = tensorrt.builder_settings(targets.load("jetson-agx-orin"), model)
    line = tensorrt.trtexec_build_command(agx, "model.onnx")
    assert {"--fp16", "--allowGPUFallback", "--useDLACore=0", "--memPoolSize=workspace:1024M",
            "--maxShapes=input:1x1x28x28"} <= set(line) and "--stronglyTyped" not in line
    timing = tensorrt.trtexec_latency_command(agx, 1)
    assert timing[:3] == ["trtexec", "--loadEngine=model.engine", "--shapes=input:1x1x28x28"]
    assert "--useDLACore=0" in timing


# What each shipped TensorRT profile's build.json must say for the 1x28x28 student, written out from the profiles
# (targets/*.toml) and TensorRT 10's names: workspace_mib << 20 bytes, the batch range over the input's first axis,
# STRONGLY_TYPED for explicit Q/DQ graphs, FP16 + GPU_FALLBACK and DLA core 0 on the AGX Orin (plus
# PREFER_PRECISION_CONSTRAINTS, which trtexec's --useDLACore sets on 10.x); and trtexec 10.x's documented flags for
# the same build (--memPoolSize=workspace:<MiB>M, --minShapes/--optShapes/--maxShapes=input:NxCxHxW,
# --stronglyTyped, --fp16, --allowGPUFallback, --useDLACore, --timingCacheFile, and the builder's layer report:
# --profilingVerbosity=detailed --exportLayerInfo=layer_info.json --skipInference).
LAYER_INFO = " --profilingVerbosity=detailed --exportLayerInfo=layer_info.json --skipInference"
EXPECTED_TENSORRT_BUILDS = {
    "x86-nvidia": (
        {"input_name": "input", "min_shape": [1, 1, 28, 28], "opt_shape": [1, 1, 28, 28], "max_shape": [64, 1, 28, 28],
         "strongly_typed": True, "builder_flags": [], "workspace_bytes": 2_147_483_648, "dla_core": -1,
         "timing_cache": "timing.cache", "network_flags": ["STRONGLY_TYPED"], "default_device_type": "GPU",
         "tensorrt_major": 10, "precision": "int8", "gpu_fallback": False},
        "trtexec --onnx=model.onnx --saveEngine=model.engine --stronglyTyped --memPoolSize=workspace:2048M "
        "--minShapes=input:1x1x28x28 --optShapes=input:1x1x28x28 --maxShapes=input:64x1x28x28 "
        "--timingCacheFile=timing.cache" + LAYER_INFO,
        {"bs1": "trtexec --loadEngine=model.engine --shapes=input:1x1x28x28 --warmUp=500 --duration=10 --useSpinWait",
         "bs64": "trtexec --loadEngine=model.engine --shapes=input:64x1x28x28 --warmUp=500 --duration=10 "
                 "--useSpinWait"}),
    "jetson-orin-nano": (
        {"input_name": "input", "min_shape": [1, 1, 28, 28], "opt_shape": [1, 1, 28, 28], "max_shape": [8, 1, 28, 28],
         "strongly_typed": True, "builder_flags": [], "workspace_bytes": 536_870_912, "dla_core": -1,
         "timing_cache": "timing.cache", "network_flags": ["STRONGLY_TYPED"], "default_device_type": "GPU",
         "tensorrt_major": 10, "precision": "int8", "gpu_fallback": False},
        "trtexec --onnx=model.onnx --saveEngine=model.engine --stronglyTyped --memPoolSize=workspace:512M "
        "--minShapes=input:1x1x28x28 --optShapes=input:1x1x28x28 --maxShapes=input:8x1x28x28 "
        "--timingCacheFile=timing.cache" + LAYER_INFO,
        {"bs1": "trtexec --loadEngine=model.engine --shapes=input:1x1x28x28 --warmUp=500 --duration=10 --useSpinWait",
         "bs8": "trtexec --loadEngine=model.engine --shapes=input:8x1x28x28 --warmUp=500 --duration=10 "
                "--useSpinWait"}),
    "jetson-agx-orin": (
        {"input_name": "input", "min_shape": [1, 1, 28, 28], "opt_shape": [1, 1, 28, 28], "max_shape": [1, 1, 28, 28],
         "strongly_typed": False, "builder_flags": ["FP16", "GPU_FALLBACK", "PREFER_PRECISION_CONSTRAINTS"],
         "workspace_bytes": 1_073_741_824, "dla_core": 0, "timing_cache": "timing.cache", "network_flags": [],
         "default_device_type": "DLA", "tensorrt_major": 10, "precision": "fp16", "gpu_fallback": True},
        "trtexec --onnx=model.onnx --saveEngine=model.engine --fp16 --allowGPUFallback --memPoolSize=workspace:1024M "
        "--useDLACore=0 --minShapes=input:1x1x28x28 --optShapes=input:1x1x28x28 --maxShapes=input:1x1x28x28 "
        "--timingCacheFile=timing.cache" + LAYER_INFO,
        {"bs1": "trtexec --loadEngine=model.engine --shapes=input:1x1x28x28 --useDLACore=0 --warmUp=500 "
                "--duration=10 --useSpinWait"}),
}


def same_command(line: str, expected: str) -> bool:
    """Same program and the same options: trtexec reads its options in any order."""
    words, want = shlex.split(line), shlex.split(expected)
    return words[0] == want[0] and sorted(words[1:]) == sorted(want[1:])


@NEEDS_NO_TENSORRT
@pytest.mark.parametrize("name", ["x86-nvidia", "jetson-orin-nano", "jetson-agx-orin"])
def test_tensorrt_export_without_tensorrt_writes_the_recipe_and_says_what_is_unverified(tmp_path, small_npz, models,
                                                                                         name):
    ctx = context(tmp_path, small_npz, name, models["fp32" if name == "jetson-agx-orin" else "tensorrt"])
    artifact = export.run(ctx)
    out = artifact.parent
    assert artifact == out / "model.onnx" and not (out / "model.engine").exists()  # never a fake engine
    build = json.loads((out / "build.json").read_text())
    builder, trtexec, latency = EXPECTED_TENSORRT_BUILDS[name]
    assert build["builder"] | {"builder_flags": sorted(build["builder"]["builder_flags"])} == \
        builder | {"builder_flags": sorted(builder["builder_flags"])}
    assert same_command(build["trtexec"], trtexec), build["trtexec"]
    assert set(build["trtexec_latency"]) == set(latency)
    assert all(same_command(build["trtexec_latency"][k], v) for k, v in latency.items()), build["trtexec_latency"]
    assert build["engine"] is None
    assert build["unverified"][0].startswith("tensorrt engine build: " + TENSORRT_MISSING)
    assert build["trtexec"] in build["unverified"][0] and build["by_tensorrt_version"]["10.x"]["trtexec"] == build["trtexec"]
    assert any(u.startswith(f"on-device latency ({name})") for u in build["unverified"])
    assert build["verify_with"]["file"] == "model.onnx"
    assert build["qdq_check"]["checked"] == (ctx.target.precision == "int8")
    if name.startswith("jetson"):
        report = json.loads((out / "dla_report.json").read_text())
        assert build["dla_report"]["summary"] == report["summary"]
        assert (out / "dla_report.md").read_text().startswith(f"# DLA placement: {name}")
    else:
        assert not (out / "dla_report.json").exists()


def test_tensorrt_export_refuses_a_graph_that_breaks_the_qdq_rules(tmp_path, small_npz, models):
    # uint8 activations with non-zero zero points: TensorRT's quantization is symmetric int8
    ctx = context(tmp_path, small_npz, "x86-nvidia", models["x86"])
    with pytest.raises(StageFailed, match="breaks TensorRT's Q/DQ rules"):
        export.run(ctx)
    assert not (tmp_path / "export" / "x86-nvidia" / "build.json").exists()


def test_tensorrt_export_refuses_a_precision_the_graph_does_not_have(tmp_path, small_npz, models):
    with pytest.raises(StageFailed, match="asks for fp16"):
        export.run(context(tmp_path, small_npz, "jetson-agx-orin", models["tensorrt"]))
    with pytest.raises(StageFailed, match="explicit Q/DQ"):
        export.run(context(tmp_path / "b", small_npz, "x86-nvidia", models["fp32"]))


def test_dla_report_places_each_layer_with_a_reason(models):
    report = dla.report(onnx.load(str(models["tensorrt"])), targets.load("jetson-agx-orin"),
                        tensorrt.builder_settings(targets.load("jetson-agx-orin"), onnx.load(str(models["tensorrt"]))))
    rows = {row["op"]: row for row in report["layers"]}
    assert rows["Conv"]["device"] == "DLA" and "within DLA's limits" in rows["Conv"]["reason"]
    assert rows["Gemm"]["device"] == "GPU" and "4-D" in rows["Gemm"]["reason"]
    assert rows["Flatten"]["device"] == "GPU"
    assert rows["QuantizeLinear"]["device"] == rows["DequantizeLinear"]["device"] == "folded"
    # the parser imports a global average pool as a Reduce (average) layer, which DLA does not run
    assert rows["GlobalAveragePool"]["device"] == "GPU" and "MAX only" in rows["GlobalAveragePool"]["reason"]
    s = report["summary"]
    assert s["dla_layers"] + s["gpu_layers"] + s["folded"] == len(report["layers"])
    assert s["dla_segments"] == 1 and report["dla_core"] == 0  # the pool and the classifier end it on the GPU


def test_dla_rules_send_out_of_range_layers_to_the_gpu():
    from onnx import TensorProto, helper

    def conv_graph(kernel: int, stride: int, pool: int) -> onnx.ModelProto:
        weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 1, kernel, kernel], [0.1] * (8 * kernel * kernel))
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[kernel, kernel],
                                  strides=[stride, stride]),
                 helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[pool, pool])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 64, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def devices(model):
        return {n.name: dla.place(n, dla.Graph(model, 1))[0] for n in model.graph.node}

    assert devices(conv_graph(3, 1, 2)) == {"conv": "DLA", "pool": "DLA"}
    assert devices(conv_graph(33, 1, 2))["conv"] == "GPU"  # kernel beyond 32
    assert devices(conv_graph(3, 9, 2))["conv"] == "GPU"   # stride beyond 8
    assert devices(conv_graph(3, 1, 9))["pool"] == "GPU"   # window beyond 8


def test_cuda_probe_counts_the_gpus_this_process_can_reach():
    """cuda_device_count asks libcuda (cuDeviceGetCount). CUDA reaches each GPU through its /dev/nvidia<N> node
    (the driver makes one per GPU; a container gets those of the GPUs it is given) and through libcuda.so.1, so
    the count is the number of those nodes where libcuda loads, and 0 where it does not or no node exists, as here.
    CUDA_VISIBLE_DEVICES hides devices from libcuda only, so the count runs in a process without it. Without a
    device the host cannot build an engine and says why."""
    import ctypes
    import os
    import subprocess
    import sys

    nodes = [p for p in Path("/dev").glob("nvidia*") if p.name.removeprefix("nvidia").isdigit()]
    try:
        ctypes.CDLL("libcuda.so.1")
        expected = len(nodes)
    except OSError:
        expected = 0
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    count = subprocess.run([sys.executable, "-c", "from edgecompress.backends import trt_device\n"
                            "print(trt_device.cuda_device_count())"], env=env, capture_output=True, text=True,
                           timeout=120, check=True).stdout
    assert int(count) == expected
    if expected == 0:
        assert TENSORRT_MISSING and trt_device.unavailable_reason() == TENSORRT_MISSING


@pytest.mark.cuda
@pytest.mark.skipif(bool(TENSORRT_MISSING), reason=f"needs TensorRT and a CUDA device: {TENSORRT_MISSING}")
def test_engine_build_on_a_cuda_device(tmp_path, small_npz, models):
    ctx = context(tmp_path, small_npz, "x86-nvidia", models["tensorrt"])
    out = export.run(ctx).parent
    build = json.loads((out / "build.json").read_text())
    assert (out / "model.engine").stat().st_size > 0 and build["engine"]["engine"] == "model.engine"
    assert build["artifact"] == "model.engine" and build["engine"]["built_on"]["device"]["compute_capability"]
    assert json.loads((out / "layer_info.json").read_text())  # the builder's own layer report
    assert (out / "timing.cache").stat().st_size > 0
    assert not any(u.startswith("tensorrt engine build") for u in build["unverified"])


# --- bad input --------------------------------------------------------------------------------------------------

def test_a_dla_profile_with_dynamic_batch_is_refused(tmp_path):
    with pytest.raises(BadInput, match="DLA needs a fixed shape"):
        trt_target(tmp_path, {"max_batch = 1": "max_batch = 8"}, "jetson-agx-orin")


# --- whole runs -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@NEEDS_NO_TENSORRT
def test_compress_for_mobile_and_tensorrt_targets_reuses_one_distilled_student(tmp_path, small_npz, teacher_spec,
                                                                              capsys):
    from edgecompress.cli import main

    (tmp_path / "fast.toml").write_text("[distill]\nepochs = 1\n[quantize]\ncalibration_size = 100\n"
                                        "[verify]\nlatency_runs_bs1 = 20\nlatency_runs_batch = 3\nwarmup_runs = 2\n")
    common = ["compress", "--data", str(small_npz), "--teacher", teacher_spec, "--student", "resnet_slim_050",
              "--config", str(tmp_path / "fast.toml")]
    lenient = tmp_path / "budgets.toml"
    reports = {}
    for name in ("mobile-arm64", "x86-nvidia"):
        text = (targets.PROFILE_DIR / f"{name}.toml").read_text().replace("max_accuracy_drop = 2.0",
                                                                          "max_accuracy_drop = 100.0")
        lenient.write_text(text)
        out = tmp_path / name
        if name != "mobile-arm64":  # distill does not depend on the target: the first run's student serves
            shutil.copytree(tmp_path / "mobile-arm64" / "distill", out / "distill")
        capsys.readouterr()
        assert main([*common, "--target", str(lenient), "--out", str(out)]) == 0
        captured = capsys.readouterr()
        assert ("[distill] up to date, skipped" in captured.err) == (name != "mobile-arm64")
        assert "not verified here" in captured.out
        reports[name] = json.loads((out / "verify" / "report.json").read_text())
    mobile, nvidia = reports["mobile-arm64"], reports["x86-nvidia"]
    assert mobile["artifact"]["path"] == "export/mobile-arm64/model.ort" and mobile["artifact"]["format"] == "ort-int8"
    assert any("on-phone latency" in u for u in mobile["unverified"])
    assert nvidia["artifact"]["path"] == "export/x86-nvidia/model.onnx"
    assert nvidia["artifact"]["format"] == "onnx-qdq-int8" and "not with the TensorRT engine" in \
        nvidia["artifact"]["measured_with"]
    assert [u.split(":")[0] for u in nvidia["unverified"]] == ["tensorrt engine build", "on-device latency (x86-nvidia)"]
    assert nvidia["budgets"]["passed"]


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(bool(TENSORRT_MISSING), reason=f"needs TensorRT and a CUDA device: {TENSORRT_MISSING}")
def test_compress_for_x86_nvidia_builds_runs_and_compares_the_engine(tmp_path, small_npz, teacher_spec):
    """On a GPU machine with TensorRT: the engine is the artifact, verify runs it (not ONNX Runtime) and compares
    its logits with ONNX Runtime on the same Q/DQ graph."""
    from edgecompress.cli import main

    (tmp_path / "fast.toml").write_text("[distill]\nepochs = 1\n[quantize]\ncalibration_size = 100\n"
                                        "[verify]\nlatency_runs_bs1 = 20\nlatency_runs_batch = 3\nwarmup_runs = 2\n")
    lenient = tmp_path / "x86-nvidia.toml"
    lenient.write_text((targets.PROFILE_DIR / "x86-nvidia.toml").read_text().replace("max_accuracy_drop = 2.0",
                                                                                       "max_accuracy_drop = 100.0"))
    out = tmp_path / "run"
    assert main(["compress", "--data", str(small_npz), "--teacher", teacher_spec, "--student", "resnet_slim_050",
                 "--config", str(tmp_path / "fast.toml"), "--target", str(lenient), "--out", str(out)]) == 0
    report = json.loads((out / "verify" / "report.json").read_text())
    artifact = report["artifact"]
    assert artifact["path"] == "export/x86-nvidia/model.engine" and artifact["runtime"] == "tensorrt-int8"
    assert "measured_with" not in artifact and artifact["matches_onnxruntime"]["top1_agreement"] > 0.95
    assert not any(u.startswith("tensorrt engine build") for u in report["unverified"])
