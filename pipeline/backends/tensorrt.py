"""TensorRT backend (Jetson and NVIDIA GPU targets): the Q/DQ ONNX TensorRT takes, the builder settings from the
target profile, the equivalent trtexec command line for TensorRT 10.x and 11.x, and the engine itself where this
host has the tensorrt package and a CUDA device (trt_build.py).

Settings map to TensorRT's Python API and to trtexec's flags (samples/common/sampleOptions.cpp, sampleEngines.cpp):
- network: explicit Q/DQ graphs are built strongly typed (every tensor's type from the graph): on 10.x with
  NetworkDefinitionCreationFlag.STRONGLY_TYPED / --stronglyTyped, on 11.x always (the flag is a deprecated no-op,
  and the precision flags BuilderFlag.INT8/FP16, --int8/--fp16, are gone); weak typing (10.x only) sets
  BuilderFlag.INT8/FP16 / --int8/--fp16 from the profile's precision;
- `config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)` / --memPoolSize=workspace:NM;
- DLA: `default_device_type = DLA`, `DLA_core = n` / --useDLACore=n. trtexec then also sets flags of its own, and
  the Python build sets the same ones: GPU_FALLBACK with --allowGPUFallback, else DIRECT_IO; on 10.x also
  PREFER_PRECISION_CONSTRAINTS, and FP16 unless --int8 was given (11.x sets neither);
- `create_optimization_profile()` with `set_shape(input, min, opt, max)` / --minShapes --optShapes --maxShapes;
- a timing cache file reused between builds / --timingCacheFile;
- ProfilingVerbosity.DETAILED and the engine inspector's JSON / --profilingVerbosity=detailed --exportLayerInfo.
Without TensorRT or a CUDA device nothing is faked: build.json holds the commands to finish on the device and
`unverified` names the engine build and the on-device latency.
"""
from __future__ import annotations

import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from .. import files
from ..errors import StageFailed
from ..schemes import Scheme
from . import trt_device
from .base import ArtifactRunner, Backend, register, register_qdq_edit
from .qdq_check import check_tensorrt_qdq, unquantize_fused_add_inputs
from .common import io_description, onnx_format, runtime_label
from .onnxruntime import OrtRunner, ort_artifact_runner
from .trt_build import LAYER_INFO_NAME

ENGINE_NAME = "model.engine"
MAJORS = (10, 11)  # the TensorRT versions whose builds are recorded; the Python build uses the installed one
DEFAULT_MAJOR = 10  # the version settings are described for when no TensorRT is installed (JetPack 6 ships 10.3)


@dataclass(frozen=True)
class BuilderSettings:
    """Everything the builder is told, in TensorRT's own names, from one target profile, one ONNX input and one
    TensorRT major version."""

    tensorrt_major: int
    precision: str                  # the profile's: int8 | fp16 | fp32
    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag, exactly those the trtexec line makes trtexec set
    workspace_bytes: int
    dla_core: int                   # -1: GPU only
    gpu_fallback: bool
    timing_cache: str               # file name beside the engine, "" for none

    @property
    def network_flags(self) -> tuple[str, ...]:
        """Names in trt.NetworkDefinitionCreationFlag (11.x: none; every network is strongly typed)."""
        return ("STRONGLY_TYPED",) if self.strongly_typed and self.tensorrt_major < 11 else ()

    @property
    def default_device_type(self) -> str:
        return "DLA" if self.dla_core >= 0 else "GPU"

    def to_dict(self) -> dict:
        return asdict(self) | {"network_flags": list(self.network_flags),
                               "default_device_type": self.default_device_type}


def input_chw(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    """The graph input's name and its fixed non-batch dimensions."""
    tensor = model.graph.input[0]
    dims = [d.dim_value for d in tensor.type.tensor_type.shape.dim][1:]
    if not dims or any(d <= 0 for d in dims):
        raise StageFailed(f"TensorRT export needs fixed non-batch input dimensions; {tensor.name} has "
                          f"{[d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]}")
    return tensor.name, tuple(dims)


def graph_is_fp16(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def builder_settings(target, model: onnx.ModelProto, major: int = DEFAULT_MAJOR) -> BuilderSettings:
    """The profile's [tensorrt] table and precision as builder settings for this model and TensorRT `major`.
    StageFailed when that version cannot build what the profile asks for."""
    options, precision = target.tensorrt, target.precision
    name, chw = input_chw(model)
    strongly_typed = options.strongly_typed or major >= 11
    if strongly_typed and precision == "fp16" and not graph_is_fp16(model):
        # Strong typing takes each tensor's type from the graph: int8 from the Q/DQ pairs, fp16 from an fp16 graph.
        why = "strongly_typed" if options.strongly_typed else f"TensorRT {major} (every network is strongly typed)"
        raise StageFailed(f"{target.name}: {why} with precision fp16 needs an fp16 graph, but the quantized model "
                          "is fp32: quantize to fp16, or set strongly_typed = false (the FP16 flag; TensorRT 10 only)")
    flags: list[str] = [] if strongly_typed else {"int8": ["INT8"], "fp16": ["FP16"], "fp32": []}[precision]
    if options.dla_core >= 0:
        # what trtexec's --useDLACore adds (sampleEngines.cpp, setupNetworkAndConfig)
        flags.append("GPU_FALLBACK" if options.gpu_fallback else "DIRECT_IO")
        if major < 11:
            flags.append("PREFER_PRECISION_CONSTRAINTS")
            if "INT8" not in flags and "FP16" not in flags:
                flags.append("FP16")
    return BuilderSettings(
        tensorrt_major=major, precision=precision, input_name=name, min_shape=(options.min_batch, *chw),
        opt_shape=(options.opt_batch, *chw), max_shape=(options.max_batch, *chw), strongly_typed=strongly_typed,
        builder_flags=tuple(flags), workspace_bytes=options.workspace_mib << 20, dla_core=options.dla_core,
        gpu_fallback=options.gpu_fallback, timing_cache=options.timing_cache)


def _shape(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}:{'x'.join(map(str, shape))}"


def trtexec_build_command(settings: BuilderSettings, onnx_name: str, engine_name: str = ENGINE_NAME) -> list[str]:
    """The trtexec invocation that builds the same engine as trt_build.build_engine with these settings, in the
    flags settings.tensorrt_major's trtexec documents."""
    command = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    if settings.tensorrt_major < 11:
        if settings.strongly_typed:
            command.append("--stronglyTyped")
        else:
            command += {"int8": ["--int8"], "fp16": ["--fp16"], "fp32": []}[settings.precision]
    command.append(f"--memPoolSize=workspace:{settings.workspace_bytes >> 20}M")
    if settings.dla_core >= 0:
        command.append(f"--useDLACore={settings.dla_core}")
        if settings.gpu_fallback:
            command.append("--allowGPUFallback")
    command += [f"--minShapes={_shape(settings.input_name, settings.min_shape)}",
                f"--optShapes={_shape(settings.input_name, settings.opt_shape)}",
                f"--maxShapes={_shape(settings.input_name, settings.max_shape)}"]
    if settings.timing_cache:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    return command + ["--profilingVerbosity=detailed", f"--exportLayerInfo={LAYER_INFO_NAME}", "--skipInference"]


def trtexec_latency_command(settings: BuilderSettings, batch: int, engine_name: str = ENGINE_NAME) -> list[str]:
    """trtexec timing the built engine at one batch size: its 'GPU Compute Time' median is the device latency.
    Spin-waiting is 11.x's default and an opt-in flag before."""
    shape = (batch, *settings.opt_shape[1:])
    command = ["trtexec", f"--loadEngine={engine_name}", f"--shapes={_shape(settings.input_name, shape)}"]
    if settings.dla_core >= 0:
        command.append(f"--useDLACore={settings.dla_core}")
    return command + ["--warmUp=500", "--duration=10"] + (["--useSpinWait"] if settings.tensorrt_major < 11 else [])


def recipes(target, model: onnx.ModelProto, onnx_name: str) -> dict:
    """Per TensorRT major version: the builder settings and trtexec lines, or why that version cannot build it."""
    out = {}
    for major in MAJORS:
        try:
            settings = builder_settings(target, model, major)
        except StageFailed as exc:
            out[f"{major}.x"] = {"unsupported": str(exc)}
            continue
        out[f"{major}.x"] = {"builder": settings.to_dict(),
                             "trtexec": shlex.join(trtexec_build_command(settings, onnx_name)),
                             "trtexec_latency": {f"bs{b}": shlex.join(trtexec_latency_command(settings, b))
                                                 for b in target.batch}}
    return out


def check_qdq(path: Path) -> list[str]:
    """TensorRT's explicit-quantization rules (qdq_check.py): symmetric int8, zero point 0, fusable Q/DQ."""
    return check_tensorrt_qdq(path)


def installed_major() -> int:
    version = trt_device.tensorrt_version()
    return int(version.split(".")[0]) if version else DEFAULT_MAJOR


def export(ctx, source: Path, out_dir: Path) -> dict:
    from . import dla
    from .trt_build import build_engine

    target = ctx.target
    model = onnx.load(str(source))
    source_format = onnx_format(source)
    qdq = {"checked": False}
    if target.precision != "int8" and "int8" in source_format:
        raise StageFailed(f"{target.name} asks for {target.precision} but the quantize stage wrote {source_format}")
    if target.precision == "int8":
        if source_format != "onnx-qdq-int8":
            raise StageFailed(f"{target.name} builds an int8 engine from explicit Q/DQ ONNX, but the quantize stage "
                              f"wrote {source_format}")
        violations = check_qdq(source)
        if violations:
            raise StageFailed(f"the quantized model breaks TensorRT's Q/DQ rules ({len(violations)}): "
                              + "; ".join(violations[:3]) + ("; ..." if len(violations) > 3 else ""))
        qdq = {"checked": True, "checker": "edgecompress.backends.qdq_check.check_tensorrt_qdq", "violations": []}
    artifact = out_dir / "model.onnx"
    with files.atomic_path(artifact) as tmp:
        shutil.copyfile(source, tmp)
    by_version = recipes(target, model, artifact.name)
    major = installed_major()
    here = by_version.get(f"{major}.x")
    if here is None or "unsupported" in here:
        raise StageFailed((here or {}).get("unsupported") or f"TensorRT {major} is not one of {MAJORS}")
    settings = builder_settings(target, model, major)
    reason = trt_device.unavailable_reason()
    record: dict = {"format": source_format, "artifact": artifact.name, "onnx": artifact.name,
                    "sha256": files.sha256(artifact), **io_description(model), "qdq_check": qdq,
                    "tensorrt_major": major, "builder": here["builder"], "trtexec": here["trtexec"],
                    "trtexec_latency": here["trtexec_latency"], "by_tensorrt_version": by_version}
    unverified = []
    if reason:
        record["engine"] = None
        earlier = _earlier_engine(out_dir)
        if earlier:
            record["engine_from_earlier_build"] = earlier
        lines = "; or ".join(f"`{v['trtexec']}` (TensorRT {k})" for k, v in by_version.items() if "trtexec" in v)
        unverified.append(f"tensorrt engine build: {reason}; build it on the device in export/{target.name}/ with "
                          f"{lines}")
        unverified.append(f"on-device latency ({target.name}): not measured here; time the engine on the device with "
                          f"`{here['trtexec_latency'][f'bs{target.batch[0]}']}`")
    else:
        record["engine"] = build_engine(artifact, settings, out_dir / ENGINE_NAME, ctx.log) | {
            "built_on": trt_device.environment()}
        record["artifact"], record["sha256"] = ENGINE_NAME, record["engine"]["engine_sha256"]
    if dla.wanted(target):
        report = dla.report(model, target, settings)
        files.write_json(out_dir / "dla_report.json", report)
        files.write_text(out_dir / "dla_report.md", dla.markdown(report))
        record["dla_report"] = {"json": "dla_report.json", "markdown": "dla_report.md",
                                "summary": report["summary"]}
        if record["engine"] is None and target.tensorrt.dla_core >= 0:
            unverified.append(f"DLA placement: predicted from the ONNX graph and TensorRT's DLA layer rules; the "
                              f"builder on the device decides (the trtexec line writes its placement to "
                              f"{LAYER_INFO_NAME})")
    record["verify_with"] = {"file": artifact.name, "runtime": runtime_label(source_format),
                             "providers": ["CPUExecutionProvider"]}
    record["unverified"] = unverified
    return record


def _earlier_engine(out_dir: Path) -> dict | None:
    """The engine record of an earlier export whose engine file is still here (kept by keep_on_rebuild), if any."""
    import json

    try:
        earlier = json.loads((out_dir / "build.json").read_text()).get("engine")
    except (OSError, ValueError):
        return None
    if earlier and (out_dir / ENGINE_NAME).is_file() and files.sha256(out_dir / ENGINE_NAME) == earlier.get(
            "engine_sha256"):
        return earlier
    return None


def tensorrt_scheme(target) -> Scheme:
    """TensorRT explicit quantization: int8 symmetric activations (zero point 0), int8 per-channel weights on
    the output-channel axis, float bias, Q/DQ on the inputs of weighted ops and of residual Adds but not on
    the outputs of weighted ops, with Relu kept, so TensorRT fuses Conv+Relu+Add (its placement
    recommendations; ONNX Runtime's quantizer puts Q/DQ on both inputs of an Add, so the graph edit
    qdq_check.unquantize_fused_add_inputs moves them). The profile's activation_type/weight_type do not apply:
    TensorRT accepts only this."""
    return Scheme("tensorrt-explicit-qdq", "int8", "int8", "int8", True, activation_symmetric=True,
                  quantize_bias=False, keep_relu=True, float_outputs=("Conv", "ConvTranspose", "Gemm", "MatMul"),
                  graph_edit="tensorrt-residual-adds",
                  rationale="TensorRT's explicit quantization is symmetric int8 with per-channel weights; "
                            "checked by edgecompress.backends.qdq_check.check_tensorrt_qdq")


STAND_IN_NOTE = ("accuracy measured with ONNX Runtime on this host on the same graph TensorRT takes, not with the "
                 "TensorRT engine; latencies in the report are ONNX Runtime on this host's CPU")


class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("int8", "fp16", "fp32")
    options_table = "tensorrt"
    times_on_host = False  # candidates timed in ONNX Runtime here say nothing about the GPU

    def int8_scheme(self, target) -> Scheme:
        return tensorrt_scheme(target)

    def check_quantized(self, path: Path) -> list[str]:
        return check_qdq(path)

    def export(self, ctx, source: Path, out_dir: Path) -> dict:
        return export(ctx, source, out_dir)

    def environment(self) -> dict:
        """TensorRT's version and the GPU: what makes an engine (the driver and L4T are recorded, not compared)."""
        here = trt_device.environment()
        return {"tensorrt": here["tensorrt"], "device": here["device"]}

    def keep_on_rebuild(self, target, out_dir: Path) -> set[str]:
        """The timing cache (reusing it is its purpose) and, where this host cannot build an engine, the engine an
        earlier build left (made on the device: nothing here could make it again)."""
        keep = {target.tensorrt.timing_cache} - {""}
        if trt_device.unavailable_reason():
            keep |= {ENGINE_NAME, LAYER_INFO_NAME, "build.json"}
        return keep

    def artifact_runner(self, ctx, build: dict) -> ArtifactRunner:
        """The engine where it exists and this host may run it; else ONNX Runtime on the same Q/DQ graph."""
        out_dir = ctx.out / "export" / ctx.target.name
        onnx_path = out_dir / build["verify_with"]["file"]
        stand_in = ort_artifact_runner(ctx, build)
        engine = build.get("engine")
        if not engine or trt_device.unavailable_reason():
            stand_in.on_target, stand_in.note = False, STAND_IN_NOTE
            return stand_in
        why = trt_device.mismatch(engine.get("built_on", {}), trt_device.environment())
        if why:
            raise StageFailed(f"export/{ctx.target.name}/{ENGINE_NAME} was built elsewhere ({why}): rebuild it here "
                              f"with `edgecompress export {ctx.out} --force`")
        from .trt_build import TensorRTRunner, trtexec_times

        options = ctx.target.tensorrt
        engine_path, dla_core = out_dir / ENGINE_NAME, options.dla_core
        label = f"tensorrt-{ctx.target.precision}"
        extra = {}
        if shutil.which("trtexec"):
            extra["trtexec_gpu_compute_ms"] = {key: trtexec_times(shlex.split(line), out_dir)
                                               for key, line in build["trtexec_latency"].items()}
        return ArtifactRunner(lambda threads: TensorRTRunner(engine_path, dla_core, label, options.min_batch,
                                                             options.max_batch), label, path=engine_path,
                              file_format=f"tensorrt-engine-{ctx.target.precision}",
                              reference=lambda threads: OrtRunner(onnx_path, threads, stand_in.runtime), extra=extra)

    def docker_run_flags(self, target) -> list[str]:
        if target.docker.platform == "linux/arm64":
            # Jetson: the NVIDIA container runtime exposes the integrated GPU and DLA; its device nodes belong to
            # the video group, which a container started with --user (the host's uid) is not in without this
            return ["--runtime", "nvidia", "--group-add", "video"]
        return ["--gpus", "all"]  # a dGPU host: the NVIDIA Container Toolkit


BACKEND = register(TensorRTBackend())
register_qdq_edit("tensorrt-residual-adds", unquantize_fused_add_inputs)
