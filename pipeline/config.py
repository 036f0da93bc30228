"""Run configuration as plain dataclasses; `run.toml` is their resolved form plus versions and host."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import platform
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6 is Ubuntu 22.04): the same parser from PyPI
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput


@dataclass
class TeacherConfig:
    spec: str = "resnet18_half"  # zoo name, torchvision:NAME, timm:NAME, TorchScript or ONNX file, or file.py:factory
    weights: str = ""            # state dict for a zoo or factory teacher; zoo weights shipped for fashion-mnist
    # more teachers, for methods that take several (multi-teacher): specs, and weights paired with them by
    # position (empty, or one entry per spec with "" where a teacher needs none)
    extra: list = field(default_factory=list)
    extra_weights: list = field(default_factory=list)


@dataclass
class PreprocessConfig:
    """The preprocessing contract as declared (data/preprocess.py); empty fields come from the teacher, else
    from the data."""

    size: list = field(default_factory=list)  # [224] or [224, 160] (height, width) the models take
    resize: int = -1          # shorter side before a center crop to `size`; 0: straight to `size`; -1: the teacher's
    interpolation: str = ""   # bilinear | bicubic | nearest ("": the teacher's, else bilinear)
    mean: list = field(default_factory=list)  # per channel, on [0, 1] pixels ([]: the teacher's, else measured)
    std: list = field(default_factory=list)
    channels: str = ""        # rgb | grey ("": the teacher's, else the data's first image's)


@dataclass
class DistillConfig:
    student: str = "resnet_fast_tapered"  # zoo name, torchvision:NAME, timm:NAME, path/to/file.py:factory, or auto
    method: str = "hinton"            # a name from `edgecompress methods`
    # options of the method (`edgecompress methods` lists them with their paper defaults); they win over
    # temperature/alpha below
    method_opts: dict = field(default_factory=dict)
    temperature: float = 4.0          # Hinton KD's T (also multi-teacher, cross-modal); Hinton et al. use [2, 20]
    alpha: float = 0.9                # Hinton KD's weight of the KD term; 1 - alpha weighs cross-entropy on labels
    # the default compress (Fashion-MNIST, resnet_fast_tapered, Hinton KD, lr 0.2), int8 top-1: 4 epochs 93.36%
    # (1.02 pt below the teacher), 5 epochs 93.68% (0.70 pt) in 278 s of a first run; a sixth would pass 5 minutes
    epochs: int = 5
    batch: int = 128
    lr: float = 0.2                   # OneCycle's peak learning rate (SGD, Nesterov momentum 0.9)
    weight_decay: float = 5e-4
    max_grad_norm: float = 0.0        # clip the gradient's global L2 norm to this before each step; 0: never
    precision: str = "auto"           # auto: bf16 autocast where the CPU has AVX-512 BF16 / AMX, CUDA when present
    # training augmentation of the images: none | flip | crop-flip (random-resized-crop + horizontal flip)
    augment: str = "none"
    augment_scale: list = field(default_factory=lambda: [0.35, 1.0])  # crop area fraction (torchvision: 0.08-1)
    # teacher answers on augmented views: cache (FKD: recorded once per epoch, replayed by later runs) | online
    soft_labels: str = "cache"
    soft_label_topk: int = 16         # logits kept per image in the FKD cache (all of them up to 16 classes)
    # feature, relation and contrastive methods on un-augmented images: the teacher's features of every training
    # image are computed once and kept on disk (read through mmap) when they take at most this many GB, instead
    # of running the teacher every step; 0: always run it
    feature_cache_gb: float = 4.0


@dataclass
class QuantizeConfig:
    calibration_method: str = "minmax"  # minmax | entropy | percentile | auto (each tried, best probe SQNR kept)
    calibration_size: int = 512         # training images, stratified over classes
    bias_correction: bool = True        # cancel the mean output shift int8 weights cause (Nagel et al. 2019)
    max_drop_vs_fp32: float = 0.3       # selection top-1 points the int8 model may lose against the fp32 student
    fallback: bool = True               # keep the most sensitive nodes in float until the budget holds
    max_float_nodes: int = 4            # at most this many weighted nodes kept in float
    probe_size: int = 1000              # training images (not calibration) that rank node sensitivity
    # training images (not calibration or probe; at most a fifth of them) the tries are judged and chosen on; the
    # eval split only reports. 10,000: on 2,000 the sign test let a 0.6-pt drop through (1.28 pt on the test set)
    selection_size: int = 10000
    qat_epochs: int = 1                 # quantization-aware fine-tuning when the fallback misses; 0: never
    qat_images: int = 10000             # training images per QAT epoch
    qat_lr: float = 1e-4                # Adam: the outlier-channel case diverged under SGD at 2e-3 and 2e-4
    qat_scale_lr: float = 1e-2          # Adam on the activation quantizers' log step sizes


@dataclass
class VerifyConfig:
    latency_runs_bs1: int = 300
    latency_runs_batch: int = 30
    warmup_runs: int = 20
    eval_batch: int = 500
    latency_sessions: int = 6  # fresh sessions per model and batch size; their spread is part of the p50 interval
    # per model and batch size, warm-up included: once each session has 2 timed calls, timing stops at this many
    # seconds (the teacher at 224 px, batch 64, one thread: seconds per call)
    latency_max_seconds: float = 20.0


@dataclass
class RunConfig:
    data: str = "fashion-mnist"
    target: str = "x86-cpu"
    seed: int = 0
    skip_bad_images: bool = False  # leave unreadable files of an image folder out (counted in run.toml)
    max_latency_ms: float = 0.0  # batch-1 p50 budget; > 0 overrides the target's, and `--student auto` fits it
    loader_workers: int = 0  # processes decoding an image folder; 0: one per core (at most 8)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_paths(self) -> "RunConfig":
        """Make file arguments absolute, so the one-stage subcommands work from any directory."""

        def absolute(spec: str) -> str:
            file, sep, name = spec.rpartition(":")
            if sep and file.endswith(".py"):  # path/to/file.py:factory
                return f"{Path(file).resolve()}:{name}" if Path(file).exists() else spec
            reserved = spec == "fashion-mnist" or spec in _zoo_names()
            return str(Path(spec).resolve()) if spec and not reserved and Path(spec).exists() else spec

        self.data = absolute(self.data)
        self.teacher.spec, self.teacher.weights = absolute(self.teacher.spec), absolute(self.teacher.weights)
        self.teacher.extra = [absolute(s) for s in self.teacher.extra]
        self.teacher.extra_weights = [absolute(w) for w in self.teacher.extra_weights]
        view = self.distill.method_opts.get("view")
        if isinstance(view, str) and ".py:" in view:  # cross-modal's user pair transform
            self.distill.method_opts["view"] = absolute(view)
        self.distill.student = absolute(self.distill.student)
        self.target = absolute(self.target) if self.target.endswith(".toml") else self.target
        return self

    def code_files(self) -> list[Path]:
        """The files whose code a run executes: factory files (`file.py:name`, the teachers', the student's and a
        cross-modal view's) and TorchScript teachers (TorchScript is code too)."""
        from edgecompress.models.loaders import is_factory_spec, is_torchscript

        specs = [self.teacher.spec, *self.teacher.extra, self.distill.student]
        view = self.distill.method_opts.get("view")
        if isinstance(view, str):
            specs.append(view)
        found = []
        for spec in specs:
            if is_factory_spec(spec):
                found.append(Path(spec.rpartition(":")[0]).resolve())
            elif spec and Path(spec).is_file() and is_torchscript(Path(spec)):
                found.append(Path(spec).resolve())
        return list(dict.fromkeys(found))

    def validate(self) -> "RunConfig":
        d, v = self.distill, self.verify
        positive = {"--epochs": d.epochs, "distill.batch": d.batch, "quantize.calibration_size":
                    self.quantize.calibration_size, "distill.lr": d.lr, "distill.temperature": d.temperature,
                    "verify.latency_runs_bs1": v.latency_runs_bs1, "verify.latency_runs_batch": v.latency_runs_batch,
                    "verify.eval_batch": v.eval_batch, "verify.latency_sessions": v.latency_sessions,
                    "verify.latency_max_seconds": v.latency_max_seconds}
        for name, value in positive.items():
            if value <= 0:
                raise BadInput(f"{name} must be > 0, got {value}")
        for name, value in {"distill.weight_decay": d.weight_decay, "distill.max_grad_norm": d.max_grad_norm,
                            "distill.feature_cache_gb": d.feature_cache_gb,
                            "verify.warmup_runs": v.warmup_runs,
                            "--max-latency-ms": self.max_latency_ms}.items():
            if value < 0:
                raise BadInput(f"{name} must be >= 0, got {value}")
        if not 0.0 <= d.alpha <= 1.0:
            raise BadInput(f"distill.alpha must be in [0, 1], got {d.alpha}")
        if d.augment not in ("none", "flip", "crop-flip"):
            raise BadInput(f"distill.augment must be none, flip or crop-flip, got {d.augment!r}")
        if d.soft_labels not in ("cache", "online"):
            raise BadInput(f"distill.soft_labels must be cache or online, got {d.soft_labels!r}")
        if not (len(d.augment_scale) == 2 and all(isinstance(v, (int, float)) for v in d.augment_scale)
                and 0 < d.augment_scale[0] <= d.augment_scale[1] <= 1):
            raise BadInput(f"distill.augment_scale must be [low, high] with 0 < low <= high <= 1, got {d.augment_scale}")
        if d.soft_label_topk < 1:
            raise BadInput(f"distill.soft_label_topk must be >= 1, got {d.soft_label_topk}")
        if d.precision not in ("auto", "fp32", "bf16"):
            raise BadInput(f"distill.precision must be auto, fp32 or bf16, got {d.precision!r}")
        self._validate_teachers()
        self._validate_preprocess()
        if self.loader_workers < 0:
            raise BadInput(f"loader_workers must be >= 0, got {self.loader_workers}")
        from edgecompress.models import libraries

        from .distill import methods as distillers  # torch: imported only when a config is checked

        distillers.resolve_options(d.method, d.method_opts)
        for spec in (self.teacher.spec, *self.teacher.extra, d.student):
            if libraries.is_library_spec(spec):  # before any stage runs: the extra is there, the name exists
                libraries.check(spec)
        q = self.quantize
        if q.calibration_method not in ("minmax", "entropy", "percentile", "auto"):
            raise BadInput("quantize.calibration_method must be minmax, entropy, percentile or auto, "
                           f"got {q.calibration_method!r}")
        for name, value in {"quantize.max_drop_vs_fp32": q.max_drop_vs_fp32, "quantize.max_float_nodes":
                            q.max_float_nodes, "quantize.qat_epochs": q.qat_epochs}.items():
            if value < 0:
                raise BadInput(f"{name} must be >= 0, got {value}")
        for name, value in {"quantize.probe_size": q.probe_size, "quantize.selection_size": q.selection_size,
                            "quantize.qat_images": q.qat_images,
                            "quantize.qat_lr": q.qat_lr, "quantize.qat_scale_lr": q.qat_scale_lr}.items():
            if value <= 0:
                raise BadInput(f"{name} must be > 0, got {value}")
        return self

    def _validate_preprocess(self) -> None:
        from .data.preprocess import CHANNELS, INTERPOLATIONS, parse_size

        p = self.preprocess
        try:
            size = parse_size(p.size)
        except ValueError as exc:
            raise BadInput(f"preprocess.size (--input-size): {exc}") from None
        p.size = list(size) if size else []
        if p.resize < -1 or (p.resize > 0 and size and p.resize < max(size)):
            raise BadInput(f"preprocess.resize (--resize) must be 0 (straight to the size), -1 (the teacher's) or a "
                           f"shorter side at least the input size {max(size) if size else ''}, got {p.resize}")
        if p.interpolation not in ("", *INTERPOLATIONS):
            raise BadInput(f"preprocess.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {p.interpolation!r}")
        if p.channels not in ("", *CHANNELS):
            raise BadInput(f"preprocess.channels must be rgb or grey, got {p.channels!r}")
        for name, values in (("mean", p.mean), ("std", p.std)):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise BadInput(f"preprocess.{name} (--{name}) must be numbers, e.g. 0.485,0.456,0.406, got {values!r}")
        if bool(p.mean) != bool(p.std) or len(p.mean) != len(p.std) or len(p.mean) not in (0, 1, 3):
            raise BadInput(f"preprocess.mean and preprocess.std (--mean/--std) go together, one value per channel "
                           f"(1 or 3), got {len(p.mean)} and {len(p.std)}")
        if p.channels and p.mean and len(p.mean) != CHANNELS[p.channels]:
            raise BadInput(f"preprocess.mean has {len(p.mean)} values but channels = {p.channels!r} has "
                           f"{CHANNELS[p.channels]}: give one value per channel")
        if any(v <= 0 for v in p.std):
            raise BadInput(f"preprocess.std must be > 0, got {p.std}")
        if any(not 0 <= v <= 1 for v in p.mean):
            raise BadInput(f"preprocess.mean is on [0, 1] pixels (ImageNet's is 0.485,0.456,0.406), got {p.mean}")
        p.mean, p.std = [float(v) for v in p.mean], [float(v) for v in p.std]

    def _validate_teachers(self) -> None:
        t = self.teacher
        for name, values in (("teacher.extra", t.extra), ("teacher.extra_weights", t.extra_weights)):
            if not all(isinstance(v, str) for v in values) or (name == "teacher.extra" and not all(values)):
                raise BadInput(f"{name} must be a list of file or zoo names, got {values!r}")
        if t.extra_weights and len(t.extra_weights) != len(t.extra):
            raise BadInput(f"teacher.extra_weights has {len(t.extra_weights)} entries for {len(t.extra)} teachers "
                           "in teacher.extra: give one per teacher, in the same order (\"\" for none)")


def _typed(value, kind: type, name: str):
    """`value` as `kind` (an int is a fine float; a bool is never a number), or a BadInput naming the key."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, int) and not isinstance(value, bool):
        value = [value]  # preprocess.size = 224
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInput(f"{name} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, got {value!r}")
    return value


def _zoo_names() -> set[str]:
    from edgecompress.models import ZOO

    return set(ZOO)


def from_dict(raw: dict, where: str) -> RunConfig:
    """Rebuild a RunConfig from run.toml's tables, refusing unknown keys with the nearest valid one."""

    def build(cls, values, prefix: str):
        if not isinstance(values, dict):
            raise BadInput(f"{where}: {prefix.rstrip('.') or 'the file'} must be a table")
        known = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls()
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise BadInput(f"{where}: unknown key {prefix}{key}{f' (did you mean {prefix}{hint[0]}?)' if hint else ''}")
            default = getattr(defaults, key)
            if dataclasses.is_dataclass(default):
                kwargs[key] = build(type(default), value, f"{prefix}{key}.")
            else:
                kwargs[key] = _typed(value, type(default), f"{where}: {prefix}{key}")
        return cls(**kwargs)

    raw = {k: v for k, v in raw.items() if k not in ("versions", "host", "splits", "preprocess_resolved")}
    return build(RunConfig, raw, "").validate()


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    from . import __version__

    found = {"edgecompress": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError:
        found["tensorrt"] = "not installed"
    return found


def host() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "cpu": platform.processor() or "unknown",
            "cpu_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["cpu"] in ("unknown", "", platform.machine()):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                "amx_bf16", "amx_int8", "amx_tile", "fma"})
            break
    import os

    info["cores"] = os.cpu_count()
    return info


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(host()["cpu_flags"]))


def to_toml(data: dict) -> str:
    """TOML for nested dicts of str/int/float/bool and lists of them (all run.toml needs)."""

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if v is None:
            return '""'
        # TOML basic string: UTF-8 as is (JSON's \\uD83D\\uDE00 surrogate pairs are not TOML), control characters
        # escaped; DEL too, which JSON leaves alone and TOML refuses raw
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    lines, tables = [], []

    def emit(table: dict, path: str) -> None:
        for key, value in table.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {scalar(value)}")
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{path}{key}", value))

    emit(data, "")
    while tables:
        path, table = tables.pop(0)
        lines.append(f"\n[{path}]")
        emit(table, path + ".")
    return "\n".join(lines) + "\n"


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
