"""Verify stage: teacher, fp32 student and target artifact on the same eval images and the same timing method.

Accuracy comes with paired bootstrap intervals and latency medians with block-bootstrap intervals (see stats.py);
report.json holds the summaries, latency.json every timed run, and report.md / report.html / plots/ show them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgecompress.models import count_params

from . import config as cfg
from . import data as datasets
from . import backends, export, files, kernels, report, stats
from .backends.common import onnx_format, runtime_label
from .check import SCHEMA, SUBJECTS
from .runner import RunContext, Stage
from .backends.onnxruntime import OrtRunner
from .runners import TorchRunner, predict

TOP_K = 5  # top-5 accuracy is reported when there are more than TOP_K classes
MIN_TIMED_SECONDS = 1.0  # per model and batch size, unless the run config's [verify] sets latency_min_seconds
MAX_TIMED_RUNS = 20_000  # bounds latency.json when one call takes microseconds
MIN_TIMED_PER_SESSION = 2  # timed calls a session makes whatever the time budget (verify.latency_max_seconds)
WARMUP_WINDOW = 5  # calls per warm-up window
WARMUP_TOLERANCE = 0.05  # a window whose median is within 5% of the previous one's counts as settled
WARMUP_MAX_SECONDS = 0.25  # per session: a model that never settles is timed anyway, the intervals show it


def warm_up(runner: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray], min_calls: int) -> int:
    """Untimed calls until the time per call settles: windows of WARMUP_WINDOW calls until a window's median is
    within WARMUP_TOLERANCE of the previous window's (and at least `min_calls` calls), or WARMUP_MAX_SECONDS
    passed (checked after every call: one call of a 224-px teacher at batch 64 can take seconds). Returns the
    number of calls made. Lazy allocation, kernel selection and caches all settle here."""
    calls, previous, started = 0, None, time.perf_counter()
    while True:
        window = []
        for _ in range(WARMUP_WINDOW):
            began = time.perf_counter()
            runner(inputs[calls % len(inputs)])
            window.append(time.perf_counter() - began)
            calls += 1
            if time.perf_counter() - started > WARMUP_MAX_SECONDS:
                return calls
        current = float(np.median(window))
        if previous is not None and abs(current - previous) <= WARMUP_TOLERANCE * previous and calls >= min_calls:
            return calls
        previous = current


def time_runs(make_runner: Callable[[], Callable[[np.ndarray], np.ndarray]], images: torch.Tensor, batch: int,
              warmup: int, runs: int, min_seconds: float, progress, sessions: int = 1,
              max_seconds: float = math.inf) -> list[np.ndarray]:
    """Milliseconds of each timed call, one array per session: `sessions` fresh runners from `make_runner`, one
    after another, each warmed up until stable and then timed for its share of at least `runs` calls and at least
    `min_seconds` (at most MAX_TIMED_RUNS in all), so that the median spans many scheduler periods. A session
    stops early, after MIN_TIMED_PER_SESSION calls, once it has spent its share of `max_seconds` (warm-up
    included): at 224 px a teacher's batch of 64 on one thread takes seconds per call, and 30 of them in 6
    sessions with their warm-ups made verify the longest stage of a run.

    Why several sessions: on a shared machine a fresh process or session settles into a speed mode of its own
    (measured here: the same int8 model's batch-1 median was 0.175 or 0.24 ms depending on the session, while
    one session's interval was +/-0.001 ms), so only medians from several sessions show that variance.
    Inputs rotate through up to 8 batches of real images so no single input's cache footprint decides it."""
    count = max(1, min(8, len(images) // batch))
    inputs = [datasets.to_float(images[i * batch:(i + 1) * batch]).numpy() for i in range(count)]
    inputs = [x for x in inputs if len(x) == batch] or [np.repeat(inputs[0][:1], batch, axis=0)]
    runs_each, seconds_each, budget_each = -(-runs // sessions), min_seconds / sessions, max_seconds / sessions
    most_each = max(1, MAX_TIMED_RUNS // sessions)
    series: list[np.ndarray] = []
    with progress(runs_each * sessions) as bar:
        for _ in range(sessions):
            session_began = time.perf_counter()
            runner = make_runner()
            warm_up(runner, inputs, -(-warmup // sessions))
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < runs_each or (len(times) < most_each and time.perf_counter() - started < seconds_each):
                if len(times) >= MIN_TIMED_PER_SESSION and time.perf_counter() - session_began >= budget_each:
                    break
                x = inputs[len(times) % len(inputs)]
                began = time.perf_counter()
                runner(x)
                times.append((time.perf_counter() - began) * 1e3)
                if len(times) <= runs_each:
                    bar.update(1)
            series.append(np.array(times))
    return series


def latency_summary(sessions: list[np.ndarray], batch: int, resamples: int, seed: int) -> dict:
    """p50/p90/p99, mean, min and throughput of per-batch times in ms pooled over the sessions; each session's
    median; and the p50's 95% interval, from the lowest to the highest end of the sessions' moving-block
    bootstrap intervals, so that it covers both the noise within a session and the spread between sessions:
    the noise `edgecompress check` weighs a change against. The median absolute deviation is of the pooled runs."""
    times = np.concatenate(sessions)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    intervals = [stats.median_interval(s, resamples, seed) for s in sessions]
    low, high = min(i[0] for i in intervals), max(i[1] for i in intervals)
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(times.mean()), 4), "runs": len(times), "batch": batch,
            "throughput_ips": round(batch * 1e3 / float(p50), 1),
            "p50_ci95": [round(low, 4), round(high, 4)], "mad": round(stats.median_absolute_deviation(times), 4),
            "min": round(float(times.min()), 4),
            "session_p50": [round(float(np.median(s)), 4) for s in sessions]}


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """True where the label is among the `k` highest logits."""
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Top-1 accuracy within each class's eval images; None for a class with none."""
    hits = np.bincount(labels, weights=predictions == labels, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return [float(h / c) if c else None for h, c in zip(hits, counts)]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> list[list[int]]:
    """Counts with rows = true class, columns = predicted class."""
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).tolist()


def _interval(samples: np.ndarray) -> list[float]:
    """The 95% percentile interval, rounded to 1e-6 (finer than one image in a million)."""
    return [round(bound, 6) for bound in stats.percentile_interval(samples)]


def accuracy_metrics(logits: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, resamples: int,
                     seed: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per subject: top-1 (and top-5 when classes > 5), agreement with the teacher and per-class accuracy, each
    fraction with a 95% paired bootstrap interval; and the artifact-minus-teacher and artifact-minus-fp32
    differences with theirs. One resampling of the eval images serves every statistic (paired, Efron 1979)."""
    predictions = {name: out.argmax(1) for name, out in logits.items()}
    rows: dict[tuple[str, str], np.ndarray] = {}
    for name in SUBJECTS:
        rows[name, "accuracy"] = predictions[name] == labels
        if num_classes > TOP_K:
            rows[name, "top5"] = top_k_hits(logits[name], labels, TOP_K)
        if name != "teacher":
            rows[name, "agreement"] = predictions[name] == predictions["teacher"]
    keys = list(rows)
    means = stats.paired_bootstrap_means(np.stack([rows[k] for k in keys]), resamples, seed)
    column = {k: means[:, i] for i, k in enumerate(keys)}
    metrics: dict[str, dict] = {name: {} for name in SUBJECTS}
    for (name, metric), hits in rows.items():
        metrics[name][metric] = float(hits.mean())
        metrics[name][f"{metric}_ci95"] = _interval(column[name, metric])
    for name in SUBJECTS:
        metrics[name]["per_class_accuracy"] = per_class_accuracy(predictions[name], labels, num_classes)
    metrics["artifact"]["confusion_matrix"] = confusion_matrix(labels, predictions["artifact"], num_classes)
    differences = {}
    for other in ("teacher", "student_fp32"):
        value = metrics["artifact"]["accuracy"] - metrics[other]["accuracy"]
        resampled = column["artifact", "accuracy"] - column[other, "accuracy"]
        differences[f"artifact_minus_{other}"] = {"value": round(value, 6), "ci95": _interval(resampled)}
    return metrics, differences


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def onnx_params(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer if len(t.dims) > 0 and t.data_type in (1, 2, 3, 10)))


def inputs(ctx: RunContext) -> dict:
    target = ctx.target
    return {"verify": ctx.config.verify.__dict__, "target": target.to_dict() | {"source": ""},
            "data": ctx.data.sha256_16, **ctx.teacher_inputs,
            "student": ctx.out / "quantize" / "student.fp32.onnx", "artifact": export.artifact_path(ctx)}


def run(ctx: RunContext) -> Path:
    conf, target, ds = ctx.config.verify, ctx.target, ctx.data
    resamples = getattr(conf, "bootstrap_resamples", stats.RESAMPLES)
    min_seconds = getattr(conf, "latency_min_seconds", MIN_TIMED_SECONDS)
    seed = ctx.config.seed
    out_dir = ctx.stage_dir("verify")
    teacher_model, teacher_info = ctx.teacher
    build = export.build_record(ctx)  # what the export stage made, and what it says to run here in its place
    # what this host runs as the artifact: the target's own runtime where it can, else a stand-in the report names
    artifact = backends.for_target(target).artifact_runner(ctx, build)
    artifact_path = artifact.path
    student_path = ctx.out / "quantize" / "student.fp32.onnx"
    # read from the file itself, so an artifact replaced after export is reported as what it is; an .ort file
    # (a flatbuffer onnx cannot read) or an engine keeps the backend's word
    formats = {"student_fp32": onnx_format(student_path),
               "artifact": onnx_format(artifact_path) if artifact_path.suffix == ".onnx" else
               artifact.file_format or build["format"]}
    student_runtime = runtime_label(formats["student_fp32"])
    providers = tuple(build["verify_with"]["providers"])
    cores = os.cpu_count() or 1
    # Accuracy does not depend on threads, so it runs on every core; latency runs with the target's threads.
    # Latency runs each time in fresh sessions (make_timed) with the target's threads and providers.
    subjects = {
        "teacher": (TorchRunner(teacher_model, cores), lambda: TorchRunner(teacher_model, target.threads)),
        "student_fp32": (OrtRunner(student_path, cores, student_runtime),
                         lambda: OrtRunner(student_path, target.threads, student_runtime, providers,
                                           target.onnxruntime)),
        "artifact": (artifact.make(cores), lambda: artifact.make(target.threads)),
    }
    labels = ds.y_eval.numpy().astype(np.int64)
    results, logits, timings, session_runs = {}, {}, {}, {}
    for name, (fast, make_session) in subjects.items():
        last_session: list = []  # the report's settings come from a timed session, not from one more made for it

        def make_timed(make=make_session, last=last_session):
            last[:] = [None]  # the previous session is freed before the next is made, as when nothing kept it
            last[0] = make()
            return last[0]

        ctx.log(f"[verify] {name}: accuracy on {len(labels)} eval images")
        logits[name] = ctx.teacher_eval_logits if name == "teacher" else predict(fast, ds.x_eval, conf.eval_batch)
        latency, timings[name], session_runs[name] = {}, {}, {}
        for batch in target.batch:
            runs = conf.latency_runs_bs1 if batch == 1 else conf.latency_runs_batch
            bar = lambda length, b=batch: ctx.progress(None, f"{name} latency bs{b}", length)  # noqa: E731
            sessions = time_runs(make_timed, ds.x_eval, batch, conf.warmup_runs, runs, min_seconds, bar,
                                 conf.latency_sessions, conf.latency_max_seconds)
            latency[f"bs{batch}"] = latency_summary(sessions, batch, resamples, seed)
            timings[name][f"bs{batch}"] = [round(float(t), 4) for s in sessions for t in s]
            session_runs[name][f"bs{batch}"] = [len(s) for s in sessions]
        results[name] = {"latency_ms": latency, "runtime": fast.runtime, "settings": last_session[0].settings()}
    ctx.log(f"[verify] bootstrap intervals ({resamples} resamples)")
    metrics, differences = accuracy_metrics(logits, labels, ds.num_classes, resamples, seed)
    for name in SUBJECTS:
        results[name] = metrics[name] | results[name]
    results["teacher"] |= {"params": count_params(teacher_model), "size_bytes": state_bytes(teacher_model),
                           "source": teacher_info["spec"]}
    if teacher_info.get("checkpoint_key"):  # which weights of a training script's checkpoint were read
        results["teacher"]["checkpoint_key"] = teacher_info["checkpoint_key"]
    results["student_fp32"] |= {"params": onnx_params(student_path), "size_bytes": student_path.stat().st_size,
                                "path": str(student_path.relative_to(ctx.out)), "format": formats["student_fp32"]}
    results["artifact"] |= {"params": onnx_params(student_path), "size_bytes": artifact_path.stat().st_size,
                            "path": str(artifact_path.relative_to(ctx.out)), "format": formats["artifact"]}
    # ORT's kernel choice is read from the ONNX graph it optimises; an .ort file is already optimised (export
    # checked it against its ONNX source)
    if "int8" in formats["artifact"] and artifact_path.suffix == ".onnx":
        results["artifact"]["kernels"] = kernels.kernel_report(artifact_path, target.threads, providers,
                                                                    target.onnxruntime)
    if artifact.note:  # e.g. ONNX Runtime measuring the graph a TensorRT engine is built from
        results["artifact"]["measured_with"] = artifact.note
    if artifact.reference:  # the artifact's runtime against ONNX Runtime on the graph it was built from
        reference = predict(artifact.reference(cores), ds.x_eval, conf.eval_batch)
        results["artifact"]["matches_onnxruntime"] = {
            "max_abs_diff": float(np.abs(reference - logits["artifact"]).max()),
            "top1_agreement": float((reference.argmax(1) == logits["artifact"].argmax(1)).mean()),
            "images": len(reference)}
    results["artifact"] |= artifact.extra

    bs1 = f"bs{target.batch[0]}"
    speedup = results["teacher"]["latency_ms"][bs1]["p50"] / results["artifact"]["latency_ms"][bs1]["p50"]
    drop = (results["teacher"]["accuracy"] - results["artifact"]["accuracy"]) * 100
    budgets = target.budgets
    failed = []
    if drop > budgets.max_accuracy_drop:
        failed.append(f"accuracy drop {drop:.2f} pt > max_accuracy_drop {budgets.max_accuracy_drop}")
    # a stand-in runtime's latency (ONNX Runtime on this host for a TensorRT engine) says nothing about the device's
    on_device = artifact.on_target
    if not on_device and (budgets.max_latency_ms or budgets.min_speedup):
        build["unverified"].append("latency budgets (max_latency_ms, min_speedup): need the engine's latency on the "
                                   "device")
    if on_device and budgets.max_latency_ms and results["artifact"]["latency_ms"][bs1]["p50"] > budgets.max_latency_ms:
        failed.append(f"{bs1} p50 {results['artifact']['latency_ms'][bs1]['p50']:.3f} ms > "
                      f"max_latency_ms {budgets.max_latency_ms}")
    if on_device and budgets.min_speedup and speedup < budgets.min_speedup:
        failed.append(f"speedup {speedup:.1f}x < min_speedup {budgets.min_speedup}")
    size_mb = results["artifact"]["size_bytes"] / 1e6
    if budgets.max_size_mb and not on_device:
        # the stand-in's file is the graph an engine is built from, not the engine the device would ship
        build["unverified"].append("size budget (max_size_mb): needs the engine, which is built on the device")
    elif budgets.max_size_mb and size_mb > budgets.max_size_mb:
        failed.append(f"artifact {results['artifact']['path']} is {size_mb:.3f} MB > max_size_mb {budgets.max_size_mb}")

    result = {
        "schema": SCHEMA, "target": target.name,
        "data": {"name": ds.name, "eval_images": len(labels), "classes": list(ds.classes),
                 "eval_per_class": np.bincount(labels, minlength=ds.num_classes).tolist(),
                 "skipped_images": len(ds.skipped), "preprocess": ctx.preprocess.describe()},
        "teacher": results["teacher"], "student_fp32": results["student_fp32"], "artifact": results["artifact"],
        "speedup_vs_teacher": round(speedup, 2),
        "size_ratio": round(results["teacher"]["size_bytes"] / results["artifact"]["size_bytes"], 2),
        "accuracy_drop_pt": round(drop, 3),
        "accuracy_differences": differences,
        "budgets": {**dataclasses.asdict(budgets), "passed": not failed, "failed": failed},
        "unverified": build["unverified"],
        "statistics": {
            "level": stats.LEVEL, "resamples": resamples, "seed": seed,
            "latency_min_seconds": min_seconds, "latency_max_runs": MAX_TIMED_RUNS,
            "latency_sessions": conf.latency_sessions, "latency_max_seconds": conf.latency_max_seconds,
            "accuracy": "paired percentile bootstrap over eval images (Efron 1979)",
            "latency_p50": "moving-block percentile bootstrap over consecutive timed runs (Kuensch 1989), "
                           "block length round(runs^(1/3)), per session; the interval spans all sessions' "
                           "intervals",
            "latency_warmup": f"windows of {WARMUP_WINDOW} calls until a window's median is within "
                              f"{WARMUP_TOLERANCE:.0%} of the previous one's (at most {WARMUP_MAX_SECONDS} s "
                              "per session)"},
        "host": cfg.host(), "versions": cfg.versions(), "seed": seed,
    }
    selection = ctx.out / "select" / "selection.json"
    if selection.is_file():
        record = json.loads(selection.read_text())
        if record.get("chosen") == ctx.config.distill.student:
            result["student_selection"] = {k: v for k, v in record.items() if k != "key"}
    calibration = ctx.out / "quantize" / "calibration.json"
    if calibration.is_file():  # the quantize stage's tries: which nodes stayed float, and what each try measured
        record = json.loads(calibration.read_text())
        keys = ("try", "kind", "calibration", "excluded_nodes", "selection_top1", "drop_vs_fp32_pt", "latency_bs1_ms")
        result["quantization"] = {
            "scheme": record["scheme"]["name"], "method": record.get("method"), "budget": record.get("budget"),
            "excluded_nodes": record["excluded_nodes"], "chosen_try": record.get("chosen_try", 0),
            "qat": record.get("qat", "not needed"), "selection": record.get("selection"),
            "selection_images": record.get("selection_images"),
            "tries": [{k: t[k] for k in keys if k in t} for t in record["tries"]],
            "input_fold": next((t.get("input_fold") for t in record["tries"]
                                if t["try"] == record.get("chosen_try", 0)), None)}
    files.write_json(out_dir / "report.json", result)
    files.write_json(out_dir / "latency.json", {"unit": "ms per batch, in the order timed", "timings": timings,
                                                "runs_per_session": session_runs})
    report.write(out_dir, result, timings)
    return out_dir / "report.json"


STAGE = Stage("verify", run, inputs)
