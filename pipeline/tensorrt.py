"""TensorRT export: the Q/DQ ONNX TensorRT takes, the builder settings from the target profile, the equivalent
trtexec command line, and the engine itself where this host has the tensorrt package and a CUDA device.

Settings map to TensorRT's Python API (TensorRT 10):
- network: `builder.create_network(1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)` for explicit Q/DQ graphs
  (every tensor's type comes from the graph; no precision flags), else weak typing with BuilderFlag.INT8/FP16;
- `config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`;
- DLA: `config.default_device_type = DeviceType.DLA`, `config.DLA_core = n`, BuilderFlag.GPU_FALLBACK;
- `builder.create_optimization_profile()` with `set_shape(input, min, opt, max)` over the batch axis;
- `config.create_timing_cache(bytes)` / `set_timing_cache`, saved after the build for the next one.
trtexec takes the same settings as --stronglyTyped / --int8 / --fp16, --memPoolSize=workspace:NM, --useDLACore,
--allowGPUFallback, --minShapes / --optShapes / --maxShapes and --timingCacheFile.
Without TensorRT or a CUDA device nothing is faked: build.json holds the command to finish on the device and
`unverified` names the engine build and the on-device latency.
"""
from __future__ import annotations

import ctypes
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from . import files
from .errors import StageFailed
from .export import io_description, runtime_label
from .runner import RunContext

ENGINE_NAME = "model.engine"


@dataclass(frozen=True)
class BuilderSettings:
    """Everything the builder is told, in TensorRT's own names, from one target profile and one ONNX input."""

    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag
    workspace_bytes: int
    dla_core: int                   # -1: GPU only
    timing_cache: str               # file name beside the engine, "" for none

    @property
    def network_flags(self) -> tuple[str, ...]:
        """Names in trt.NetworkDefinitionCreationFlag."""
        return ("STRONGLY_TYPED",) if self.strongly_typed else ()

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


def builder_settings(target, model: onnx.ModelProto) -> BuilderSettings:
    """The profile's [tensorrt] table and precision as builder settings for this model."""
    options, precision = target.tensorrt, target.precision
    name, chw = input_chw(model)
    if options.strongly_typed:
        # Strong typing takes each tensor's type from the graph: int8 from the Q/DQ pairs, fp16 from an fp16 graph.
        if precision == "fp16" and not graph_is_fp16(model):
            raise StageFailed(f"{target.name}: strongly_typed with precision fp16 needs an fp16 graph, but the "
                              "quantized model is fp32: set strongly_typed = false (the FP16 builder flag) "
                              "or quantize to fp16")
        flags: tuple[str, ...] = ()
    else:
        flags = {"int8": ("INT8",), "fp16": ("FP16",), "fp32": ()}[precision]
    if options.dla_core >= 0 and options.gpu_fallback:
        flags += ("GPU_FALLBACK",)
    return BuilderSettings(
        input_name=name, min_shape=(options.min_batch, *chw), opt_shape=(options.opt_batch, *chw),
        max_shape=(options.max_batch, *chw), strongly_typed=options.strongly_typed, builder_flags=flags,
        workspace_bytes=options.workspace_mib << 20, dla_core=options.dla_core, timing_cache=options.timing_cache)


def _shape(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}:{'x'.join(map(str, shape))}"


def trtexec_build_command(settings: BuilderSettings, onnx_name: str, engine_name: str = ENGINE_NAME) -> list[str]:
    """The trtexec invocation that builds the same engine as `build_engine` (TensorRT 10 flags)."""
    flag_options = {"INT8": "--int8", "FP16": "--fp16", "GPU_FALLBACK": "--allowGPUFallback"}
    command = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    if settings.strongly_typed:
        command.append("--stronglyTyped")
    command += [flag_options[f] for f in settings.builder_flags]
    command.append(f"--memPoolSize=workspace:{settings.workspace_bytes >> 20}M")
    if settings.dla_core >= 0:
        command.append(f"--useDLACore={settings.dla_core}")
    command += [f"--minShapes={_shape(settings.input_name, settings.min_shape)}",
                f"--optShapes={_shape(settings.input_name, settings.opt_shape)}",
                f"--maxShapes={_shape(settings.input_name, settings.max_shape)}"]
    if settings.timing_cache:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    return command


def trtexec_latency_command(settings: BuilderSettings, batch: int, engine_name: str = ENGINE_NAME) -> list[str]:
    """trtexec timing the built engine at one batch size: its 'GPU Compute Time' median is the device latency."""
    shape = (batch, *settings.opt_shape[1:])
    command = ["trtexec", f"--loadEngine={engine_name}", f"--shapes={_shape(settings.input_name, shape)}"]
    if settings.dla_core >= 0:
        command.append(f"--useDLACore={settings.dla_core}")
    return command + ["--warmUp=500", "--duration=10", "--useSpinWait"]


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver): libcuda's cuInit + cuDeviceGetCount, no toolkit needed."""
    for library in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def unavailable_reason() -> str:
    """Why this host cannot build a TensorRT engine, or "" when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'edgecompress[tensorrt]' on the device)"
    if cuda_device_count() == 0:
        return "no CUDA device (the CUDA driver reports none)"
    return ""


def build_engine(onnx_path: Path, settings: BuilderSettings, engine_path: Path) -> dict:
    """Build and serialise the engine with TensorRT's Python API; returns what the builder decided."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in settings.network_flags:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageFailed(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for name in settings.builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise StageFailed(f"TensorRT {trt.__version__} has no BuilderFlag.{name} (TensorRT 11 dropped the "
                              "precision flags): set strongly_typed = true in the target's [tensorrt] table")
        config.set_flag(getattr(trt.BuilderFlag, name))
    if settings.dla_core >= 0:
        if builder.num_DLA_cores <= settings.dla_core:
            raise StageFailed(f"dla_core = {settings.dla_core} but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, settings.min_shape, settings.opt_shape, settings.max_shape)
    config.add_optimization_profile(profile)
    cache_path = engine_path.parent / settings.timing_cache if settings.timing_cache else None
    if cache_path:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    placement = {}
    if settings.dla_core >= 0:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            placement[layer.name] = "DLA" if config.can_run_on_DLA(layer) else "GPU"
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageFailed(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    with files.atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path:
        with files.atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "engine": engine_path.name, "engine_sha256": files.sha256(engine_path),
            "layers": network.num_layers, "dla_placement": placement}


def check_qdq(path: Path) -> list[str]:
    """TensorRT's explicit-quantization rules (pipeline/qdq_check.py): symmetric int8, zero point 0, fusable Q/DQ."""
    from .qdq_check import check_tensorrt_qdq

    return check_tensorrt_qdq(path)


def export(ctx: RunContext, source: Path, out_dir: Path) -> dict:
    from . import dla
    from .verify import onnx_format

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
        qdq = {"checked": True, "checker": "edgecompress.qdq_check.check_tensorrt_qdq", "violations": []}
    settings = builder_settings(target, model)
    artifact = out_dir / "model.onnx"
    with files.atomic_path(artifact) as tmp:
        shutil.copyfile(source, tmp)

    build_command = trtexec_build_command(settings, artifact.name)
    latency_commands = {f"bs{b}": shlex.join(trtexec_latency_command(settings, b)) for b in target.batch}
    reason = unavailable_reason()
    record: dict = {"format": source_format, "artifact": artifact.name, "sha256": files.sha256(artifact),
                    **io_description(model), "qdq_check": qdq, "builder": settings.to_dict(),
                    "trtexec": shlex.join(build_command), "trtexec_latency": latency_commands}
    unverified = []
    if reason:
        record["engine"] = None
        unverified.append(f"tensorrt engine build: {reason}; build it on the device with `{shlex.join(build_command)}`"
                          f" in export/{target.name}/")
    else:
        built = build_engine(artifact, settings, out_dir / ENGINE_NAME)
        record["engine"] = built
    unverified.append(f"on-device latency ({target.name}): not measured here; time the engine on the device with "
                      f"`{latency_commands[f'bs{target.batch[0]}']}`")
    if dla.wanted(target):
        report = dla.report(model, target, settings)
        files.write_json(out_dir / "dla_report.json", report)
        files.write_text(out_dir / "dla_report.md", dla.markdown(report))
        record["dla_report"] = {"json": "dla_report.json", "markdown": "dla_report.md",
                                "summary": report["summary"]}
        if record["engine"] is None and target.tensorrt.dla_core >= 0:
            unverified.append("DLA placement: predicted from the ONNX graph and TensorRT's DLA layer rules; "
                              "the builder on the device decides (trtexec --verbose prints the final placement)")
    record["verify_with"] = {
        "file": artifact.name, "runtime": runtime_label(source_format), "providers": ["CPUExecutionProvider"],
        "note": "accuracy measured with ONNX Runtime on this host on the same graph TensorRT takes, not with the "
                "TensorRT engine; latencies in the report are ONNX Runtime on this host's CPU"}
    record["unverified"] = unverified
    return record
