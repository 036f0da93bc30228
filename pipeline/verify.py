"""Verify stage: teacher, fp32 student and target artifact on the same eval images and the same timing method."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from edgecompress.models import count_params

from . import config as cfg
from . import data as datasets
from . import files, report
from .runner import RunContext, Stage
from .runners import OrtRunner, TorchRunner, predict

SCHEMA = 1


def measure_latency(runner, images: torch.Tensor, batch: int, warmup: int, runs: int, progress) -> dict:
    """Per-batch latency in ms over `runs` timed calls after `warmup`, inputs rotated through real images."""
    count = max(1, min(8, len(images) // batch))
    inputs = [datasets.to_float(images[i * batch:(i + 1) * batch]).numpy() for i in range(count)]
    inputs = [x for x in inputs if len(x) == batch] or [np.repeat(inputs[0][:1], batch, axis=0)]
    for i in range(warmup):
        runner(inputs[i % len(inputs)])
    times = np.empty(runs)
    with progress(range(runs)) as bar:
        for i in bar:
            x = inputs[i % len(inputs)]
            began = time.perf_counter()
            runner(x)
            times[i] = (time.perf_counter() - began) * 1e3
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(times.mean()), 4), "runs": runs, "batch": batch,
            "throughput_ips": round(batch * 1e3 / float(p50), 1)}


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def onnx_params(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer if len(t.dims) > 0 and t.data_type in (1, 2, 3, 10)))


def inputs(ctx: RunContext) -> dict:
    target = ctx.target
    return {"verify": ctx.config.verify.__dict__, "target": target.to_dict() | {"source": ""},
            "data": ctx.data.sha256_16, "teacher": ctx.config.teacher.spec,
            "teacher_weights": Path(ctx.teacher[1]["weights"]) if ctx.teacher[1]["weights"] else "",
            "student": ctx.out / "quantize" / "student.fp32.onnx",
            "artifact": ctx.out / "export" / target.name / "model.onnx"}


def run(ctx: RunContext) -> Path:
    conf, target, ds = ctx.config.verify, ctx.target, ctx.data
    out_dir = ctx.stage_dir("verify")
    teacher_model, teacher_info = ctx.teacher
    artifact_path = ctx.out / "export" / target.name / "model.onnx"
    student_path = ctx.out / "quantize" / "student.fp32.onnx"
    cores = os.cpu_count() or 1
    # Accuracy does not depend on threads, so it runs on every core; latency runs with the target's threads.
    subjects = {
        "teacher": (TorchRunner(teacher_model, cores), TorchRunner(teacher_model, target.threads)),
        "student_fp32": (OrtRunner(student_path, cores, "onnxruntime-fp32"),
                         OrtRunner(student_path, target.threads, "onnxruntime-fp32", target.execution_providers)),
        "artifact": (OrtRunner(artifact_path, cores, "onnxruntime-int8"),
                     OrtRunner(artifact_path, target.threads, "onnxruntime-int8", target.execution_providers)),
    }
    labels = ds.y_eval.numpy()
    results, predictions = {}, {}
    for name, (fast, timed) in subjects.items():
        ctx.log(f"[verify] {name}: accuracy on {len(labels)} eval images")
        logits = predict(fast, ds.x_eval, conf.eval_batch)
        predictions[name] = logits.argmax(1)
        latency = {}
        for batch in target.batch:
            runs = conf.latency_runs_bs1 if batch == 1 else conf.latency_runs_batch
            bar = lambda items, b=batch: ctx.progress(items, f"{name} latency bs{b}")  # noqa: E731
            latency[f"bs{batch}"] = measure_latency(timed, ds.x_eval, batch, conf.warmup_runs, runs, bar)
        results[name] = {"accuracy": float((predictions[name] == labels).mean()), "latency_ms": latency,
                         "runtime": timed.runtime, "settings": timed.settings()}
    results["teacher"] |= {"params": count_params(teacher_model), "size_bytes": state_bytes(teacher_model),
                           "source": teacher_info["spec"]}
    results["student_fp32"] |= {"params": onnx_params(student_path), "size_bytes": student_path.stat().st_size,
                                "path": str(student_path.relative_to(ctx.out))}
    results["artifact"] |= {"params": onnx_params(student_path), "size_bytes": artifact_path.stat().st_size,
                            "path": str(artifact_path.relative_to(ctx.out)), "format": "onnx-qdq-int8"}
    for name in ("student_fp32", "artifact"):
        results[name]["agreement"] = float((predictions[name] == predictions["teacher"]).mean())

    bs1 = f"bs{target.batch[0]}"
    speedup = results["teacher"]["latency_ms"][bs1]["p50"] / results["artifact"]["latency_ms"][bs1]["p50"]
    drop = (results["teacher"]["accuracy"] - results["artifact"]["accuracy"]) * 100
    budgets = target.budgets
    failed = []
    if drop > budgets.max_accuracy_drop:
        failed.append(f"accuracy drop {drop:.2f} pt > max_accuracy_drop {budgets.max_accuracy_drop}")
    if budgets.max_latency_ms and results["artifact"]["latency_ms"][bs1]["p50"] > budgets.max_latency_ms:
        failed.append(f"{bs1} p50 {results['artifact']['latency_ms'][bs1]['p50']:.3f} ms > "
                      f"max_latency_ms {budgets.max_latency_ms}")
    if budgets.min_speedup and speedup < budgets.min_speedup:
        failed.append(f"speedup {speedup:.1f}x < min_speedup {budgets.min_speedup}")

    result = {
        "schema": SCHEMA, "target": target.name, "data": {"name": ds.name, "eval_images": len(labels)},
        "teacher": results["teacher"], "student_fp32": results["student_fp32"], "artifact": results["artifact"],
        "speedup_vs_teacher": round(speedup, 2),
        "size_ratio": round(results["teacher"]["size_bytes"] / results["artifact"]["size_bytes"], 2),
        "accuracy_drop_pt": round(drop, 3),
        "budgets": {"max_accuracy_drop": budgets.max_accuracy_drop, "max_latency_ms": budgets.max_latency_ms,
                    "min_speedup": budgets.min_speedup, "passed": not failed, "failed": failed},
        "unverified": [],
        "host": cfg.host(), "versions": cfg.versions(), "seed": ctx.config.seed,
    }
    files.write_json(out_dir / "report.json", result)
    files.write_text(out_dir / "report.md", report.markdown(result))
    return out_dir / "report.json"


STAGE = Stage("verify", run, inputs)
