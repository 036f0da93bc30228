"""Conv kernels: ONNX Runtime's int8 convolution against its fp32 one, layer by layer, on this CPU.

    python benchmarks/conv_kernels.py [--channels 48,64,96,128,192,256] [--sizes 4,7,14] [--sessions 2]

The int8-vs-fp32 goal of issue #8 is a whole-model ratio; this measures the kernels it is made of. For each
3x3 convolution + ReLU, C channels in and out on an SxS map: export to ONNX, quantize with the x86-cpu scheme
(random calibration data: only the shapes matter here), then run both in ONNX Runtime on 1 thread with all graph
optimisations (fp32 becomes a fused NCHWc Conv, int8 an NHWC QLinearConv) and read each convolution's own time
from ORT's profiler, the median over all runs of `--sessions` alternating sessions per model, at batch 1 and 64.
No model made of convolutions can beat the ratio its convolutions reach: the table bounds what any student
design can get over its fp32 twin on this host. The default student's own square 3x3 layers are always measured
too, and marked. Prints a table and writes conv_kernels.json and .md under --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance, save_results  # noqa: E402

from edgecompress import backends, quantize, targets  # noqa: E402
from edgecompress.config import DistillConfig  # noqa: E402
from edgecompress.models import create  # noqa: E402

STUDENT = DistillConfig().student  # the default student, whose layers the table marks


def square_convs(student: str) -> set[tuple[int, int]]:
    """(channels, map size) of the student's 3x3 convolutions with equal channels in and out, on 28x28 images."""
    found = set()

    def record(module, inputs, output):
        if module.kernel_size == (3, 3) and module.in_channels == module.out_channels:
            found.add((module.out_channels, output.shape[-1]))

    net = create(student, 1, 10).eval()
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return found


def kernel_events(session) -> list[tuple[str, str, float]]:
    """(node, operator, microseconds) of every kernel a profiled ONNX Runtime session ran, in order; ends the
    profile and removes its file."""
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    return [(e["name"][:-len("_kernel_time")], e["args"].get("op_name", "?"), e["dur"]) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def conv_us(path: Path, op_type: str, batch: int, shape: tuple[int, int, int], runs: int, work: Path) -> list[float]:
    """Per-run durations (us) of the `op_type` node in one fresh profiled session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
    for _ in range(runs):
        session.run(None, feed)
    durations = [us for _, op, us in kernel_events(session) if op == op_type]
    if not durations:
        raise RuntimeError(f"{path.name}: no {op_type} node ran; the graph is not the one this benchmark expects")
    return durations[runs // 10:]  # the first runs warm caches and prepack


def measure(channels: int, size: int, work: Path, sessions: int, marked: set[tuple[int, int]]) -> list[dict]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU()).eval()
    fp32, int8 = work / f"c{channels}s{size}.fp32.onnx", work / f"c{channels}s{size}.int8.onnx"
    torch.onnx.export(net, (torch.rand(1, channels, size, size),), str(fp32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    quantize.quantize_qdq(fp32, int8, torch.rand(64, channels, size, size), "minmax",
                          backends.scheme_for(targets.load("x86-cpu")))
    ops = 2 * channels * channels * 9 * size * size
    rows = []
    for batch in (1, 64):
        runs = 300 if batch == 1 else max(5, min(40, int(2e9 / (ops * batch))))
        times = collections.defaultdict(list)
        for _ in range(sessions):
            times["fp32"] += conv_us(fp32, "Conv", batch, (channels, size, size), runs, work)
            times["int8"] += conv_us(int8, "QLinearConv", batch, (channels, size, size), runs, work)
        fp32_us, int8_us = (float(np.median(times[kind])) for kind in ("fp32", "int8"))
        rows.append({"channels": channels, "size": size, "batch": batch, "fp32_us": fp32_us, "int8_us": int8_us,
                     "ratio": round(fp32_us / int8_us, 2), "fp32_gops": round(ops * batch / fp32_us / 1e3, 1),
                     "int8_gops": round(ops * batch / int8_us / 1e3, 1),
                     "in_default_student": (channels, size) in marked})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Conv kernels: int8 QLinearConv vs fp32 NCHWc Conv in ONNX Runtime ({result['host'].get('cpu')}, "
             "1 thread)", "", "3x3 convolution + ReLU, C channels in and out, on an SxS map; each kernel's own time "
             f"from ORT's profiler (median). * marks the layers of the default student, {result['student']}.", "",
             "| C | S | batch | fp32 us | int8 us | int8 x faster | fp32 GOP/s | int8 GOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = "*" if r["in_default_student"] else ""
        lines.append(f"| {r['channels']}{mark} | {r['size']} | {r['batch']} | {r['fp32_us']:.1f} | {r['int8_us']:.1f} "
                     f"| {r['ratio']:.2f} | {r['fp32_gops']} | {r['int8_gops']} |")
    for batch in (1, 64):
        at = [r for r in result["rows"] if r["batch"] == batch]
        over = [f"{r['channels']}@{r['size']}" for r in at if r["ratio"] >= 3]
        ours = [r for r in at if r["in_default_student"]]
        lines += ["", f"Batch {batch}: int8 is 3x or more faster for {len(over)} of {len(at)} shapes"
                  f"{' (' + ', '.join(over) + ')' if over else ''}."]
        if ours:
            lines[-1] += (f" The layers of {result['student']} measured here, together: "
                          f"{sum(r['fp32_us'] for r in ours) / sum(r['int8_us'] for r in ours):.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", default="48,64,96,128,192,256", help="comma-separated channel counts")
    parser.add_argument("--sizes", default="4,7,14", help="comma-separated map sizes (square)")
    parser.add_argument("--sessions", type=int, default=2, help="alternating profiled sessions per model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    try:
        channels = [int(c) for c in args.channels.split(",") if c]
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error("--channels and --sizes take comma-separated integers, e.g. --channels 48,64 --sizes 7,14")
    marked = square_convs(STUDENT)
    shapes = sorted({(c, s) for c in channels for s in sizes} | marked)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for c, s in shapes:
            for r in measure(c, s, Path(work), args.sessions, marked):
                rows.append(r)
                print(f"C={c} S={s} batch {r['batch']}: fp32 {r['fp32_us']:.1f} us, int8 {r['int8_us']:.1f} us, "
                      f"{r['ratio']:.2f}x", flush=True)
    result = provenance() | {"sessions": args.sessions, "student": STUDENT, "rows": rows}
    save_results(args.out, "conv_kernels", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
