"""Accuracy-aware fallback: rank the quantized nodes by how much int8 hurts at each, then keep the worst in
float one by one until the accuracy budget holds.

Sensitivity of a node = how much closer the int8 model's logits come to the fp32 model's when that node alone
stays in float (per-node exclusion, the "layer-wise sensitivity analysis" of Wu et al. 2020, "Integer
Quantization for Deep Learning Inference", arXiv:2004.09602, section 5.2). The error is measured as the logits'
signal-to-quantization-noise ratio, SQNR = 10 log10(sum f^2 / sum (q - f)^2), over probe images that are neither
calibration, selection nor eval images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import data as datasets
from .backends.onnxruntime import OrtRunner
from .runners import predict


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (approx - ref)^2); +inf when they are identical."""
    noise = float(np.sum((approx.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def median_latency_ms(path: Path, threads: int, providers: tuple[str, ...], image: np.ndarray,
                      seconds: float = 0.5, settings=None) -> float:
    """Batch-1 median milliseconds of a quick timing (after 20 warm-up calls): a guide for comparing tries in
    one run, not a verified figure (the verify stage measures those)."""
    runner = OrtRunner(path, threads, "onnxruntime", providers, settings)
    for _ in range(20):
        runner(image)
    times, started = [], time.perf_counter()
    while len(times) < 50 or time.perf_counter() - started < seconds:
        began = time.perf_counter()
        runner(image)
        times.append((time.perf_counter() - began) * 1e3)
    return float(np.median(times))


@dataclass
class Judge:
    """Scores a candidate model: top-1 on the selection images (the budget's split: training images outside
    calibration and probe; the eval split only reports, so choosing among tries cannot tune on it), logit SQNR
    on probe images, quick latency."""

    fp32_path: Path
    x_select: torch.Tensor
    y_select: torch.Tensor
    x_probe: torch.Tensor
    threads: int
    providers: tuple[str, ...]
    ort_settings: object = None  # the target's [onnxruntime] settings (targets.OnnxRuntimeOptions)
    fp32_probe: np.ndarray = field(init=False)

    def __post_init__(self):
        self.fp32_probe = self.logits(self.fp32_path, self.x_probe)
        self.image = datasets.to_float(self.x_select[:1]).numpy()

    @staticmethod
    def logits(path: Path, x: torch.Tensor) -> np.ndarray:
        return predict(OrtRunner(path, 2, "onnxruntime"), x, 500)

    def probe_sqnr(self, path: Path) -> float:
        return sqnr_db(self.fp32_probe, self.logits(path, self.x_probe))

    def correct(self, path: Path) -> np.ndarray:
        """Per selection image: whether the model's top-1 is right (the budget's paired comparison needs these)."""
        return self.logits(path, self.x_select).argmax(1) == self.y_select.numpy()

    def top1(self, path: Path) -> float:
        return float(self.correct(path).mean())

    def latency(self, path: Path) -> float:
        return median_latency_ms(path, self.threads, self.providers, self.image, settings=self.ort_settings)


def rank_nodes(quantize: Callable[[Path, list[str]], None], candidates: dict[str, list[str]], judge: Judge,
               workdir: Path, on_each: Callable[[], None] | None = None) -> list[dict]:
    """Each candidate kept in float alone (with the nodes `candidates` groups with it), worst first:
    [{"node", "excluded", "probe_sqnr_db"}], where a higher SQNR means that node's int8 did more harm."""
    ranked = []
    for node, group in candidates.items():
        path = workdir / "probe.onnx"
        quantize(path, group)
        ranked.append({"node": node, "excluded": group, "probe_sqnr_db": round(judge.probe_sqnr(path), 3)})
        if on_each:
            on_each()
    return sorted(ranked, key=lambda r: -r["probe_sqnr_db"])


def plant_outlier_channel(bn: nn.BatchNorm2d, next_conv: nn.Conv2d, channel: int = 0, factor: float = 100.0) -> None:
    """Scale one channel after `bn` by `factor` and the matching input channel of `next_conv` by 1/`factor`.

    Between them sits a ReLU (positively homogeneous), so the network computes the same function, but that
    activation tensor now has one channel `factor` times larger than the rest: per-tensor int8 spends its 256
    levels on that channel and flattens the others. A hard case for testing and benchmarking the fallback.
    """
    with torch.no_grad():
        bn.weight[channel] *= factor
        bn.bias[channel] *= factor
        if next_conv.groups == next_conv.in_channels > 1:  # depthwise: output channel c reads input channel c
            next_conv.weight[channel] /= factor
        else:
            next_conv.weight[:, channel] /= factor
