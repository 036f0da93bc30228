"""Student design screen: how the int8 artifact's speed-up over the same student in fp32 depends on the design.

    python benchmarks/student_designs.py [--rounds 6] [--designs zoo:resnet_fast_100,E_s48-128-256,...]
                                         [--compress resnet_fast_tapered,resnet_fast_100]

For each design (untrained: latency does not depend on the weights): export to ONNX, quantize with the x86-cpu
scheme on 256 real training images, then time the fp32 model and the int8 artifact in ONNX Runtime (1 thread,
the target's settings) in alternating fresh sessions at batch 1 and 64 (perf.interleaved), and time one
bf16-autocast training step of 128 images in PyTorch (the distill stage's setting on this CPU) as the training
cost. With --compress, each named zoo student also goes through a first `edgecompress compress` with every other
setting the default (a fresh run directory, one after another, nothing else running): top-1 of the teacher, the
fp32 student and the int8 artifact on the 10,000 test images, speed-up over the teacher, size ratio and the wall
time. Prints a table and writes student_designs.json and .md under --out.

The designs besides the zoo's are what was tried for the int8-vs-fp32 ratio of issue #8: ResNet-8 variants
with a stride-2 stem, named stem width, then the stage widths (each stage one BasicBlock, stride 2 unless the
name ends in "s1"), and plain conv stacks without residual adds (VGG-style, "P" then the widths; 3x3 conv, BN,
ReLU each). None is in the zoo: none beat the default on accuracy, speed and training time together.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf import interleaved, provenance, run_e2e, save_results  # noqa: E402
from readme import compress_table  # noqa: E402

from edgecompress.kernels import macs_per_image  # noqa: E402

from edgecompress import config as cfg  # noqa: E402
from edgecompress import data as datasets  # noqa: E402
from edgecompress import backends, quantize, targets  # noqa: E402
from edgecompress.models import Normalized, count_params, create  # noqa: E402
from edgecompress.models.resnet import ResNet  # noqa: E402
from edgecompress.progress import NoBar  # noqa: E402
from edgecompress.backends.onnxruntime import OrtRunner  # noqa: E402

# name: (stem width, stage widths, stage strides)
VARIANTS = {
    "E_s48-128-256": (48, (128, 256), (2, 2)),
    "F_s32-128-256": (32, (128, 256), (2, 2)),
    "G_s48-96-192-256s1": (48, (96, 192, 256), (2, 2, 1)),
    "M_s32-128-320": (32, (128, 320), (2, 2)),
}
# name: (width, stride) of each conv; the first is the stem
PLAIN_VARIANTS = {
    "P6_32-64-64-128-128-256": ((32, 2), (64, 1), (64, 1), (128, 2), (128, 1), (256, 2)),
    "P7_32-64-64-128-128-256-256": ((32, 2), (64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)),
}
DESIGNS = (*VARIANTS, *PLAIN_VARIANTS)
DEFAULT_DESIGNS = ("zoo:resnet_fast_tapered", "zoo:resnet_fast_100", "zoo:resnet_fast_133", "zoo:resnet_slim_150",
                   *DESIGNS)


class PlainNet(nn.Module):
    """Conv-BN-ReLU layers, global average pool, linear: no residual adds, so no QLinearAdd in the int8 graph."""

    def __init__(self, channels: int, classes: int, plan: tuple[tuple[int, int], ...]):
        super().__init__()
        layers, cin = [], channels
        for width, stride in plan:
            layers += [nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


def build(design: str, channels: int, classes: int) -> nn.Module:
    if design.startswith("zoo:"):
        return create(design[4:], channels, classes)
    if design in PLAIN_VARIANTS:
        return PlainNet(channels, classes, PLAIN_VARIANTS[design])
    stem, widths, strides = VARIANTS[design]
    net = ResNet(channels, classes, (stem, *widths), (0, *(1,) * len(widths)), (1, *strides))
    net.stem[0] = nn.Conv2d(channels, stem, 3, 2, 1, bias=False)
    return net


def train_step_ms(net: nn.Module, shape: tuple[int, ...], classes: int, steps: int = 10) -> float:
    """Median ms of one SGD step on a batch of 128, bf16 autocast where the CPU has it (as distill runs)."""
    net = net.train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(128, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (128,))
    times = []
    for step in range(steps + 3):
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_has_bf16()):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - began)
    return float(np.median(times)) * 1e3


def screen(design: str, ds: datasets.Dataset, target, work: Path, rounds: int) -> dict:
    mean, std = datasets.channel_stats(ds.x_train)
    torch.manual_seed(0)
    net = build(design, ds.input_shape[0], ds.num_classes)
    step = train_step_ms(net, tuple(ds.input_shape), ds.num_classes)
    spec = {"input_shape": list(ds.input_shape), "mean": mean, "std": std, "classes": list(ds.classes)}
    name = design.replace(":", "_")
    fp32, int8 = work / f"{name}.fp32.onnx", work / f"{name}.int8.onnx"
    quantize.export_onnx(Normalized(net, mean, std).eval(), spec, target.opset, fp32)
    calibration = ds.x_train[datasets.stratified_sample(ds.y_train, 256, 0)]
    quantize.quantize_qdq(fp32, int8, calibration, "minmax", backends.scheme_for(target))
    row = {"design": design, "params": count_params(net), "mmac": round(macs_per_image(fp32) / 1e6, 2),
           "train_step_ms": round(step, 1)}
    for batch in (1, 64):
        make = {kind: functools.partial(OrtRunner, path, 1, f"onnxruntime-{kind}", target.execution_providers,
                                        target.onnxruntime) for kind, path in (("fp32", fp32), ("int8", int8))}
        timed = interleaved(make["fp32"], make["int8"], ds.x_eval, batch, lambda length: NoBar(None), rounds)
        row[f"bs{batch}"] = {"fp32_ms": timed["slow_ms"], "int8_ms": timed["fast_ms"], "ratio": timed["ratio"],
                             "session_medians_ms": timed["session_medians_ms"]}
    return row


def markdown(result: dict) -> str:
    lines = [f"# Student design screen ({result['host'].get('cpu')}, {result['rounds']} alternating sessions each)", "",
             "| design | params | MMAC/image | train step ms (bs128) | fp32 bs1 ms | int8 bs1 ms | ratio bs1 "
             "| fp32 bs64 ms | int8 bs64 ms | ratio bs64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['design']} | {r['params']:,} | {r['mmac']} | {r['train_step_ms']} | "
                     f"{r['bs1']['fp32_ms']:.4f} | {r['bs1']['int8_ms']:.4f} | {r['bs1']['ratio']:.2f}x | "
                     f"{r['bs64']['fp32_ms']:.3f} | {r['bs64']['int8_ms']:.3f} | {r['bs64']['ratio']:.2f}x |")
    if result.get("compress"):
        lines += ["", "## Through `edgecompress compress` (default settings, first run)", "",
                  *compress_table(result["compress"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--designs", default=",".join(DEFAULT_DESIGNS),
                        help=f"comma-separated: zoo:NAME or one of {', '.join(DESIGNS)}")
    parser.add_argument("--rounds", type=int, default=6, help="alternating fp32/int8 sessions per batch size")
    parser.add_argument("--compress", default="", help="comma-separated zoo students run through compress")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    designs = [d for d in args.designs.split(",") if d]
    unknown = [d for d in designs if not d.startswith("zoo:") and d not in DESIGNS]
    if unknown:
        parser.error(f"unknown designs {unknown}: give zoo:NAME or one of {', '.join(DESIGNS)}")
    ds, target = datasets.load("fashion-mnist", seed=0), targets.load("x86-cpu")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for design in designs:
            rows.append(screen(design, ds, target, Path(work), args.rounds))
            r = rows[-1]
            print(f"{design}: {r['params']:,} params, {r['mmac']} MMAC, step {r['train_step_ms']} ms, "
                  f"int8 vs fp32 {r['bs1']['ratio']:.2f}x bs1 ({r['bs1']['int8_ms']:.4f} ms), "
                  f"{r['bs64']['ratio']:.2f}x bs64", flush=True)
    compressed = []
    with tempfile.TemporaryDirectory() as work:
        for student in [s for s in args.compress.split(",") if s]:
            compressed.append(run_e2e(Path(work) / student, "--student", student))
            print(f"compress --student {student}: {compressed[-1]['top1']}, {compressed[-1]['wall_s']} s", flush=True)
    result = provenance() | {"rounds": args.rounds, "rows": rows, "compress": compressed}
    save_results(args.out, "student_designs", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
