"""Export stage: the target's artifact and build.json, the exact recipe to build and run it on the device.

The target's backend (backends/) makes the artifact: ONNX Runtime's offline-optimised graph, an .ort file for ORT
mobile, or TensorRT's Q/DQ ONNX with its builder settings and trtexec lines (and the engine where this host can
build one). Each backend checks its artifact against the quantized model it came from on real eval images and
lists in build.json's `unverified` what this host could not check and why; verify copies that list into
report.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import backends, files, quantize
from .errors import StageFailed
from .runner import RunContext, Stage


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
    """The file the export stage made for the device (an engine where one was built, else the graph)."""
    return export_dir(ctx) / build_record(ctx)["artifact"]


def inputs(ctx: RunContext) -> dict:
    """What the exported files depend on: the target (not its file name, nor its budgets: verify judges those, and
    a stricter latency budget must not rebuild an engine), the quantized model, the preprocessing, and what on this
    host decides the build (the backend's environment: TensorRT's version and the GPU, so that `edgecompress
    export RUN` on the device rebuilds what a host without TensorRT left unbuilt)."""
    target = {k: v for k, v in ctx.target.to_dict().items() if k not in ("source", "budgets")}
    return {"target": target, "model": quantize.artifact_path(ctx.out, ctx.target),
            "preprocess": ctx.preprocess.describe(), "environment": backends.for_target(ctx.target).environment()}


def run(ctx: RunContext) -> Path:
    target = ctx.target
    out_dir = ctx.stage_dir(f"export/{target.name}")
    source = quantize.artifact_path(ctx.out, ctx.target)
    # A rerun must not leave a file of an earlier build (an engine of another profile) beside the new recipe;
    # the backend names what stays (a timing cache, an engine this host could not make again)
    backend = backends.for_target(target)
    keep = {"done.json"} | backend.keep_on_rebuild(target, out_dir)
    for stale in out_dir.iterdir():
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.name not in keep:
            stale.unlink()
    record = backend.export(ctx, source, out_dir)
    files.write_json(out_dir / "build.json", {"target": target.name, "runtime": target.runtime,
                                              "precision": target.precision, "opset": target.opset,
                                              "profile": target.to_dict() | {"source": ""},
                                              # what the device code must do before calling the artifact
                                              "preprocess": {"steps": ctx.preprocess.steps(),
                                                             **ctx.preprocess.describe()}, **record})
    return out_dir / record["artifact"]


def stage(ctx: RunContext) -> Stage:
    return Stage(f"export/{ctx.target.name}", run, inputs)
