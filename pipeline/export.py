"""Export stage: the target's artifact and build.json, the exact recipe to run it on the device."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from . import files, quantize
from .errors import StageFailed
from .runner import RunContext, Stage
from .runners import OrtRunner


def inputs(ctx: RunContext) -> dict:
    return {"target": ctx.target.to_dict() | {"source": ""}, "model": quantize.artifact_path(ctx.out, ctx.target)}


def run(ctx: RunContext) -> Path:
    target = ctx.target
    out_dir = ctx.stage_dir(f"export/{target.name}")
    source = quantize.artifact_path(ctx.out, target)
    artifact = out_dir / "model.onnx"
    with files.atomic_path(artifact) as tmp:
        shutil.copyfile(source, tmp)
    try:
        runner = OrtRunner(artifact, target.threads, "onnxruntime-int8", target.execution_providers)
    except Exception as exc:  # ORT reports unsupported ops and providers with many exception types
        raise StageFailed(f"ONNX Runtime cannot load the {target.name} artifact: {str(exc).splitlines()[0]}") from None
    graph = onnx.load(str(artifact)).graph
    files.write_json(out_dir / "build.json", {
        "target": target.name, "runtime": target.runtime, "format": "onnx-qdq-int8", "artifact": artifact.name,
        "sha256": files.sha256(artifact), "opset": target.opset,
        "input": {"name": graph.input[0].name, "dtype": "float32", "layout": "NCHW",
                  "range": "[0, 1] pixels (normalisation is inside the graph)"},
        "output": {"name": graph.output[0].name, "meaning": "logits"},
        "session_options": runner.settings(),
        "python": ("import onnxruntime as ort; o = ort.SessionOptions(); "
                   f"o.intra_op_num_threads = {target.threads}; o.inter_op_num_threads = 1; "
                   "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL; "
                   f"s = ort.InferenceSession('{artifact.name}', o, providers={list(target.execution_providers)})"),
    })
    return artifact


def stage(ctx: RunContext) -> Stage:
    return Stage(f"export/{ctx.target.name}", run, inputs)
