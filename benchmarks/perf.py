"""Performance benchmark: inference against this machine's measured peaks, distillation throughput, end to end.

    python benchmarks/perf.py [--run runs/default] [--sections e2e,inference,peaks,distill] [--out benchmarks/results]

Prints one table per section and writes perf.json and perf.md under --out. Every figure is measured in this run
on this host, so ratios between rows hold even when the machine is busier than usual:
- e2e: `edgecompress compress` with the defaults into a fresh run directory, wall time per stage;
- inference: the teacher in PyTorch eager and in ONNX Runtime fp32, the student fp32 and the int8 artifact in
  ONNX Runtime, at batch 1 and 64 with 1 and 2 threads: p50 ms per batch, images/s, achieved GOP/s
  (2 x multiply-accumulates per image x images/s) and the share of the matching peak;
- peaks: ONNX Runtime MatMulInteger (uint8 x int8 -> int32, the kernel family of the int8 convolutions), an
  fp32 MatMul on square matrices and an fp32 3x3 convolution (NCHWc), GOP/s with 1 and 2 threads;
- distill: training images/s of the student alone, naive KD (teacher forward every step) and KD with cached
  teacher logits, each in fp32 and bf16 autocast.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from edgecompress import config as cfg
from edgecompress import data as datasets
from edgecompress import files, quantize
from edgecompress.kernels import macs_per_image
from edgecompress.models.loaders import build_model
from edgecompress.runner import RunContext, open_run
from edgecompress.backends.onnxruntime import OrtRunner
from edgecompress.runners import TorchRunner
from edgecompress.verify import time_runs

SECTIONS = ("e2e", "inference", "peaks", "distill")
STAGES = ("distill", "quantize", "export", "verify")


def p50_ms(make_runner, images: torch.Tensor, batch: int, progress, seconds: float = 1.5) -> float:
    """Median ms per batch over 3 fresh sessions, the verify stage's method."""
    sessions = time_runs(make_runner, images, batch, warmup=10, runs=30 if batch > 1 else 300, min_seconds=seconds,
                         progress=progress, sessions=3)
    return float(np.median(np.concatenate(sessions)))


def interleaved(make_slow, make_fast, images: torch.Tensor, batch: int, progress, rounds: int = 6,
                seconds: float = 1.0) -> dict:
    """Fresh sessions of two models in turn (slow, fast, slow, fast, ...), so both meet the same state of the
    machine: the host's speed changes over seconds to minutes here, even within one session, and two models
    timed minutes apart can differ by 30% from that alone. Returns each one's median of session medians and
    their ratio."""
    medians: dict[str, list[float]] = {"slow": [], "fast": []}
    for _ in range(rounds):
        for name, make in (("slow", make_slow), ("fast", make_fast)):
            [times] = time_runs(make, images, batch, warmup=10, runs=30 if batch > 1 else 300, min_seconds=seconds,
                                progress=progress, sessions=1)
            medians[name].append(round(float(np.median(times)), 4))
    slow, fast = float(np.median(medians["slow"])), float(np.median(medians["fast"]))
    return {"batch": batch, "slow_ms": round(slow, 4), "fast_ms": round(fast, 4), "ratio": round(slow / fast, 2),
            "session_medians_ms": medians}


# --- sections --------------------------------------------------------------------------------------------------

def run_e2e(run_dir: Path, *options: str) -> dict:
    """A first run (default settings unless `options` add some): the run directory is removed before, so nothing
    is reused (not even teacher logits)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(["edgecompress", "compress", "--out", str(run_dir), "--quiet", *options], check=True)
    wall = time.perf_counter() - began
    stages = {}
    for stage in STAGES:
        done = next((run_dir).glob(f"{stage}/**/done.json"), None) or run_dir / stage / "done.json"
        stages[stage] = json.loads(done.read_text())["seconds"]
    report = json.loads((run_dir / "verify" / "report.json").read_text())
    config = cfg.read_toml(run_dir / "run.toml")
    return {"wall_s": round(wall, 1), "stage_s": stages, "run": str(run_dir),
            "top1": {name: report[name]["accuracy"] for name in ("teacher", "student_fp32", "artifact")},
            "bs1_p50_ms": {name: report[name]["latency_ms"]["bs1"]["p50"] for name in ("teacher", "artifact")},
            "speedup_vs_teacher": report["speedup_vs_teacher"], "size_ratio": report["size_ratio"],
            "student": config["distill"]["student"], "method": config["distill"]["method"],
            "epochs": config["distill"]["epochs"], "eval_images": report["data"]["eval_images"]}


def kernel_peak(kind: str, threads: int, size: int = 1024) -> float:
    """GOP/s of ONNX Runtime's MatMulInteger (uint8 x int8, "u8s8") or fp32 MatMul ("fp32") on size x size
    matrices, or of an fp32 3x3 convolution, 256 -> 256 channels on 28x28 ("fp32conv"): ORT's blocked NCHWc conv
    kernels run closer to the fp32 ceiling than its MatMul on this kind of CPU, so both are measured."""
    rng = np.random.default_rng(0)
    if kind == "u8s8":
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])
        b = numpy_helper.from_array(rng.integers(-128, 127, (size, size), dtype=np.int8), "b")
        out = helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        x = rng.integers(0, 255, (size, size), dtype=np.uint8)
        ops = 2 * size ** 3
    elif kind == "fp32":
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
        b = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "b")
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        x = rng.standard_normal((size, size), dtype=np.float32)
        ops = 2 * size ** 3
    else:
        channels, side = 256, 28
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, channels, side, side])
        b = numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3), dtype=np.float32), "b")
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, side, side])
        node = helper.make_node("Conv", ["a", "b"], ["y"], pads=[1, 1, 1, 1])
        x = rng.standard_normal((1, channels, side, side), dtype=np.float32)
        ops = 2 * channels * channels * 9 * side * side
    graph = helper.make_graph([node], "kernel", [a], [out], [b])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        runner = OrtRunner(path, threads, kind)
        for _ in range(3):
            runner(x)
        times = []
        began = time.perf_counter()
        while len(times) < 10 or time.perf_counter() - began < 1.5:
            start = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - start)
    return ops / float(np.median(times)) / 1e9


def run_peaks() -> dict:
    return {f"{kind}_{threads}t": round(kernel_peak(kind, threads), 1)
            for kind in ("u8s8", "fp32", "fp32conv") for threads in (1, 2)}


def run_inference(run_dir: Path, peaks: dict) -> list[dict]:
    ctx = RunContext(run_dir, open_run(run_dir), quiet=True)
    ds, (teacher, _) = ctx.data, ctx.teacher
    student_fp32, artifact = run_dir / "quantize" / "student.fp32.onnx", run_dir / "export" / ctx.target.name / \
        "model.onnx"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_onnx = Path(tmp) / "teacher.onnx"
        spec = {"input_shape": list(ds.input_shape), "mean": ctx.data_stats[0], "std": ctx.data_stats[1],
                "classes": list(ds.classes)}
        quantize.export_onnx(teacher.eval(), spec, ctx.target.opset, teacher_onnx)
        teacher_macs, student_macs = macs_per_image(teacher_onnx), macs_per_image(student_fp32)
        models = [("teacher", "torch-eager-fp32", teacher_macs, lambda t: lambda: TorchRunner(teacher, t)),
                  ("teacher", "onnxruntime-fp32", teacher_macs,
                   lambda t: lambda: OrtRunner(teacher_onnx, t, "onnxruntime-fp32")),
                  ("student", "onnxruntime-fp32", student_macs,
                   lambda t: lambda: OrtRunner(student_fp32, t, "onnxruntime-fp32")),
                  ("artifact", "onnxruntime-int8", student_macs,
                   lambda t: lambda: OrtRunner(artifact, t, "onnxruntime-int8"))]
        for name, runtime, macs, make in models:
            for threads in (1, 2):
                for batch in (1, 64):
                    ms = p50_ms(make(threads), ds.x_eval, batch, lambda n: ctx.progress(None, "timing", n))
                    ips = batch * 1e3 / ms
                    gops = 2 * macs * ips / 1e9
                    # fp32 rows against the faster of the two fp32 kernels measured
                    peak = peaks.get(f"u8s8_{threads}t") if "int8" in runtime else max(
                        peaks.get(f"fp32_{threads}t", 0), peaks.get(f"fp32conv_{threads}t", 0)) or None
                    rows.append({"model": name, "runtime": runtime, "threads": threads, "batch": batch,
                                 "p50_ms": round(ms, 4), "images_per_s": round(ips, 1), "macs_per_image": macs,
                                 "gops": round(gops, 2), "pct_of_peak": round(100 * gops / peak, 1) if peak else None})
                    print(f"  {name:8} {runtime:17} {threads}t bs{batch:<3} {ms:9.3f} ms  {ips:9.1f} img/s  "
                          f"{gops:7.2f} GOP/s", flush=True)
        for batch in (1, 64):  # the int8-vs-fp32 ratio once more, its two models timed in alternating sessions
            pair = interleaved(lambda: OrtRunner(student_fp32, 1, "onnxruntime-fp32"),
                               lambda: OrtRunner(artifact, 1, "onnxruntime-int8"), ds.x_eval, batch,
                               lambda n: ctx.progress(None, "interleaved", n))
            rows.append({"model": "student fp32 vs artifact int8, interleaved", "threads": 1, **pair})
            print(f"  interleaved bs{batch}: fp32 {pair['slow_ms']} ms, int8 {pair['fast_ms']} ms, {pair['ratio']}x",
                  flush=True)
    return rows


def run_distill(run_dir: Path, steps: int = 20, batch: int = 128) -> list[dict]:
    """Training images/s of one optimiser step loop: student alone (cross-entropy), naive Hinton KD (teacher
    forward every step) and Hinton KD reading cached teacher logits; fp32 and bf16 autocast."""
    ctx = RunContext(run_dir, open_run(run_dir), quiet=True)
    ds, (teacher, _) = ctx.data, ctx.teacher
    count = (steps + 3) * batch
    x_all = datasets.to_float(ds.x_train[:count]).contiguous(memory_format=torch.channels_last)
    y_all = ds.y_train[:count]
    teacher = teacher.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        cached = torch.cat([teacher(x_all[i:i + 500]) for i in range(0, count, 500)])
    rows = []
    for precision in ("fp32", "bf16"):
        for mode in ("student alone", "naive KD", "cached KD"):
            torch.manual_seed(0)
            student, _ = build_model(ctx.config.distill.student, "", ds.input_shape[0], ds.num_classes,
                                     *ctx.data_stats, role="student")
            student = student.train().to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
            began = None
            for step in range(steps + 3):
                if step == 3:
                    began = time.perf_counter()
                x, y = x_all[step * batch:(step + 1) * batch], y_all[step * batch:(step + 1) * batch]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    if mode == "naive KD":
                        with torch.no_grad():
                            soft = teacher(x).float()
                    else:
                        soft = cached[step * batch:(step + 1) * batch]
                    logits = student(x).float()
                loss = F.cross_entropy(logits, y)
                if mode != "student alone":
                    temperature = 4.0
                    loss = 0.1 * loss + 0.9 * temperature ** 2 * F.kl_div(
                        F.log_softmax(logits / temperature, 1), F.log_softmax(soft / temperature, 1),
                        reduction="batchmean", log_target=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            ips = steps * batch / (time.perf_counter() - began)
            rows.append({"mode": mode, "precision": precision, "images_per_s": round(ips, 1)})
            print(f"  {mode:14} {precision}  {ips:8.1f} img/s", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Performance benchmark", "", f"Host: {result['host']['cpu']}, {result['host'].get('cores')} cores; "
             f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}.", ""]
    if "e2e" in result:
        e = result["e2e"]
        lines += ["## End to end: default `edgecompress compress`", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {s} | {v:.1f} |" for s, v in e["stage_s"].items()] + [f"| wall, all | {e['wall_s']:.1f} |", ""]
    if "peaks" in result:
        lines += ["## Peaks (ONNX Runtime: 1024^3 GEMMs, and a 3x3 256-channel conv on 28x28)", "",
                  "| kernel | threads | GOP/s |", "|---|---|---|"]
        lines += [f"| {k.rsplit('_', 1)[0]} | {k.rsplit('_', 1)[1]} | {v} |" for k, v in result["peaks"].items()] + [""]
    if "inference" in result:
        lines += ["## Inference", "", "| model | runtime | threads | batch | p50 ms | images/s | GOP/s | % of peak |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['runtime']} | {r['threads']} | {r['batch']} | {r['p50_ms']} | "
                  f"{r['images_per_s']} | {r['gops']} | {r['pct_of_peak']} |" for r in result["inference"]
                  if "runtime" in r]
        pairs = [r for r in result["inference"] if "ratio" in r]
        if pairs:
            lines += ["", "Student fp32 vs int8 artifact, 1 thread, in alternating fresh sessions (medians of 6 "
                      "sessions each):", "", "| batch | fp32 ms | int8 ms | x faster | session medians fp32 / int8 |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['slow_ms']} | {r['fast_ms']} | {r['ratio']} | "
                      f"{', '.join(map(str, r['session_medians_ms']['slow']))} / "
                      f"{', '.join(map(str, r['session_medians_ms']['fast']))} |" for r in pairs]
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["ratios"].items()]
        lines.append("")
    if "distill" in result:
        lines += ["## Distillation throughput (training steps, batch 128)", "", "| mode | precision | images/s |",
                  "|---|---|---|"]
        lines += [f"| {r['mode']} | {r['precision']} | {r['images_per_s']} |" for r in result["distill"]] + [""]
    return "\n".join(lines)


def ratios(rows: list[dict], peaks: dict) -> dict:
    def ms(model, runtime, threads, batch):
        return next(r["p50_ms"] for r in rows if (r["model"], r.get("runtime"), r["threads"], r["batch"]) ==
                    (model, runtime, threads, batch))

    pairs = {r["batch"]: r["ratio"] for r in rows if "ratio" in r}
    artifact_bs64 = next(r for r in rows if r["model"] == "artifact" and r["threads"] == 1 and r["batch"] == 64)
    return {"artifact vs teacher torch eager, bs1 1 thread (x faster)":
            round(ms("teacher", "torch-eager-fp32", 1, 1) / ms("artifact", "onnxruntime-int8", 1, 1), 1),
            "artifact int8 vs student fp32 in ORT, bs1 1 thread (x faster)":
            round(ms("student", "onnxruntime-fp32", 1, 1) / ms("artifact", "onnxruntime-int8", 1, 1), 2),
            "artifact int8 vs student fp32 in ORT, bs64 1 thread (x faster)":
            round(ms("student", "onnxruntime-fp32", 1, 64) / ms("artifact", "onnxruntime-int8", 1, 64), 2),
            "the same, interleaved sessions, bs1 / bs64 (x faster)": f"{pairs.get(1)} / {pairs.get(64)}",
            "artifact bs64 1 thread, % of the u8s8 MatMulInteger peak": artifact_bs64["pct_of_peak"],
            # what int8 could gain at most over this fp32 student: the u8s8 peak against the fp32 student's own rate
            "ceiling of int8 vs student fp32, bs64 1 thread (u8s8 peak / fp32 student GOP/s)":
            round(peaks["u8s8_1t"] / next(r["gops"] for r in rows if (r["model"], r["threads"], r["batch"]) ==
                                          ("student", 1, 64)), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/bench-default"),
                        help="run directory: made by the e2e section, or an existing finished run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if "e2e" not in sections and not (args.run / "verify" / "report.json").is_file():
        parser.error(f"{args.run} is not a finished run: run the e2e section or pass --run RUN_DIR")
    result = provenance()
    if "e2e" in sections:
        print("e2e: edgecompress compress (defaults)", flush=True)
        result["e2e"] = run_e2e(args.run)
        print(f"  {result['e2e']}")
    if "peaks" in sections or "inference" in sections:
        print("peaks", flush=True)
        result["peaks"] = run_peaks()
        print(f"  {result['peaks']}")
    if "inference" in sections:
        print("inference", flush=True)
        result["inference"] = run_inference(args.run, result["peaks"])
        result["ratios"] = ratios(result["inference"], result["peaks"])
    if "distill" in sections:
        print("distill", flush=True)
        result["distill"] = run_distill(args.run)
    save_results(args.out, "perf", result, markdown(result))
    return 0


def provenance() -> dict:
    """What a performance result was measured on: the host (CPU, flags, cores) and the package versions."""
    return {"host": cfg.host() | {"cores": os.cpu_count()}, "versions": cfg.versions()}


def save_results(out: Path, stem: str, result: dict, text: str) -> None:
    """A benchmark's result as out/STEM.json and its table as out/STEM.md (both atomic), and the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / f"{stem}.json", result)
    files.write_text(out / f"{stem}.md", text)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
