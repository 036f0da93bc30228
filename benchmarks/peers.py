"""The artifact against what a user would pick instead, side by side in one process: the teacher in eager PyTorch,
in ONNX Runtime fp32 and int8 (quantize_static's defaults), quantized by NNCF for OpenVINO (no distillation); the
distilled student in OpenVINO fp32 and NNCF int8; and the pipeline's own artifact in ONNX Runtime and as OpenVINO
IR (the x86-openvino target's export). Accuracy on the run's eval split; latency at batch 1 and 64, every model's
sessions interleaved over rounds so all meet the same state of the machine.

    python benchmarks/peers.py [--run runs/default] [--threads 1] [--rounds 4]

Peers are optional benchmark dependencies (openvino, nncf), never core ones. The run directory is the default
`edgecompress compress` one unless given; its calibration images (the quantize stage's, by the seed in run.toml)
calibrate every peer too. Writes benchmarks/results/peers.json and peers.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance, save_results  # noqa: E402

from edgecompress import data as datasets  # noqa: E402
from edgecompress import quantize, targets  # noqa: E402
from edgecompress.backends.onnxruntime import OrtRunner  # noqa: E402
from edgecompress.backends.openvino import OpenVINORunner  # noqa: E402
from edgecompress.progress import NoBar  # noqa: E402
from edgecompress.runner import RunContext, open_run  # noqa: E402
from edgecompress.runners import TorchRunner, predict  # noqa: E402
from edgecompress.verify import time_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 64)


def calibration_images(ctx: RunContext) -> torch.Tensor:
    ds = ctx.data
    picked = datasets.stratified_sample(ds.y_train, ctx.config.quantize.calibration_size, ctx.config.seed)
    return datasets.to_float(ds.x_train[picked])


def ort_default_int8(fp32: Path, out: Path, calibration: torch.Tensor) -> Path:
    """ONNX Runtime's quantize_static with its defaults (QDQ, uint8 activations, int8 weights, per tensor)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = [calibration[i:i + 64].numpy() for i in range(0, len(calibration), 64)]

        def get_next(self):
            return {"input": self.batches.pop()} if self.batches else None

    quant_pre_process(str(fp32), str(out.with_suffix(".pre.onnx")), skip_symbolic_shape=True)
    quantize_static(str(out.with_suffix(".pre.onnx")), str(out), Reader())
    return out


def nncf_int8(fp32: Path, out: Path, calibration: torch.Tensor) -> Path:
    """NNCF's post-training quantization of an ONNX model read by OpenVINO (its defaults: mixed preset), as IR."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32))
    dataset = nncf.Dataset([calibration[i:i + 1].numpy() for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def openvino_ir(onnx_path: Path, out: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(out), compress_to_fp16=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per session")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import nncf
    import onnxruntime
    import openvino as ov

    began = time.perf_counter()
    ctx = RunContext(args.run, open_run(args.run), quiet=True)
    ds, teacher = ctx.data, ctx.teacher[0]
    ov_settings = targets.load("x86-openvino").openvino
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    calibration = calibration_images(ctx)
    teacher_onnx = work / "teacher.fp32.onnx"
    spec = {"input_shape": list(ds.input_shape), "mean": ctx.data_stats[0], "std": ctx.data_stats[1],
            "classes": list(ds.classes)}
    quantize.export_onnx(teacher.eval(), spec, 17, teacher_onnx)  # the teacher takes [0, 1] pixels, as exported
    student_fp32 = args.run / "quantize" / "student.fp32.onnx"
    artifact = args.run / "quantize" / "student.int8.onnx"
    print("[peers] quantizing the peers", flush=True)
    paths = {"teacher_ort_int8": ort_default_int8(teacher_onnx, work / "teacher.ort-int8.onnx", calibration),
             "teacher_nncf_int8": nncf_int8(teacher_onnx, work / "teacher.nncf.xml", calibration),
             "student_ov_fp32": openvino_ir(student_fp32, work / "student.fp32.xml"),
             "student_nncf_int8": nncf_int8(student_fp32, work / "student.nncf.xml", calibration),
             "artifact_ov_int8": openvino_ir(artifact, work / "artifact.xml")}
    t = args.threads
    models = {
        "teacher, eager PyTorch fp32": lambda n: TorchRunner(teacher, n),
        "teacher, ONNX Runtime fp32": lambda n: OrtRunner(teacher_onnx, n, "ort"),
        "teacher, ONNX Runtime int8 (quantize_static defaults)": lambda n: OrtRunner(paths["teacher_ort_int8"], n, "ort"),
        "teacher, NNCF int8 in OpenVINO (no distillation)":
            lambda n: OpenVINORunner(paths["teacher_nncf_int8"], n, ov_settings, "ov"),
        "student fp32, ONNX Runtime": lambda n: OrtRunner(student_fp32, n, "ort"),
        "student fp32, OpenVINO": lambda n: OpenVINORunner(paths["student_ov_fp32"], n, ov_settings, "ov"),
        "student, NNCF int8 in OpenVINO": lambda n: OpenVINORunner(paths["student_nncf_int8"], n, ov_settings, "ov"),
        "edgecompress artifact, ONNX Runtime int8": lambda n: OrtRunner(artifact, n, "ort"),
        "edgecompress artifact as OpenVINO IR (x86-openvino)":
            lambda n: OpenVINORunner(paths["artifact_ov_int8"], n, ov_settings, "ov"),
    }
    cores = os.cpu_count() or 1
    labels = ds.y_eval.numpy()
    rows = {}
    for name, make in models.items():
        print(f"[peers] accuracy: {name}", flush=True)
        logits = predict(make(cores), ds.x_eval, 500)
        rows[name] = {"model": name, "top1": float((logits.argmax(1) == labels).mean()), "session_p50_ms": {}}
    for round_ in range(args.rounds):
        for batch in BATCHES:
            for name, make in models.items():
                [times] = time_runs(lambda m=make: m(t), ds.x_eval, batch, warmup=10, runs=30 if batch > 1 else 200,
                                    min_seconds=args.seconds, progress=lambda n: NoBar(None), sessions=1)
                rows[name]["session_p50_ms"].setdefault(f"bs{batch}", []).append(round(float(np.median(times)), 4))
        print(f"[peers] timing round {round_ + 1}/{args.rounds} done", flush=True)
    for row in rows.values():
        row["p50_ms"] = {b: round(float(np.median(v)), 4) for b, v in row["session_p50_ms"].items()}
    result = {"run": str(args.run), "eval_images": len(labels), "threads": t, "rounds": args.rounds,
              "seconds_per_session": args.seconds, "peer_versions": {"openvino": ov.__version__, "nncf": nncf.__version__,
                                                                       "onnxruntime": onnxruntime.__version__,
                                                                       "torch": torch.__version__},
              "calibration_images": len(calibration), "rows": list(rows.values()),
              "wall_minutes": round((time.perf_counter() - began) / 60, 1),
              "date": time.strftime("%Y-%m-%d"), **provenance()}
    save_results(args.out, "peers", result, markdown(result))
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    ours = next(r for r in rows if r["model"].startswith("edgecompress artifact, ONNX"))
    lines = [f"# The artifact against its peers ({result['eval_images']} eval images, {result['threads']} thread, "
             f"{result['rounds']} interleaved rounds)", "",
             f"openvino {result['peer_versions']['openvino']}, nncf {result['peer_versions']['nncf']}, onnxruntime "
             f"{result['peer_versions']['onnxruntime']}, torch {result['peer_versions']['torch']}; "
             f"{result['host']['cpu']}, "
             f"{result['date']}. Latency: median of the rounds' session medians, ms per batch.", "",
             "| model | top-1 % | bs1 ms | bs64 ms | bs1 vs artifact (ORT) | bs64 vs artifact (ORT) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = {b: r["p50_ms"][b] / ours["p50_ms"][b] for b in ("bs1", "bs64")}
        lines.append(f"| {r['model']} | {r['top1'] * 100:.2f} | {r['p50_ms']['bs1']:.3f} | {r['p50_ms']['bs64']:.2f} | "
                     f"{ratio['bs1']:.2f}x | {ratio['bs64']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
