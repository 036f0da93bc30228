"""Export stage: the target's artifact and build.json, the exact recipe to build and run it on the device.

One exporter per runtime of the target profile:
- onnxruntime: the graph ONNX Runtime optimises offline (portable level), with the profile's session options;
- onnxruntime-mobile: an .ort file and the required-operators config for a reduced build (ortmobile.py);
- tensorrt: the Q/DQ ONNX TensorRT takes, the builder settings and the trtexec line, the engine where this host
  has TensorRT and a CUDA device, and a DLA placement report for Jetson (tensorrt.py, dla.py).
Each exporter checks its artifact against the quantized model it came from on real eval images, and lists in
build.json's `unverified` what this host could not check and why; verify copies that list into report.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import data as datasets
from . import files, quantize
from .errors import StageFailed
from .runner import RunContext, Stage
from .runners import ort_session_options, ort_settings_record

CHECK_IMAGES = 256  # eval images an exported artifact must reproduce the quantized model's outputs on
# The offline-optimised graph may differ from its source by float rounding in fused kernels, never in its class.
CHECK_ATOL = 1e-3


def export_dir(ctx: RunContext) -> Path:
    return ctx.out / "export" / ctx.target.name


def build_record(ctx: RunContext) -> dict:
    """build.json of the run's target, as the export stage wrote it."""
    path = export_dir(ctx) / "build.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise StageFailed(f"{path} is missing or unreadable: run `edgecompress export {ctx.out} --force`") from None


def artifact_path(ctx: RunContext) -> Path:
    """The file verify runs: the artifact for ONNX Runtime targets, the same Q/DQ graph for TensorRT ones."""
    return export_dir(ctx) / build_record(ctx)["verify_with"]["file"]


def available_providers(wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The profile's execution providers split into those this ONNX Runtime build has and those it lacks."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    present = [p for p in wanted if p in have] or ["CPUExecutionProvider"]
    return present, [p for p in wanted if p not in have]


def io_description(model: onnx.ModelProto) -> dict:
    graph = model.graph
    dims = [d.dim_value if d.dim_value else (d.dim_param or "?") for d in graph.input[0].type.tensor_type.shape.dim]
    return {"input": {"name": graph.input[0].name, "shape": dims, "dtype": "float32", "layout": "NCHW",
                      "range": "[0, 1] pixels (normalisation is inside the graph)"},
            "output": {"name": graph.output[0].name, "meaning": "logits"}}


def check_images(ctx: RunContext) -> np.ndarray:
    return datasets.to_float(ctx.data.x_eval[:CHECK_IMAGES]).numpy()


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, what: str, atol: float = CHECK_ATOL) -> dict:
    """Max |difference| and top-1 agreement of two runtimes' logits on the same images; StageFailed beyond atol."""
    diff = float(np.abs(reference - candidate).max())
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    if not diff <= atol:
        raise StageFailed(f"{what}: outputs differ from the quantized model by up to {diff:.3g} "
                          f"(top-1 agreement {agreement:.4f}) on {len(reference)} eval images; tolerance {atol}")
    return {"images": len(reference), "max_abs_diff": diff, "top1_agreement": agreement, "tolerance": atol}


def ort_outputs(path: Path, x: np.ndarray, providers: list[str], threads: int = 1) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), ort_session_options(threads), providers=providers)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def runtime_label(onnx_format: str) -> str:
    """onnx-qdq-int8 -> onnxruntime-int8: the runtime and the precision it computes in."""
    return "onnxruntime-" + onnx_format.rsplit("-", 1)[1]


def load_session(path: Path, threads: int, providers: list[str], target_name: str, settings=None):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), ort_session_options(threads, settings), providers=providers)
    except Exception as exc:  # ORT reports unsupported ops and providers with many exception types
        raise StageFailed(f"ONNX Runtime cannot load the {target_name} artifact: {str(exc).splitlines()[0]}") from None


def export_onnxruntime(ctx: RunContext, source: Path, out_dir: Path) -> dict:
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
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # as in load_session
            raise StageFailed(f"ONNX Runtime cannot optimise {source.name}: {str(exc).splitlines()[0]}") from None
    load_session(artifact, target.threads, providers, target.name, target.onnxruntime)
    x = check_images(ctx)
    check = compare_outputs(ort_outputs(source, x, providers), ort_outputs(artifact, x, providers),
                            f"the optimised {target.name} graph")
    settings = ort_settings_record(target.threads, providers, target.onnxruntime)
    from .verify import onnx_format

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


def _exporters() -> dict[str, Callable[[RunContext, Path, Path], dict]]:
    from . import ortmobile, tensorrt

    return {"onnxruntime": export_onnxruntime, "onnxruntime-mobile": ortmobile.export,
            "tensorrt": tensorrt.export}


def inputs(ctx: RunContext) -> dict:
    """What the exported files depend on: not the target's file name, nor its budgets (verify judges those; a
    stricter latency budget must not rebuild an engine)."""
    target = {k: v for k, v in ctx.target.to_dict().items() if k not in ("source", "budgets")}
    return {"target": target, "model": quantize.artifact_path(ctx.out, ctx.target),
            "preprocess": ctx.preprocess.describe()}


def run(ctx: RunContext) -> Path:
    target = ctx.target
    out_dir = ctx.stage_dir(f"export/{target.name}")
    source = quantize.artifact_path(ctx.out, ctx.target)
    # A rerun must not leave a file of an earlier build (an engine of another profile) beside the new recipe;
    # the timing cache stays, since reusing it across builds is its purpose.
    keep = {"done.json", target.tensorrt.timing_cache if target.tensorrt else ""}
    for stale in out_dir.iterdir():
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.name not in keep:
            stale.unlink()
    record = _exporters()[target.runtime](ctx, source, out_dir)
    files.write_json(out_dir / "build.json", {"target": target.name, "runtime": target.runtime,
                                              "precision": target.precision, "opset": target.opset,
                                              "profile": target.to_dict() | {"source": ""},
                                              # what the device code must do before calling the artifact
                                              "preprocess": {"steps": ctx.preprocess.steps(),
                                                             **ctx.preprocess.describe()}, **record})
    return out_dir / record["artifact"]


def stage(ctx: RunContext) -> Stage:
    return Stage(f"export/{ctx.target.name}", run, inputs)
