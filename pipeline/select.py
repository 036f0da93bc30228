"""`--student auto`: measure the zoo's students (and torchvision's and timm's photo students) on this host, as
int8 artifacts under the target's settings, and pick the one to distil for a latency budget.

Latency is measured, not estimated: each candidate (untrained: latency does not depend on the weights) is
exported, quantized with the target's scheme on a few real images and timed like verify times the artifact.
Accuracy cannot be measured before training, so the rule is the one the zoo's scaling shows (wider and deeper
students of these families are more accurate after distillation): the candidate with the most parameters whose
int8 p50 fits the budget, the faster one on a tie.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgecompress.models import ZOO, count_params, libraries
from edgecompress.models.loaders import build_model

from . import config as cfg
from . import data as datasets
from . import backends, files, quantize
from .errors import BadInput, StageFailed
from .kernels import kernel_report, macs_per_image
from .runner import RunContext, digest
from .backends.onnxruntime import OrtRunner
from .verify import time_runs

CALIBRATION_IMAGES = 64  # enough to set scales; the candidates' accuracy is not what is measured
TIMING_SESSIONS, TIMING_RUNS, TIMING_SECONDS = 3, 300, 0.6
TIMING_MAX_SECONDS = 6.0  # per candidate: 300 calls of a 224-px resnet18 on one thread took 15 s here
RULE = ("the candidate with the most parameters whose int8 p50 fits the budget (accuracy after distillation "
        "grows with a student's size in these families); the faster one on a tie")


def latency_budget(ctx: RunContext) -> float:
    budget = ctx.config.max_latency_ms or ctx.target.budgets.max_latency_ms
    if budget <= 0:
        raise BadInput("--student auto needs a latency budget: give --max-latency-ms MS, or use a target whose "
                       "budgets set max_latency_ms")
    return budget


def student_names(side: int) -> list[str]:
    """The zoo's students, and torchvision's and timm's photo students (the vision extra) for images of at least
    PHOTO_MIN_SIDE px a side."""
    photos = side >= libraries.PHOTO_MIN_SIDE and libraries.available()
    return list(ZOO) + (list(libraries.PHOTO_STUDENTS) if photos else [])


def candidates(teacher_params: int, input_shape: tuple[int, int, int]) -> list[str]:
    """Students smaller than the teacher, smallest first: the zoo's, and torchvision's and timm's photo students
    (the vision extra) when the images are at least PHOTO_MIN_SIDE px a side."""
    sizes = {name: count_params(build_model(name, "", input_shape[0], 10, [0.0], [1.0], "student")[0])
             for name in student_names(min(input_shape[1:]))}
    return sorted((n for n, p in sizes.items() if p < teacher_params), key=lambda n: (sizes[n], n))


def measure_student(model: torch.nn.Module, name: str, input_shape: tuple[int, int, int], classes: list[str],
                    mean: list[float], std: list[float], calibration: torch.Tensor, images: torch.Tensor,
                    target, batch: int, workdir: Path, warmup: int, progress, kernels: bool = False) -> dict:
    """p50 (ms per batch) of `model` (untrained: latency does not depend on the weights) as the target's artifact
    (int8 QDQ calibrated on `calibration`, fp16 or fp32), timed on `images` on this host; with `kernels`, also its
    MACs and which layers ONNX Runtime runs in int8."""
    spec = {"input_shape": list(input_shape), "mean": mean, "std": std, "classes": list(classes)}
    scheme = backends.scheme_for(target)
    stem = name.replace(":", "-")  # torchvision:NAME
    fp32, artifact = workdir / f"{stem}.fp32.onnx", workdir / f"{stem}.{scheme.precision}.onnx"
    quantize.export_onnx(model.eval(), spec, target.opset, fp32)
    if scheme.precision == "int8":
        quantize.quantize_qdq(fp32, artifact, calibration, "minmax", scheme)
    elif scheme.precision == "fp16":
        quantize.convert_fp16(fp32, artifact)
    else:
        artifact = fp32
    runtime = f"onnxruntime-{scheme.precision}"
    make_runner = functools.partial(OrtRunner, artifact, target.threads, runtime, target.execution_providers,
                                    target.onnxruntime)
    sessions = time_runs(make_runner, images, batch, warmup, TIMING_RUNS, TIMING_SECONDS,
                         lambda length: progress(None, f"timing {name}", length), TIMING_SESSIONS, TIMING_MAX_SECONDS)
    times = np.concatenate(sessions)
    row = {"name": name, "params": count_params(model), "p50_ms": round(float(np.median(times)), 4),
           "session_p50_ms": [round(float(np.median(s)), 4) for s in sessions]}
    if kernels:
        found = kernel_report(artifact, target.threads, target.execution_providers, target.onnxruntime)
        row |= {"macs": macs_per_image(fp32), "int8_layers": found["int8_compute_layers"],
                "float_layers": len(found["float_compute_layers"]), "dequantized_ops": found["dequantized_ops"]}
    return row


def measure(ctx: RunContext, name: str, batch: int, workdir: Path) -> dict:
    """measure_student for a candidate of this run, at the data's shape, calibrated on its training images."""
    ds = ctx.data
    model, _ = build_model(name, "", ds.input_shape[0], ds.num_classes, *ctx.data_stats, role="student")
    calibration = datasets.to_float(ds.x_train[datasets.stratified_sample(ds.y_train, CALIBRATION_IMAGES,
                                                                          ctx.config.seed)])
    return measure_student(model, name, ds.input_shape, ds.classes, *ctx.data_stats, calibration, ds.x_eval,
                           ctx.target, batch, workdir, ctx.config.verify.warmup_runs, ctx.progress)


def choose(measured: list[dict], budget: float) -> str | None:
    fitting = [c for c in measured if c["p50_ms"] <= budget]
    if not fitting:
        return None
    return max(fitting, key=lambda c: (c["params"], -c["p50_ms"]))["name"]


def select_student(ctx: RunContext) -> dict:
    """Measure the candidates (or reuse select/selection.json, measured for the same target, data shape and
    host), choose for the budget, set ctx.config.distill.student to the choice, and return the record."""
    budget, target, ds = latency_budget(ctx), ctx.target, ctx.data
    if not backends.for_target(target).times_on_host:
        raise BadInput(f"--student auto times the candidates with ONNX Runtime on this host; target {target.name} "
                       f"runs {target.runtime}: name a student with --student")
    batch = target.batch[0]
    teacher_params = count_params(ctx.teacher[0])
    names = candidates(teacher_params, ds.input_shape)
    if not names:
        raise BadInput(f"--student auto: no zoo model is smaller than the teacher ({teacher_params:,} parameters); "
                       "name a student with --student")
    # The budget is not part of the key: the measurements hold for any budget, the choice is made afresh.
    key = digest({"target": target.to_dict() | {"source": "", "budgets": None}, "shape": list(ds.input_shape),
                  "classes": ds.num_classes, "candidates": names, "cpu": cfg.host().get("cpu"),
                  "verify": ctx.config.verify.__dict__})
    path = ctx.stage_dir("select") / "selection.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("key") != key or ctx.force:
        ctx.log(f"[select] timing {len(names)} zoo students as int8 artifacts for {target.name} at bs{batch}")
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            measured = []
            for name in names:
                measured.append(measure(ctx, name, batch, Path(tmp)))
                ctx.log(f"[select] {name}: {measured[-1]['params']:,} params, int8 p50 "
                        f"{measured[-1]['p50_ms']:.3f} ms")
        record = {"key": key, "batch": f"bs{batch}", "target": target.name, "threads": target.threads,
                  "candidates": measured, "rule": RULE, "host": cfg.host().get("cpu")}
    for c in record["candidates"]:
        c["fits"] = c["p50_ms"] <= budget
    record |= {"max_latency_ms": budget, "chosen": choose(record["candidates"], budget)}
    files.write_json(path, record)
    if record["chosen"] is None:
        fastest = min(record["candidates"], key=lambda c: c["p50_ms"])
        raise StageFailed(f"no zoo student fits {budget} ms at bs{batch} on this host: the fastest, "
                          f"{fastest['name']}, takes {fastest['p50_ms']:.3f} ms (see {path}); raise --max-latency-ms")
    ctx.config.distill.student = record["chosen"]
    ctx.log(f"[select] chose {record['chosen']} ({RULE})")
    return record


def zoo_at(size: tuple[int, int], target, num_classes: int, seed: int, progress) -> list[dict]:
    """The students `--student auto` considers for RGB images of `size`, each built with `num_classes` outputs
    and measured as the target's artifact on this host (params, MACs, p50 at batch 1, int8 kernel coverage),
    calibrated and timed on real Fashion-MNIST images brought to that size."""
    if not backends.for_target(target).times_on_host:
        raise BadInput(f"the zoo is timed with ONNX Runtime on this host; target {target.name} runs {target.runtime}")
    calibration, images = fashion_photos(size, CALIBRATION_IMAGES, 64, seed)
    classes, mean, std = [str(i) for i in range(num_classes)], [0.5] * 3, [0.25] * 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecompress-zoo-") as tmp:
        for name in student_names(min(size)):
            model, _ = build_model(name, "", 3, num_classes, mean, std, "student")
            rows.append(measure_student(model, name, (3, *size), classes, mean, std, calibration, images, target,
                                        target.batch[0], Path(tmp), 10, progress, kernels=True))
    return rows


def fashion_photos(size: tuple[int, int], calibration: int, timing: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Real images for measuring models at `size` when the user's data is not at hand: `calibration` training
    and `timing` test images of the embedded Fashion-MNIST, as uint8 RGB brought to `size`."""
    fashion = datasets.load("fashion-mnist", seed)
    geometry = datasets.Geometry(tuple(size), 0, "bilinear", "rgb")
    picked = datasets.stratified_sample(fashion.y_train, calibration, seed)
    return datasets.convert(fashion.x_train[picked], geometry), datasets.convert(fashion.x_eval[:timing], geometry)
