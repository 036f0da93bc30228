"""The TensorRT / Jetson path, checked statically (no CUDA device or TensorRT here): one test per defect of the
NVIDIA issue, the trtexec lines of each TensorRT version against that version's documented flags, and the Python
build's flags against what trtexec sets for the same line."""
from __future__ import annotations

import configparser
import fnmatch
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecompress import containers, export, targets
from edgecompress.backends import dla, tensorrt, trt_build, trt_device
from edgecompress.backends.qdq_check import check_tensorrt_qdq, unquantize_fused_add_inputs
from edgecompress.errors import BadInput, StageFailed

ROOT = Path(__file__).resolve().parent.parent
TENSORRT_TARGETS = [n for n in targets.names() if targets.load(n).runtime == "tensorrt"]

# trtexec's --help (samples/common/sampleOptions.cpp) per version, as NVIDIA/TensorRT's release/10.3 and
# release/11.1 branches print it, limited to the flags this project could use. 11.x removed every precision flag
# (--fp16, --int8, --best, ...) and --precisionConstraints / --layerPrecisions, and made --stronglyTyped,
# --useSpinWait, --useCudaGraph, --noDataTransfers and --separateProfileRun deprecated no-ops.
TRTEXEC_FLAGS = {
    10: {"--onnx", "--saveEngine", "--loadEngine", "--stronglyTyped", "--int8", "--fp16", "--best", "--memPoolSize",
         "--useDLACore", "--allowGPUFallback", "--minShapes", "--optShapes", "--maxShapes", "--shapes",
         "--timingCacheFile", "--warmUp", "--duration", "--useSpinWait", "--inputIOFormats", "--outputIOFormats",
         "--exportLayerInfo", "--profilingVerbosity", "--verbose", "--useCudaGraph", "--noDataTransfers",
         "--separateProfileRun", "--skipInference", "--exportTimes", "--iterations", "--avgRuns",
         "--precisionConstraints", "--layerPrecisions", "--directIO"},
    11: {"--onnx", "--saveEngine", "--loadEngine", "--memPoolSize", "--useDLACore", "--allowGPUFallback",
         "--minShapes", "--optShapes", "--maxShapes", "--shapes", "--timingCacheFile", "--warmUp", "--duration",
         "--inputIOFormats", "--outputIOFormats", "--exportLayerInfo", "--profilingVerbosity", "--verbose",
         "--skipInference", "--exportTimes", "--iterations", "--avgRuns", "--noSpinWait", "--noCudaGraph",
         "--includeDataTransfers"},
}
TRTEXEC_DEPRECATED = {10: set(), 11: {"--stronglyTyped", "--useSpinWait", "--useCudaGraph", "--noDataTransfers",
                                      "--separateProfileRun", "--directIO"}}


def trtexec_sets(line: str, major: int) -> set[str]:
    """The BuilderFlags trtexec `major` sets for a build line, written from sampleEngines.cpp's setupNetworkAndConfig
    (10.3 and 11.1): --int8 / --fp16 set INT8 / FP16; --useDLACore sets PREFER_PRECISION_CONSTRAINTS (10.x), FP16
    unless --int8 (10.x), and GPU_FALLBACK with --allowGPUFallback, else DIRECT_IO."""
    words = set(shlex.split(line))
    flags = {"INT8"} if "--int8" in words else set()
    flags |= {"FP16"} if "--fp16" in words else set()
    if any(w.startswith("--useDLACore=") for w in words):
        flags.add("GPU_FALLBACK" if "--allowGPUFallback" in words else "DIRECT_IO")
        if major < 11:
            flags.add("PREFER_PRECISION_CONSTRAINTS")
            if "--int8" not in words:
                flags.add("FP16")
    return flags


def student_graph(fp16: bool = False) -> onnx.ModelProto:
    """A 1x28x28 conv classifier, fp32 or with fp16 weights."""
    kind = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    weight = helper.make_tensor("w", kind, [8, 1, 3, 3], np.full(72, 0.1, np.float16 if fp16 else np.float32).tolist())
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("GlobalAveragePool", ["c"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def profile(tmp_path: Path, base: str, replace: dict[str, str]) -> Path:
    text = (targets.PROFILE_DIR / f"{base}.toml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "t.toml").write_text(text)
    return tmp_path / "t.toml"


# --- 1. Jetson containers see the GPU as a non-root user ---------------------------------------------------------

def test_jetson_docker_run_joins_the_video_group(tmp_path):
    """L4T's GPU and DLA device nodes belong to the video group; `--user uid:gid` alone leaves the container
    without them, so CUDA reports no device and export would quietly build no engine."""
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        for command in containers.run_commands(targets.load(name), tmp_path):
            user = command.index("--user")
            assert command[command.index("--group-add") + 1] == "video" and user < command.index("--group-add")
            assert command[command.index("--runtime") + 1] == "nvidia"
    for command in containers.run_commands(targets.load("x86-nvidia"), tmp_path):
        assert "--gpus" in command and "--group-add" not in command


# --- 2. a timing cache from another GPU or TensorRT version ------------------------------------------------------

class BuilderConfigRecorder:
    """IBuilderConfig's timing-cache methods as pyCoreDoc.h documents them: set_timing_cache returns False for a
    cache made on another device or version when ignore_mismatch is False, and then no cache is attached
    (get_timing_cache() -> None). TensorRT is not installable here; this stands in for that one contract."""

    def __init__(self):
        self.attached = None

    def create_timing_cache(self, data: bytes):
        return {"data": data}

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False  # trtexec ignores mismatches; a refused cache must be noticed here
        if cache["data"] == b"from another GPU":
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        return self.attached


def test_a_refused_timing_cache_is_replaced_so_the_build_keeps_one():
    config, said = BuilderConfigRecorder(), []
    assert trt_build.attach_timing_cache(config, b"from another GPU", said.append).startswith("replaced")
    assert config.get_timing_cache() == {"data": b""} and "another GPU" in said[0]
    config = BuilderConfigRecorder()
    assert trt_build.attach_timing_cache(config, b"from this GPU", said.append) == "reused"
    assert trt_build.attach_timing_cache(BuilderConfigRecorder(), b"", said.append) == "new"


# --- 3. export on the device after a run on the host -------------------------------------------------------------

def test_export_fingerprint_changes_when_tensorrt_or_the_gpu_appears(tmp_path, small_npz, monkeypatch):
    """A run made on a host without TensorRT, exported again on the device, must build there: the export's
    fingerprint holds TensorRT's version and the GPU, not just the target and the model."""
    from edgecompress.config import RunConfig
    from edgecompress.runner import RunContext, fingerprint

    (tmp_path / "quantize").mkdir()
    onnx.save(student_graph(), str(tmp_path / "quantize" / "student.int8.onnx"))
    ctx = RunContext(tmp_path, RunConfig(data=str(small_npz), target="x86-nvidia"), quiet=True)
    stage = export.stage(ctx)
    here = fingerprint(ctx, stage)
    env = trt_device.environment()
    assert export.inputs(ctx)["environment"] == {"tensorrt": env["tensorrt"], "device": env["device"]}
    device = {"tensorrt": "10.3.0", "device": {"name": "Orin", "compute_capability": "8.7"}, "cuda_driver": "12.6",
              "l4t": "36.4.0"}
    monkeypatch.setattr(trt_device, "environment", lambda: device)
    assert fingerprint(ctx, stage) != here


def test_an_engine_built_elsewhere_is_never_run_here():
    built = {"tensorrt": "10.3.0", "device": {"name": "Orin", "compute_capability": "8.7"}}
    assert trt_device.mismatch(built, built | {"cuda_driver": "12.8"}) == ""
    assert "TensorRT 10.3.0 where the engine was built, 10.7.0 here" in \
        trt_device.mismatch(built, built | {"tensorrt": "10.7.0"})
    assert "GPU" in trt_device.mismatch(built, built | {"device": {"name": "RTX 4090", "compute_capability": "8.9"}})


def test_an_engine_made_on_the_device_survives_a_re_export_on_a_host_that_cannot_build(tmp_path):
    backend, target = tensorrt.BACKEND, targets.load("x86-nvidia")
    keep = backend.keep_on_rebuild(target, tmp_path)
    assert "timing.cache" in keep
    assert ({"model.engine", "layer_info.json", "build.json"} <= keep) == bool(trt_device.unavailable_reason())


def test_the_engine_runner_feeds_batches_its_profile_takes():
    x = np.arange(10, dtype=np.float32)[:, None]
    chunks = trt_build.profile_chunks(x, 4, 4)
    assert [(len(c), used) for c, used in chunks] == [(4, 4), (4, 4), (4, 2)]
    assert np.concatenate([c[:used] for c, used in chunks]).ravel().tolist() == list(range(10))
    assert chunks[-1][0].ravel().tolist() == [8, 9, 9, 9]  # padded with the last row, then trimmed
    assert [len(c) for c, _ in trt_build.profile_chunks(x, 1, 64)] == [10]


def test_host_probes_say_what_this_host_has(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64\n")
    assert trt_device.l4t_release(release) == "36.4.0" and trt_device.l4t_release(tmp_path / "none") == ""
    env = trt_device.environment()
    assert set(env) == {"tensorrt", "device", "cuda_driver", "l4t"}
    assert (env["device"] is None) == (trt_device.cuda_device_count() == 0)


# --- 4. install advice per platform ------------------------------------------------------------------------------

def test_tensorrt_extra_is_pinned_to_10_on_x86_and_jetson_is_told_to_use_jetpack():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line for line in cfg["options.extras_require"]["tensorrt"].splitlines() if line.strip()]
    assert lines == ['tensorrt>=10.3,<11; platform_machine == "x86_64"']
    assert "apt install python3-libnvinfer" in trt_device.install_advice("aarch64")
    assert "pip install 'edgecompress[tensorrt]'" in trt_device.install_advice("x86_64")
    jetson = (ROOT / "docker" / "jetson.Dockerfile").read_text()
    assert "python3-libnvinfer" in jetson and "pip install tensorrt" not in jetson


# --- 5. trtexec lines per TensorRT version, and the Python build's flags ----------------------------------------

@pytest.mark.parametrize("name", TENSORRT_TARGETS)
@pytest.mark.parametrize("major", [10, 11])
def test_trtexec_lines_use_only_that_versions_flags_and_match_the_python_build(name, major):
    target = targets.load(name)
    model = student_graph(fp16=target.precision == "fp16")
    settings = tensorrt.builder_settings(target, model, major)
    build = tensorrt.trtexec_build_command(settings, "model.onnx")
    lines = [build] + [tensorrt.trtexec_latency_command(settings, b) for b in target.batch]
    for line in lines:
        used = {word.split("=")[0] for word in line[1:]}
        assert used <= TRTEXEC_FLAGS[major], used - TRTEXEC_FLAGS[major]
        assert not used & TRTEXEC_DEPRECATED[major], used & TRTEXEC_DEPRECATED[major]
    assert set(settings.builder_flags) == trtexec_sets(shlex.join(build), major)
    assert settings.network_flags == (("STRONGLY_TYPED",) if major == 10 and target.tensorrt.strongly_typed else ())


def test_tensorrt_11_cannot_build_an_fp32_graph_as_fp16_and_says_so():
    agx = targets.load("jetson-agx-orin")
    recipes = tensorrt.recipes(agx, student_graph(fp16=False), "model.onnx")
    assert "trtexec" in recipes["10.x"] and "needs an fp16 graph" in recipes["11.x"]["unsupported"]
    assert "--fp16" not in tensorrt.recipes(agx, student_graph(fp16=True), "model.onnx")["11.x"]["trtexec"]


# --- 6, 7. DLA placement rules -----------------------------------------------------------------------------------

def placed(op: str, shape_in: list[int], shape_out: list[int], weight_shape=None, **attrs) -> tuple[str, str]:
    inputs, initializers = ["x"], []
    if weight_shape:
        inputs.append("w")
        initializers.append(helper.make_tensor("w", TensorProto.FLOAT, weight_shape,
                                               [0.1] * int(np.prod(weight_shape))))
    node = helper.make_node(op, inputs, ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    device, _, reason = dla.place(model.graph.node[0], dla.Graph(model, shape_in[0]))
    return device, reason


def test_global_pools_are_placed_as_the_reduce_layers_tensorrt_imports():
    # onnx-tensorrt imports both as Reduce layers; DLA reduces with MAX only, and a Reduce has no 8x8 window limit
    assert placed("GlobalAveragePool", [1, 64, 7, 7], [1, 64, 1, 1])[0] == "GPU"
    assert placed("GlobalMaxPool", [1, 64, 56, 56], [1, 64, 1, 1])[0] == "DLA"


def test_deconvolution_strides_reach_32_and_the_reason_names_output_channels():
    assert placed("ConvTranspose", [1, 8, 8, 8], [1, 4, 128, 128], [8, 4, 16, 16], kernel_shape=[16, 16],
                  strides=[16, 16])[0] == "DLA"
    device, reason = placed("ConvTranspose", [1, 8, 4, 4], [1, 4, 132, 132], [8, 4, 2, 2], kernel_shape=[2, 2],
                            strides=[33, 33])
    assert device == "GPU" and "[1, 32]" in reason
    # weight [8 inputs, 4 outputs / group, k, k]: 4 output channels
    assert "4 output channels" in placed("ConvTranspose", [1, 8, 8, 8], [1, 4, 16, 16], [8, 4, 2, 2],
                                         kernel_shape=[2, 2], strides=[2, 2])[1]


def test_softmax_and_resize_follow_dla_limits():
    assert placed("Softmax", [1, 10, 1, 1], [1, 10, 1, 1], axis=1)[0] == "DLA"
    assert placed("Softmax", [1, 2000, 4, 4], [1, 2000, 4, 4], axis=1)[0] == "GPU"  # > 1024 with spatial > 1
    assert placed("Softmax", [2, 4, 4, 4], [2, 4, 4, 4], axis=0)[0] == "GPU"  # the batch axis
    assert placed("Resize", [1, 8, 8, 8], [1, 8, 16, 16], mode="nearest")[0] == "DLA"
    assert placed("Resize", [1, 8, 8, 8], [1, 8, 12, 12], mode="nearest")[0] == "GPU"  # scale 1.5
    assert placed("Resize", [1, 8, 8, 8], [1, 8, 64, 64], mode="linear")[0] == "GPU"  # linear above 4x


# --- 8, 13. Q/DQ placement and the checker -----------------------------------------------------------------------

def residual_block(quantize_conv_output: bool) -> onnx.ModelProto:
    """x -> Q/DQ -> conv -> [Q/DQ] -> Add(., Q/DQ(x)) -> y: what ONNX Runtime's quantizer writes for a residual
    Add (both inputs through Q/DQ), or what TensorRT fuses (the conv's output straight into the Add)."""
    s, z = helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]), helper.make_tensor("z", TensorProto.INT8, [], [0])
    ws = helper.make_tensor("ws", TensorProto.FLOAT, [4], [0.01] * 4)
    wz = helper.make_tensor("wz", TensorProto.INT8, [4], [0] * 4)
    w = helper.make_tensor("w", TensorProto.INT8, [4, 4, 3, 3], [1] * 144)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    if quantize_conv_output:
        nodes += [helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="qc"),
                  helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="dqc")]
    nodes.append(helper.make_node("Add", ["cd" if quantize_conv_output else "c", "xd"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [s, z, ws, wz, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_between_a_conv_and_its_residual_add_is_flagged_and_removed(tmp_path):
    onnx.save(residual_block(True), str(tmp_path / "ort.onnx"))
    found = check_tensorrt_qdq(tmp_path / "ort.onnx")
    assert len(found) == 1 and "blocks TensorRT's Conv+Add fusion" in found[0]
    model = residual_block(True)
    assert unquantize_fused_add_inputs(model) == 1
    onnx.checker.check_model(model)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert list(add.input) == ["c", "xd"]  # the conv's output straight in, the residual still int8
    onnx.save(model, str(tmp_path / "fused.onnx"))
    assert check_tensorrt_qdq(tmp_path / "fused.onnx") == []
    onnx.save(residual_block(False), str(tmp_path / "written.onnx"))
    assert check_tensorrt_qdq(tmp_path / "written.onnx") == []


def test_tensorrt_quantization_places_residual_qdq_for_fusion(tmp_path):
    """The quantize stage's TensorRT scheme, on a real residual student: no Add left with a Q/DQ'd conv output."""
    import torch

    from edgecompress import backends
    from edgecompress.models import Normalized, create
    from edgecompress.quantize import export_onnx, quantize_qdq

    spec = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}
    torch.manual_seed(0)
    export_onnx(Normalized(create("resnet_slim_050", 1, 10), spec["mean"], spec["std"]).eval(), spec, 17,
                tmp_path / "fp32.onnx")
    quantize_qdq(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", torch.rand(32, 1, 28, 28), "minmax",
                 backends.scheme_for(targets.load("x86-nvidia")))
    model = onnx.load(str(tmp_path / "int8.onnx"))
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds and all(sorted(producer[i] for i in a.input) == ["Conv", "DequantizeLinear"] for a in adds)
    assert check_tensorrt_qdq(tmp_path / "int8.onnx") == []


def test_checker_accepts_what_tensorrt_accepts(tmp_path):
    # a Q/DQ pair with no zero point: TensorRT's parser takes it as int8 with zero point 0
    model = residual_block(False)
    for node in model.graph.node:
        if node.name in ("qx", "dqx"):
            del node.input[2]
    onnx.save(model, str(tmp_path / "no_zero.onnx"))
    assert check_tensorrt_qdq(tmp_path / "no_zero.onnx") == []
    # attention's activation x activation MatMul, both operands through Q/DQ with per-tensor scales
    s, z = helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]), helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"]),
             helper.make_node("MatMul", ["ad", "bd"], ["y"], name="scores")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 16, 8]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], [s, z])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "attn.onnx"))
    assert check_tensorrt_qdq(tmp_path / "attn.onnx") == []


# --- 9, 10, 12. the profiles --------------------------------------------------------------------------------------

def test_a_strongly_typed_dla_build_is_refused_with_one_line(tmp_path):
    """trtexec's --useDLACore sets FP16 on TensorRT 10, which a strongly typed network refuses at build time."""
    path = profile(tmp_path, "jetson-agx-orin", {"strongly_typed = false": "strongly_typed = true"})
    with pytest.raises(BadInput, match="set strongly_typed = false"):
        targets.load(str(path))


def test_int8_on_dla_is_refused_with_one_line(tmp_path):
    path = profile(tmp_path, "jetson-agx-orin", {'precision = "fp16"': 'precision = "int8"'})
    with pytest.raises(BadInput, match="int8 on DLA needs TensorRT's implicit quantization") as err:
        targets.load(str(path))
    assert "\n" not in str(err.value)


def test_agx_orin_profile_says_when_tensorrt_11_has_dla():
    text = (targets.PROFILE_DIR / "jetson-agx-orin.toml").read_text()
    assert "11.4.1" in text and "JetPack 7.2.2" in text and "11.0-11.3 has no" in text


def test_verified_batches_must_lie_inside_the_engine_profile(tmp_path):
    path = profile(tmp_path, "x86-nvidia", {"min_batch = 1": "min_batch = 2", "opt_batch = 1": "opt_batch = 2"})
    with pytest.raises(BadInput, match=r"batch sizes \[1, 64\] must lie within the engine's profile"):
        targets.load(str(path))


# --- 11. the Docker build context --------------------------------------------------------------------------------

def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, '!' re-includes (a folder pattern covers what is below it)."""
    ignored = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_runs_and_environments_out_of_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ("runs/x/distill/student.pt", ".venv/bin/python", "venv/lib/x.py", ".git/HEAD", "benchmarks/perf.py",
                 "tests/test_tensorrt.py", ".gpu/small.npz", "pipeline/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path, patterns), path
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert not dockerignored(source.rstrip("/"), patterns), (dockerfile.name, source)


def test_export_refuses_a_profile_tensorrt_11_cannot_build_when_11_is_installed(monkeypatch):
    monkeypatch.setattr(trt_device, "tensorrt_version", lambda: "11.1.0")
    assert tensorrt.installed_major() == 11
    with pytest.raises(StageFailed, match="needs an fp16 graph"):
        tensorrt.builder_settings(targets.load("jetson-agx-orin"), student_graph(fp16=False), 11)


def test_trtexec_gpu_compute_time_is_parsed_from_its_summary():
    text = ("[11/30/2026-10:00:00] [I] GPU Compute Time: min = 0.123 ms, max = 0.456 ms, mean = 0.2 ms, "
            "median = 0.19 ms, percentile(90%) = 0.25 ms, percentile(95%) = 0.3 ms, percentile(99%) = 0.4 ms\n")
    assert trt_build.parse_trtexec_times(text) == {"min": 0.123, "max": 0.456, "mean": 0.2, "p50": 0.19, "p90": 0.25}
    assert trt_build.parse_trtexec_times("[I] Throughput: 100 qps") is None
