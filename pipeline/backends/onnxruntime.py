"""ONNX Runtime on CPUs (target runtime `onnxruntime`), and the one place that builds ONNX Runtime sessions.

Export writes the graph ONNX Runtime optimises offline at the portable level, with the profile's session options;
verify runs it in sessions made here with the target's threads, providers and [onnxruntime] settings.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .. import files, schemes
from ..errors import StageFailed
from ..schemes import Scheme
from .base import ArtifactRunner, Backend, register
from .common import check_images, compare_outputs, io_description, onnx_format, runtime_label

ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def _level(settings) -> str:
    return getattr(settings, "graph_optimization_level", "all")


def _spinning(settings) -> bool:
    return getattr(settings, "allow_spinning", True)


def ort_session_options(threads: int, settings=None):
    """Session options with `threads` intra-op threads and a target's [onnxruntime] settings (None: every graph
    optimisation, spinning allowed, ONNX Runtime's own defaults)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[_level(settings)])
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if _spinning(settings) else "0")
    opts.log_severity_level = 3
    return opts


def ort_settings_record(threads: int, providers: list[str], settings=None) -> dict:
    """What a session made by ort_session_options runs with, for reports."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": list(providers), "intra_op_num_threads": threads,
            "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": ORT_LEVELS[_level(settings)], "allow_spinning": _spinning(settings)}


def session(path: Path | bytes, threads: int, providers=("CPUExecutionProvider",), settings=None, options=None):
    """An InferenceSession of a file (or serialised model) with ort_session_options unless `options` are given."""
    import onnxruntime as ort

    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options or ort_session_options(threads, settings), providers=list(providers))


class OrtRunner:
    """ONNX Runtime with the target's execution providers, thread count and [onnxruntime] settings."""

    def __init__(self, path: Path, threads: int, runtime: str, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 settings=None):
        self.path, self.threads, self.runtime, self.providers = path, threads, runtime, list(providers)
        self.ort_settings = settings
        self.session = session(path, threads, self.providers, settings)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def settings(self) -> dict:
        return {"runtime": self.runtime} | ort_settings_record(self.threads, self.providers, self.ort_settings)


def available_providers(wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The profile's execution providers split into those this ONNX Runtime build has and those it lacks."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    present = [p for p in wanted if p in have] or ["CPUExecutionProvider"]
    return present, [p for p in wanted if p not in have]


def load_session(path: Path, threads: int, providers: list[str], target_name: str, settings=None):
    try:
        return session(path, threads, providers, settings)
    except Exception as exc:  # ORT reports unsupported ops and providers with many exception types
        raise StageFailed(f"ONNX Runtime cannot load the {target_name} artifact: {str(exc).splitlines()[0]}") from None


def ort_outputs(path: Path, x: np.ndarray, providers: list[str], threads: int = 1) -> np.ndarray:
    s = session(path, threads, providers)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def x86_scheme(target) -> Scheme:
    """ONNX Runtime on x86: QDQ, uint8 activations (asymmetric), int8 per-channel weights."""
    return schemes.from_profile(
        target, "onnxruntime-x86-qdq",
        "uint8 activations x int8 weights use ORT's u8s8 (VNNI) kernels on x86; int8 activations (s8s8) measured "
        "slower on x86, see benchmarks/results/quantization.md")


def export(ctx, source: Path, out_dir: Path) -> dict:
    """ONNX Runtime's offline-optimised graph. ORT_ENABLE_EXTENDED is the last level whose output runs on any CPU
    of the architecture: ORT_ENABLE_ALL adds layout rewrites (NCHWc blocks sized to this host's AVX2/AVX-512,
    NHWC QLinearConv) that ONNX Runtime documents as tied to the machine that made them. The device's session
    still runs with ORT_ENABLE_ALL, so those layout rewrites happen there, online, for its own CPU."""
    import onnxruntime as ort

    target = ctx.target
    providers, missing = available_providers(target.execution_providers)
    artifact = out_dir / "model.onnx"
    with files.atomic_path(artifact) as tmp:
        options = ort_session_options(target.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp)
        try:
            session(source, target.threads, options=options)
        except Exception as exc:  # as in load_session
            raise StageFailed(f"ONNX Runtime cannot optimise {source.name}: {str(exc).splitlines()[0]}") from None
    load_session(artifact, target.threads, providers, target.name, target.onnxruntime)
    x = check_images(ctx)
    check = compare_outputs(ort_outputs(source, x, providers), ort_outputs(artifact, x, providers),
                            f"the optimised {target.name} graph")
    settings = ort_settings_record(target.threads, providers, target.onnxruntime)
    return {
        "format": onnx_format(artifact), "artifact": artifact.name, "sha256": files.sha256(artifact),
        "optimized_offline": {"level": "ORT_ENABLE_EXTENDED", "onnxruntime": ort.__version__,
                              "from": str(source.relative_to(ctx.out)), "matches_source": check},
        **io_description(onnx.load(str(artifact))),
        "session_options": settings,
        "python": ("import onnxruntime as ort; o = ort.SessionOptions(); "
                   f"o.intra_op_num_threads = {target.threads}; o.inter_op_num_threads = 1; "
                   f"o.graph_optimization_level = ort.GraphOptimizationLevel.{settings['graph_optimization_level']}; "
                   "o.add_session_config_entry('session.intra_op.allow_spinning', "
                   f"'{int(settings['allow_spinning'])}'); "
                   f"s = ort.InferenceSession('{artifact.name}', o, providers={list(target.execution_providers)})"),
        "verify_with": {"file": artifact.name, "runtime": runtime_label(onnx_format(artifact)), "providers": providers},
        "unverified": [f"execution provider {p}: not in this onnxruntime build ({ort.__version__}); "
                       f"verified with {', '.join(providers)}" for p in missing],
    }


def ort_artifact_runner(ctx, build: dict) -> ArtifactRunner:
    """ONNX Runtime on the file build.json's verify_with names, with its providers and the target's settings."""
    target, path = ctx.target, ctx.out / "export" / ctx.target.name / build["verify_with"]["file"]
    # an ONNX file's precision is read from the file itself, so a file replaced after export is named for what it is
    runtime = runtime_label(onnx_format(path)) if path.suffix == ".onnx" else build["verify_with"]["runtime"]
    providers = tuple(build["verify_with"]["providers"])
    return ArtifactRunner(lambda threads: OrtRunner(path, threads, runtime, providers, target.onnxruntime),
                          runtime, path)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def int8_scheme(self, target) -> Scheme:
        return x86_scheme(target)

    def export(self, ctx, source: Path, out_dir: Path) -> dict:
        return export(ctx, source, out_dir)

    def environment(self) -> dict:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def artifact_runner(self, ctx, build: dict) -> ArtifactRunner:
        return ort_artifact_runner(ctx, build)


BACKEND = register(OnnxRuntimeBackend())
