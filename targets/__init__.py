"""Device target profiles: one TOML file per target in this folder; a user's own TOML path works the same.

A profile says which runtime runs the artifact (ONNX Runtime, ONNX Runtime mobile or TensorRT), at which precision,
with which threads, execution providers and TensorRT builder options, under which budgets, and which Docker
image builds it. Unknown keys and bad values are refused with one line naming the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6 is Ubuntu 22.04): the same parser from PyPI
    import tomli as tomllib

from edgecompress.errors import BadInput

PROFILE_DIR = Path(__file__).parent
RUNTIMES = ("onnxruntime", "onnxruntime-mobile", "tensorrt", "openvino")  # edgecompress.backends.BACKENDS' names (a test checks)
PRECISIONS = ("int8", "fp16", "fp32")
QUANT_TYPES = ("uint8", "int8")
PLATFORMS = ("linux/amd64", "linux/arm64")
# Execution providers a profile may name: ONNX Runtime's own names (onnxruntime.get_all_providers() lists them).
EXECUTION_PROVIDERS = ("CPUExecutionProvider", "XnnpackExecutionProvider", "NnapiExecutionProvider",
                       "CoreMLExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                       "QNNExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider")


MAX_THREADS = 1024  # intra-op threads of a target: more than the largest servers' cores


@dataclass(frozen=True)
class Budgets:
    max_accuracy_drop: float = 2.0  # points of top-1 below the teacher
    max_latency_ms: float = 0.0     # first batch size's p50; 0 means no limit
    min_speedup: float = 0.0        # teacher p50 / artifact p50 at the first batch size; 0 means no limit
    max_size_mb: float = 0.0        # the artifact file in MB (10^6 bytes), what an app or image ships; 0: no limit


@dataclass(frozen=True)
class TensorRTOptions:
    """TensorRT builder settings (IBuilderConfig and the optimisation profile); used when runtime = tensorrt."""

    workspace_mib: int = 1024      # MemoryPoolType.WORKSPACE limit
    dla_core: int = -1             # DLA core to run on, -1 for the GPU only
    gpu_fallback: bool = True      # BuilderFlag.GPU_FALLBACK: layers DLA cannot run go to the GPU
    strongly_typed: bool = True    # NetworkDefinitionCreationFlag.STRONGLY_TYPED: precision from the graph's Q/DQ
    min_batch: int = 1             # optimisation profile on the batch axis: min / opt / max
    opt_batch: int = 1
    max_batch: int = 64
    timing_cache: str = "timing.cache"  # file in export/<target>/, reused between builds; "" for none


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """ONNX Runtime session settings the artifact runs with, and is timed with (runtimes onnxruntime*)."""

    # disabled | basic | extended | all: "all" adds the layout rewrites (NCHWc, NHWC int8) for the CPU it runs on
    graph_optimization_level: str = "all"
    # intra-op threads spin-wait between operators: lower latency with several threads, but they burn CPU time
    # (and a phone's battery) while idle; no effect with threads = 1
    allow_spinning: bool = True


GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class OpenVINOOptions:
    """OpenVINO CPU plugin properties the artifact runs with, and is timed with (runtime openvino)."""

    performance_hint: str = "LATENCY"    # LATENCY | THROUGHPUT (ov::hint::performance_mode)
    num_streams: int = 1                  # parallel inference streams; 1 for one request at a time
    inference_precision: str = "f32"      # f32 | bf16: the precision of the layers left in float


PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "bf16")


@dataclass(frozen=True)
class DockerOptions:
    """The image that builds and verifies this target's artifact from a mounted run directory."""

    dockerfile: str = "docker/cpu.Dockerfile"  # relative to the repository root
    base_image: str = "python:3.11.11-slim-bookworm"
    platform: str = "linux/amd64"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    precision: str = "int8"
    opset: int = 17
    batch: tuple[int, ...] = (1, 64)
    threads: int = 1
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    tensorrt: TensorRTOptions | None = None
    onnxruntime: OnnxRuntimeOptions = field(default_factory=OnnxRuntimeOptions)
    openvino: OpenVINOOptions | None = None
    docker: DockerOptions = field(default_factory=DockerOptions)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TABLES = {"budgets": Budgets, "tensorrt": TensorRTOptions, "onnxruntime": OnnxRuntimeOptions,
          "openvino": OpenVINOOptions, "docker": DockerOptions}


def names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load(name_or_path: str) -> Target:
    """A shipped target by name, or a TOML file by path."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") and path.is_file()):
        if name_or_path.endswith(".toml"):
            raise BadInput(f"unknown target {name_or_path!r}: no such file")
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            hint = difflib.get_close_matches(name_or_path, names(), n=1)
            raise BadInput(f"unknown target {name_or_path!r}"
                           f"{f' (did you mean {hint[0]!r}?)' if hint else ''}: choose one of "
                           f"{', '.join(names())} or give a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"target file {path}: {exc}") from None
    return _build(raw, str(path))


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}


def _unknown(keys, cls, where: str) -> None:
    valid = _fields(cls)
    for key in keys:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            raise BadInput(f"{where}: unknown key {key!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                           f"valid keys: {', '.join(valid)}")


def _typed(value, kind, key: str, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInput(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def _choice(value, valid: tuple[str, ...], key: str, where: str):
    if value not in valid:
        hint = difflib.get_close_matches(str(value), valid, n=1)
        raise BadInput(f"{where}: {key} = {value!r} is not one of {', '.join(valid)}"
                       f"{f' (did you mean {hint[0]!r}?)' if hint else ''}")
    return value


def _table(raw: dict, cls, where: str) -> dict:
    """A sub-table's values, typed by the dataclass's defaults."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: must be a table")
    _unknown(raw, cls, where)
    defaults = cls()
    return {key: _typed(value, type(getattr(defaults, key)), key, where) for key, value in raw.items()}


def _check_budgets(values: dict, where: str) -> None:
    for key, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise BadInput(f"{where}: {key} must be a finite number >= 0, got {value}")


def _check_tensorrt(options: TensorRTOptions, precision: str, where: str) -> None:
    if options.workspace_mib < 1:
        raise BadInput(f"{where}: workspace_mib must be >= 1")
    if options.dla_core < -1:
        raise BadInput(f"{where}: dla_core must be -1 (GPU only) or a DLA core number >= 0")
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise BadInput(f"{where}: the batch profile needs 1 <= min_batch <= opt_batch <= max_batch, got "
                       f"{options.min_batch} / {options.opt_batch} / {options.max_batch}")
    if options.dla_core >= 0:
        if precision == "fp32":
            raise BadInput(f"{where}: DLA runs int8 or fp16 only: set precision to int8 or fp16, or dla_core = -1")
        if options.strongly_typed:
            # trtexec's --useDLACore sets the FP16 flag (TensorRT 10, sampleEngines.cpp), which a strongly typed
            # network refuses at build time; TensorRT 11 types every network strongly and sets no flag
            raise BadInput(f"{where}: DLA builds on TensorRT 10 are weakly typed (the FP16 flag that DLA needs is "
                           "refused by a strongly typed network): set strongly_typed = false")
        if precision == "int8":
            # TensorRT builds int8 on DLA only from calibration scales (implicit quantization), never from the
            # explicit Q/DQ graph this pipeline makes ("DLA does not support explicit quantization")
            raise BadInput(f"{where}: int8 on DLA needs TensorRT's implicit quantization, and edgecompress makes "
                           "explicit Q/DQ graphs: set precision = \"fp16\" on DLA, or dla_core = -1 for int8 on the GPU")
        if options.min_batch != options.max_batch:
            # TensorRT's DLA restrictions: no dynamic dimensions, so the profile must be one shape.
            raise BadInput(f"{where}: DLA needs a fixed shape: set min_batch = opt_batch = max_batch")
    if options.timing_cache and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", options.timing_cache):
        raise BadInput(f"{where}: timing_cache must be a plain file name (it lives in export/<target>/), "
                       f"got {options.timing_cache!r}")


def _build(raw: dict, where: str) -> Target:
    # the runtimes and what each builds are the backends' word (imported here: the backends read profiles' fields)
    from edgecompress import backends

    _unknown(raw, Target, where)
    for required in ("name", "description", "runtime"):
        if required not in raw:
            raise BadInput(f"{where}: missing required key {required!r}")
    tables = {key: _table(raw.pop(key), cls, f"{where} [{key}]") for key, cls in TABLES.items() if key in raw}

    values = {}
    for key, value in raw.items():
        if key in ("batch", "execution_providers"):
            item = int if key == "batch" else str
            if not isinstance(value, list) or not value:
                raise BadInput(f"{where}: {key} must be a non-empty list")
            values[key] = tuple(_typed(v, item, key, where) for v in value)
        elif key in TABLES:
            raise BadInput(f"{where}: {key} must be a table ([{key}])")
        else:
            kind = {"opset": int, "threads": int, "per_channel": bool}.get(key, str)
            values[key] = _typed(value, kind, key, where)
    choices = {"runtime": RUNTIMES, "precision": PRECISIONS, "activation_type": QUANT_TYPES, "weight_type": QUANT_TYPES}
    for key, valid in choices.items():
        if key in values:
            _choice(values[key], valid, key, where)
    for provider in values.get("execution_providers", ()):
        _choice(provider, EXECUTION_PROVIDERS, "execution_providers entry", where)
    if any(b < 1 for b in values.get("batch", (1,))) or values.get("threads", 1) < 1:
        raise BadInput(f"{where}: batch sizes and threads must be >= 1")
    if values.get("threads", 1) > MAX_THREADS:  # ONNX Runtime crashes without a word on absurd thread counts
        raise BadInput(f"{where}: threads = {values['threads']} is more than any device has; at most {MAX_THREADS}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", values["name"]):
        # the name becomes the folder export/<name>/ inside the run directory
        raise BadInput(f"{where}: name {values['name']!r} must be letters, digits, '.', '_' or '-' "
                       "(at most 64, not starting with '.')")
    if not 13 <= values.get("opset", 17) <= 21:
        raise BadInput(f"{where}: opset must be between 13 and 21")

    budgets = tables.get("budgets", {})
    _check_budgets(budgets, f"{where} [budgets]")
    precision = values.get("precision", "int8")
    backend = backends.get(values["runtime"])
    if precision not in backend.precisions:
        builds = [name for name, b in backends.BACKENDS.items() if precision in b.precisions]
        raise BadInput(f"{where}: precision = '{precision}' needs runtime = '{' or '.join(builds)}'; "
                       f"for {values['runtime']} choose {' or '.join(backend.precisions)}")
    tensorrt = None
    if backend.options_table == "tensorrt":
        tensorrt = TensorRTOptions(**tables.get("tensorrt", {}))
        _check_tensorrt(tensorrt, precision, f"{where} [tensorrt]")
        batches = values.get("batch", Target.batch)
        if max(batches) > tensorrt.max_batch or min(batches) < tensorrt.min_batch:
            raise BadInput(f"{where}: batch sizes {list(batches)} must lie within the engine's profile, [tensorrt] "
                           f"min_batch = {tensorrt.min_batch} to max_batch = {tensorrt.max_batch}")
    elif "tensorrt" in tables:
        needs = [name for name, b in backends.BACKENDS.items() if b.options_table == "tensorrt"]
        raise BadInput(f"{where}: a [tensorrt] table needs runtime = '{' or '.join(needs)}' "
                       f"(runtime is {values['runtime']!r})")
    if "openvino" in tables and backend.options_table != "openvino":
        raise BadInput(f"{where}: an [openvino] table needs runtime = 'openvino' (runtime is {values['runtime']!r})")
    openvino = None
    if backend.options_table == "openvino":
        openvino = OpenVINOOptions(**tables.get("openvino", {}))
        _choice(openvino.performance_hint, PERFORMANCE_HINTS, "performance_hint", f"{where} [openvino]")
        _choice(openvino.inference_precision, INFERENCE_PRECISIONS, "inference_precision", f"{where} [openvino]")
        if openvino.num_streams < 1:
            raise BadInput(f"{where} [openvino]: num_streams must be >= 1")
    onnxruntime = OnnxRuntimeOptions(**tables.get("onnxruntime", {}))
    _choice(onnxruntime.graph_optimization_level, GRAPH_OPTIMIZATION_LEVELS, "graph_optimization_level",
            f"{where} [onnxruntime]")
    docker = DockerOptions(**tables.get("docker", {}))
    _choice(docker.platform, PLATFORMS, "platform", f"{where} [docker]")
    pinned = re.fullmatch(r"[^\s:@]+:([\w.-]+)(@sha256:[0-9a-f]{64})?", docker.base_image)
    if not pinned or pinned.group(1) == "latest":
        raise BadInput(f"{where} [docker]: base_image must be pinned as repository:tag (not latest), "
                       f"got {docker.base_image!r}")
    return Target(**values, budgets=Budgets(**budgets), tensorrt=tensorrt, onnxruntime=onnxruntime,
                  openvino=openvino, docker=docker, source=where)
