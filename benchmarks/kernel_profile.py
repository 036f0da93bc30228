"""Where the time goes, kernel by kernel: the same int8 student in ONNX Runtime (the x86-cpu artifact) and in
OpenVINO (NNCF's int8 IR of the same fp32 student, and the x86-openvino export of the artifact), 1 thread, at
batch 1 and 64.

    python benchmarks/kernel_profile.py [--run runs/default] [--calls 200 20]

ONNX Runtime: a session with the target's settings and `enable_profiling`; each node's kernel time ("Node"
events, their `dur`) per call, summed per operator type. OpenVINO: the CPU
plugin's per-layer counters (`PERF_COUNT`): `real_time` per layer and its `exec_type` (the primitive the plugin
chose, e.g. brgconv_avx512_core_vnni_I8). Both report the median over the calls of each layer's time, and the
median wall time of an un-profiled call in the same process, so what the counters leave out (framework
overhead between kernels) shows as the difference. Writes benchmarks/results/kernel_profile.json and .md.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conv_kernels import kernel_events  # noqa: E402
from peers import calibration_images, nncf_int8, openvino_ir  # noqa: E402
from perf import kernel_peak, provenance, save_results  # noqa: E402

from edgecompress import targets  # noqa: E402
from edgecompress.kernels import macs_per_layer  # noqa: E402
from edgecompress.backends.onnxruntime import ort_session_options  # noqa: E402
from edgecompress.backends.openvino import compile_options  # noqa: E402
from edgecompress.runner import RunContext, open_run  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 64)
# a layer's name in the runtimes' profiles -> the fp32 ONNX node it comes from
LAYER_SUFFIXES = re.compile(r"(_token_\d+|/WithoutBiases|/WithoutBiases/DequantizationMultiply)$")


def wall_ms(call, x: np.ndarray, calls: int) -> float:
    for _ in range(10):
        call(x)
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        call(x)
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def ort_profile(model: Path, x: np.ndarray, calls: int, threads: int, settings, work: Path) -> dict:
    """Per-layer kernel times of ONNX Runtime (median over `calls`) and the layer's operator (ORT's profile names
    the operator, not the kernel beneath it)."""
    import onnxruntime as ort

    plain = ort.InferenceSession(str(model), ort_session_options(threads, settings), providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    wall = wall_ms(lambda v: plain.run(None, {name: v}), x, calls)
    options = ort_session_options(threads, settings)
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"ort-bs{len(x)}")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(10 + calls):  # the median over all calls: the warm-up calls do not move it
        session.run(None, {name: x})
    per_layer: dict[str, list[float]] = defaultdict(list)
    op_of = {}
    for layer, op, us in kernel_events(session):
        per_layer[layer].append(us / 1e3)
        op_of[layer] = op
    layers = [{"layer": k, "type": op_of[k], "kernel": op_of[k], "ms": statistics.median(v)}
              for k, v in per_layer.items()]
    return {"wall_ms": wall, "layers": layers}


def ov_profile(model: Path, x: np.ndarray, calls: int, threads: int, settings) -> dict:
    """Per-layer times of OpenVINO's CPU plugin (PERF_COUNT; median over `calls`) and the primitive it ran."""
    import openvino as ov

    core = ov.Core()
    plain = core.compile_model(str(model), "CPU", compile_options(threads, settings)).create_infer_request()
    wall = wall_ms(lambda v: plain.infer({0: v}, share_inputs=True), x, calls)
    compiled = core.compile_model(str(model), "CPU", compile_options(threads, settings) | {"PERF_COUNT": True})
    request = compiled.create_infer_request()
    per_layer: dict[str, list[float]] = defaultdict(list)
    kind = {}
    for i in range(10 + calls):
        request.infer({0: x}, share_inputs=True)
        if i < 10:
            continue
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                per_layer[info.node_name].append(info.real_time.total_seconds() * 1e3)
                kind[info.node_name] = (info.node_type, info.exec_type)
    layers = [{"layer": k, "type": kind[k][0], "kernel": kind[k][1], "ms": statistics.median(v)}
              for k, v in per_layer.items()]
    return {"wall_ms": wall, "layers": layers}


def by_type(profile: dict) -> list[dict]:
    totals: dict[str, dict] = {}
    for layer in profile["layers"]:
        row = totals.setdefault(layer["type"], {"type": layer["type"], "ms": 0.0, "layers": 0, "kernels": set()})
        row["ms"] += layer["ms"]
        row["layers"] += 1
        row["kernels"].add(layer["kernel"])
    rows = sorted(totals.values(), key=lambda r: -r["ms"])
    return [r | {"ms": round(r["ms"], 4), "kernels": sorted(r["kernels"])} for r in rows]


def per_layer_rates(profiles: dict, macs: dict[str, int], batch: int) -> list[dict]:
    """Each Conv/Gemm's time in every runtime and its rate in GOP/s (2 x multiply-accumulates per second)."""
    rows = []
    for node, per_image in macs.items():
        row = {"layer": node, "mmac_per_image": round(per_image / 1e6, 3)}
        for name, profile in profiles.items():
            times = [layer["ms"] for layer in profile["layers"] if LAYER_SUFFIXES.sub("", layer["layer"]) == node]
            if times:
                row[name] = {"ms": round(sum(times), 4), "gops": round(2 * per_image * batch / sum(times) / 1e6, 1)}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, nargs=2, default=[300, 30], metavar=("BS1", "BS64"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import onnxruntime
    import openvino as ov

    ctx = RunContext(args.run, open_run(args.run), quiet=True)
    ort_settings = targets.load("x86-cpu").onnxruntime
    ov_settings = targets.load("x86-openvino").openvino
    work = Path(tempfile.mkdtemp(prefix="kernel-profile-"))
    student_fp32 = args.run / "quantize" / "student.fp32.onnx"
    artifact = args.run / "quantize" / "student.int8.onnx"
    nncf_ir = nncf_int8(student_fp32, work / "student.nncf.xml", calibration_images(ctx))
    artifact_ir = openvino_ir(artifact, work / "artifact.xml")
    x_all = ctx.data.x_eval[:64].float().div(255).numpy()
    macs = macs_per_layer(student_fp32)
    result = {"run": str(args.run), "threads": args.threads, "calls": dict(zip(("bs1", "bs64"), args.calls)),
              # ONNX Runtime's own u8 x s8 GEMM rate (MatMulInteger 1024^3): the ceiling of its int8 convolutions
              "onnxruntime_u8s8_gemm_peak_gops": round(kernel_peak("u8s8", args.threads), 1),
              "student_mmac_per_image": round(sum(macs.values()) / 1e6, 3),
              "runtimes": {"onnxruntime": onnxruntime.__version__, "openvino": ov.__version__}, "profiles": {},
              "date": time.strftime("%Y-%m-%d"), **provenance()}
    for batch, calls in zip(BATCHES, args.calls):
        x = np.ascontiguousarray(x_all[:batch])
        key = f"bs{batch}"
        profiles = {"artifact, ONNX Runtime int8": ort_profile(artifact, x, calls, args.threads, ort_settings, work),
                    "NNCF int8, OpenVINO": ov_profile(nncf_ir, x, calls, args.threads, ov_settings),
                    "artifact as IR, OpenVINO": ov_profile(artifact_ir, x, calls, args.threads, ov_settings)}
        for name, profile in profiles.items():
            profile["by_type"] = by_type(profile)
            profile["kernel_sum_ms"] = round(sum(layer["ms"] for layer in profile["layers"]), 4)
            profile["wall_ms"] = round(profile["wall_ms"], 4)
            print(f"[kernels] {key} {name}: wall {profile['wall_ms']:.3f} ms, kernels {profile['kernel_sum_ms']:.3f} ms",
                  flush=True)
        result["profiles"][key] = profiles
        result.setdefault("layers", {})[key] = per_layer_rates(profiles, macs, batch)
    save_results(args.out, "kernel_profile", result, markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Kernel profile: the int8 student in ONNX Runtime and OpenVINO ({result['threads']} thread)", "",
             f"onnxruntime {result['runtimes']['onnxruntime']}, openvino {result['runtimes']['openvino']}; "
             f"{result['host']['cpu']}, {result['date']}. Median per-layer time over {result['calls']['bs1']} calls "
             f"(batch 1) and {result['calls']['bs64']} (batch 64); wall: median un-profiled call in the same "
             "process.", ""]
    for key, profiles in result["profiles"].items():
        lines += [f"## {key}", "", "| runtime | wall ms | sum of kernels ms | outside kernels ms |", "|---|---|---|---|"]
        for name, p in profiles.items():
            lines.append(f"| {name} | {p['wall_ms']:.3f} | {p['kernel_sum_ms']:.3f} | "
                         f"{p['wall_ms'] - p['kernel_sum_ms']:.3f} |")
        for name, p in profiles.items():
            lines += ["", f"{name}:", "", "| op type | layers | ms | share of kernels | kernels |", "|---|---|---|---|---|"]
            for row in p["by_type"]:
                share = row["ms"] / p["kernel_sum_ms"] * 100 if p["kernel_sum_ms"] else 0.0
                lines.append(f"| {row['type']} | {row['layers']} | {row['ms']:.4f} | {share:.1f}% | "
                             f"{', '.join(row['kernels'])} |")
        names = list(profiles)
        lines += ["", f"Per layer at {key} (ms, GOP/s = 2 x MACs / time):", "",
                  "| layer | MMAC/image | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in result["layers"][key]:
            cells = [f"{row[n]['ms']:.4f} ms, {row[n]['gops']:.0f}" if n in row else "-" for n in names]
            lines.append(f"| {row['layer']} | {row['mmac_per_image']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"ONNX Runtime's u8 x s8 GEMM peak on this host, same threads: "
              f"{result['onnxruntime_u8s8_gemm_peak_gops']} GOP/s (MatMulInteger, 1024^3); the student has "
              f"{result['student_mmac_per_image']} MMAC per image.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
