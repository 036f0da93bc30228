"""The 224-px student zoo, and a real distillation with torchvision/timm models on photos.

    python benchmarks/students224.py --photos /tmp/photos/fmnist-224 --work /tmp/students224 [--sections zoo,distill]

Sections:
- zoo: every photo student of the zoo (models/libraries.py PHOTO_STUDENTS) at 224x224 RGB with 1,000 classes:
  parameters, MACs (conv and linear layers), fp32 and int8 (QDQ, the x86-cpu scheme) ONNX Runtime p50 at
  batch 1 and 16 with 1 thread and with every core, and which layers ONNX Runtime runs in int8 (and which
  operators run in float between int8 kernels). Calibration and timing use real Fashion-MNIST images at 224 px.
- distill: on the 224-px Fashion-MNIST JPEG folder that benchmarks/photos.py writes (--photos), a CSV list of
  the first 2,000 training images of each class and all 10,000 test images, at --size (112 by default: 224 does
  not fit the 2-core machine's time). A torchvision:resnet18 teacher is trained from scratch by
  models/train_teacher.py, then `edgecompress compress` distils it into --student (bf16 autocast where the CPU
  has it for the teacher; --student-precision for the student) for the x86-cpu target. Reported: teacher,
  student fp32 and int8 top-1 on the 10,000 test images, and the int8 artifact's speed-up over the teacher in
  ONNX Runtime fp32 and over the teacher in eager PyTorch, batch 1, the x86-cpu thread count, interleaved in
  one process.

Writes students224.json and students224.md under --out.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance, save_results  # noqa: E402
from readme import zoo_table  # noqa: E402

from edgecompress import backends, quantize, targets  # noqa: E402
from edgecompress.kernels import kernel_report, macs_per_image  # noqa: E402
from edgecompress.models import count_params, libraries  # noqa: E402
from edgecompress.models.loaders import build_model  # noqa: E402
from edgecompress.progress import NoBar  # noqa: E402
from edgecompress.backends.onnxruntime import OrtRunner  # noqa: E402
from edgecompress.runners import TorchRunner  # noqa: E402
from edgecompress.select import fashion_photos  # noqa: E402
from edgecompress.verify import time_runs  # noqa: E402

SECTIONS = ("zoo", "distill")  # and "macs": recount the zoo rows' MACs from their ONNX files in --work
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def p50(make_runner, images: torch.Tensor, batch: int, runs: int, seconds: float) -> float:
    [times] = time_runs(make_runner, images, batch, warmup=5, runs=runs, min_seconds=seconds,
                        progress=lambda length: NoBar(None), sessions=1)
    return round(float(np.median(times)), 3)


def zoo(work: Path) -> list[dict]:
    calibration, images = fashion_photos((224, 224), 64, 32, 0)
    scheme = backends.scheme_for(targets.load("x86-cpu"))
    classes = [str(i) for i in range(1000)]
    spec = {"input_shape": [3, 224, 224], "mean": MEAN, "std": STD, "classes": classes}
    rows = []
    for name in libraries.PHOTO_STUDENTS:
        model, _ = build_model(name, "", 3, 1000, MEAN, STD, "student")
        fp32, int8 = work / f"{name.replace(':', '-')}.fp32.onnx", work / f"{name.replace(':', '-')}.int8.onnx"
        quantize.export_onnx(model.eval(), spec, 17, fp32)
        quantize.quantize_qdq(fp32, int8, calibration, "minmax", scheme)
        found = kernel_report(int8, 1)
        row = {"name": name, "params": count_params(model), "mmacs": round(macs_per_image(fp32) / 1e6, 1),
               "int8_layers": found["int8_compute_layers"], "float_layers": len(found["float_compute_layers"]),
               "dequantized_ops": found["dequantized_ops"], "p50_ms": {}}
        for threads in (1, os.cpu_count()):
            for batch in (1, 16):
                for precision, path in (("fp32", fp32), ("int8", int8)):
                    make = functools.partial(OrtRunner, path, threads, f"onnxruntime-{precision}")
                    row["p50_ms"][f"{precision}_bs{batch}_t{threads}"] = p50(make, images, batch,
                                                                            100 if batch == 1 else 10, 1.0)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_list(photos: Path, path: Path, per_class: int) -> Path:
    """path,label,split lines: the first `per_class` training images of each class, and every test image."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        for split in ("train", "test"):
            for folder in sorted(p for p in (photos / split).iterdir() if p.is_dir()):
                files = sorted(folder.glob("*.jpg"))
                for file in files[:per_class] if split == "train" else files:
                    out.writerow([str(file), folder.name, split])
    return path


def distill(photos: Path, work: Path, size: int, student: str, teacher_epochs: int, epochs: int,
            student_precision: str) -> dict:
    from edgecompress.models import train_teacher

    work.mkdir(parents=True, exist_ok=True)
    listing = write_list(photos, work / "photos.csv", 2000)
    teacher_ckpt = work / "teacher.pt"
    began = 0.0
    if not teacher_ckpt.is_file():  # else reused from an earlier run of this script
        began = time.perf_counter()
        train_teacher.train("torchvision:resnet18", str(listing), teacher_epochs, 0, 128, 0.1, [size], teacher_ckpt)
    teacher_s = round(time.perf_counter() - began, 1) if began else None
    config = work / "run.toml"
    config.write_text(f'[distill]\nprecision = "{student_precision}"\n')
    command = ["edgecompress", "compress", "--teacher", "torchvision:resnet18", "--teacher-weights", str(teacher_ckpt),
               "--student", student, "--data", str(listing), "--input-size", str(size), "--epochs", str(epochs),
               "--config", str(config), "--out", str(work / "run"), "--quiet"]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    compress_s = round(time.perf_counter() - began, 1)
    report = json.loads((work / "run" / "verify" / "report.json").read_text())

    # The int8 artifact against the teacher in ONNX Runtime fp32 and in eager PyTorch, at batch 1, interleaved.
    meta = torch.load(teacher_ckpt, weights_only=True)["meta"]
    teacher, _ = build_model("torchvision:resnet18", str(teacher_ckpt), 3, 10, meta["mean"], meta["std"], "teacher")
    spec = {"input_shape": [3, size, size], "mean": meta["mean"], "std": meta["std"],
            "classes": [str(i) for i in range(10)]}
    threads = targets.load("x86-cpu").threads
    artifact = next((work / "run" / "export").glob("**/*.onnx"))
    student_pt, _ = quantize.load_student(work / "run" / "distill" / "student.pt", student)
    images = torch.rand(16, 3, size, size)  # latency only: the values do not change these dense CNNs' time
    timings: dict[str, list[float]] = {"teacher_ort_fp32": [], "teacher_eager": [], "student_eager": [],
                                      "artifact_int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_onnx = Path(tmp) / "teacher.onnx"
        quantize.export_onnx(teacher, spec, 17, teacher_onnx)
        makers = {"teacher_ort_fp32": functools.partial(OrtRunner, teacher_onnx, threads, "onnxruntime-fp32"),
                  "teacher_eager": functools.partial(TorchRunner, teacher, threads),
                  "student_eager": functools.partial(TorchRunner, student_pt, threads),
                  "artifact_int8": functools.partial(OrtRunner, artifact, threads, "onnxruntime-int8")}
        for _ in range(3):
            for name, make in makers.items():
                timings[name].append(p50(make, images, 1, 100, 1.0))
    ms = {name: float(np.median(v)) for name, v in timings.items()}
    top1 = {name: report[key]["accuracy"] for name, key in (("teacher", "teacher"), ("student_fp32", "student_fp32"),
                                                        ("artifact_int8", "artifact"))}
    # the stages' own times (a rerun over a finished run directory skips them, so its wall time says nothing)
    stage_s = {str(done.parent.relative_to(work / "run")): json.loads(done.read_text())["seconds"]
               for done in (work / "run").glob("**/done.json")}
    calibration = json.loads((work / "run" / "quantize" / "calibration.json").read_text())
    tries = [{"try": t["try"], "kind": t["kind"], "calibration": t["calibration"],
              "float_nodes": len(t["excluded_nodes"]), "selection_top1": t["selection_top1"],
              "chosen": t["try"] == calibration["chosen_try"]} for t in calibration["tries"]]
    return {"size": size, "student": student, "teacher": "torchvision:resnet18", "train_images": 20000,
            "eval_images": report["data"]["eval_images"],
            "teacher_epochs": teacher_epochs, "teacher_train_s": teacher_s, "teacher_eval_top1_own": meta["eval_top1"],
            "epochs": epochs, "student_precision": student_precision, "compress_s": round(sum(stage_s.values()), 1),
            "stage_s": stage_s, "this_call_s": compress_s, "quantize_tries": tries,
            "compress_exit": done.returncode, "compress_stderr_tail": done.stderr[-600:], "top1": top1,
            "drop_pt": round(100 * (top1["teacher"] - top1["artifact_int8"]), 2), "threads": threads,
            "p50_ms": ms, "session_p50_ms": timings,
            "speedup_vs_teacher_ort_fp32": round(ms["teacher_ort_fp32"] / ms["artifact_int8"], 2),
            "speedup_vs_teacher_eager": round(ms["teacher_eager"] / ms["artifact_int8"], 2),
            "student_eager_speedup_vs_teacher_eager": round(ms["teacher_eager"] / ms["student_eager"], 2),
            "command": " ".join(command)}


def table(result: dict) -> str:
    lines = ["# Students for photos (224-px zoo)", ""]
    if "zoo" in result:
        lines += ["224x224 RGB, 1,000 classes; ONNX Runtime p50 ms (fp32 / int8 QDQ, x86-cpu scheme); "
                  f"t1 = 1 thread, t{result['provenance']['host']['cores']} = every core.", "", *zoo_table(result), ""]
    if "distill" in result:
        d = result["distill"]
        t = d["top1"]
        trained = f"{d['teacher_train_s']:.0f} s" if d["teacher_train_s"] else "trained by an earlier run"
        lines += [f"## Distillation at {d['size']} px: {d['teacher']} -> {d['student']}", "",
                  f"{d['train_images']:,} training photos, {d['teacher_epochs']} teacher epochs ({trained}), "
                  f"{d['epochs']} distillation epochs ({d['student_precision']}), "
                  f"compress {d['compress_s']:.0f} s (exit {d['compress_exit']}).", "",
                  "| model | top-1 | bs1 p50 ms |", "|---|---|---|",
                  f"| teacher, eager PyTorch fp32 | {100 * t['teacher']:.2f}% | {d['p50_ms']['teacher_eager']:.3f} |",
                  f"| teacher, ONNX Runtime fp32 | (same weights) | {d['p50_ms']['teacher_ort_fp32']:.3f} |",
                  f"| student, eager PyTorch fp32 | {100 * t['student_fp32']:.2f}% | "
                  f"{d['p50_ms']['student_eager']:.3f} |",
                  f"| student int8 artifact, ONNX Runtime | {100 * t['artifact_int8']:.2f}% | "
                  f"{d['p50_ms']['artifact_int8']:.3f} |", "",
                  f"int8 artifact vs teacher: {d['drop_pt']:+.2f} pt drop; "
                  f"{d['speedup_vs_teacher_ort_fp32']}x faster than the teacher in ONNX Runtime fp32, "
                  f"{d['speedup_vs_teacher_eager']}x than the teacher in eager PyTorch ({d['threads']} thread(s), "
                  "batch 1, interleaved in one process).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("/tmp/photos/fmnist-224"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/students224"))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--student", default="timm:mobilenetv4_conv_small")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student-precision", default="fp32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    sections = args.sections.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    previous = args.out / "students224.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result["provenance"] = provenance()
    if "distill" in sections:
        result["distill"] = distill(args.photos, args.work / "distill", args.size, args.student, args.teacher_epochs,
                                    args.epochs, args.student_precision)
    if "zoo" in sections:
        result["zoo"] = zoo(args.work)
    if "macs" in sections:  # MACs counted by a later kernels.macs_per_image, without timing everything again
        for row in result["zoo"]:
            row["mmacs"] = round(macs_per_image(args.work / f"{row['name'].replace(':', '-')}.fp32.onnx") / 1e6, 1)
    save_results(args.out, "students224", result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
