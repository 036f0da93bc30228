"""Quantization-aware fine-tuning with the teacher's KD loss active.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
arXiv:1712.05877 (2018): the forward pass rounds what int8 will round, q(x) = s * (clamp(round(x / s) + z,
qmin, qmax) - z), and the backward pass treats the rounding as identity inside the clamp range (straight-through
estimator), so the weights learn to sit where int8 loses little. What is simulated matches the deployed QDQ
model: BatchNorm folded into the preceding conv (as the ONNX export folds it), int8 symmetric per-output-channel
weights, and per-tensor activations at the input of every conv / linear (uint8 asymmetric, or int8 symmetric
for schemes with symmetric activations), with moving-average min/max ranges started from the calibration set.
The loss is Hinton et al.'s KD (distillers.kd_loss) plus cross-entropy, with the distill stage's T and alpha.
The result is a float model again (fake quantization removed); the quantize stage turns it into QDQ ONNX with
the target's scheme, so every rule the scheme and the TensorRT checker enforce applies to it unchanged.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import data as datasets
from .distillers import kd_loss


class Unsupported(Exception):
    """The student cannot be prepared for QAT (e.g. torch.fx cannot trace it); the caller records why."""


class ActivationFakeQuant(nn.Module):
    """Per-tensor fake quantization of an activation. While `observing`, it records the running min/max (the
    calibration pass); `learn()` then turns the step size into a trained parameter (LSQ, Esser et al.,
    "Learned Step Size Quantization", arXiv:1902.08153: d q / d s flows through rounding and clipping, scaled by
    1 / sqrt(numel * qmax)), so training can trade clipping an outlier channel for resolution in the others."""

    def __init__(self, signed: bool):
        super().__init__()
        self.signed = signed
        self.qmin, self.qmax = (-128, 127) if signed else (0, 255)
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.observing = True

    def learn(self) -> None:
        """Freeze the observed range into a scale and zero point; the scale trains from here on."""
        low, high = torch.minimum(self.low, torch.tensor(0.0)), torch.maximum(self.high, torch.tensor(0.0))
        with torch.no_grad():
            if self.signed:  # symmetric int8, zero point 0 (ORT's ActivationSymmetric)
                self.scale.copy_((torch.maximum(high, -low) / 127.5).clamp_min(1e-8))
            else:  # asymmetric uint8
                self.scale.copy_(((high - low) / 255).clamp_min(1e-8))
                self.zero_point.copy_(torch.clamp(torch.round(-low / self.scale), 0, 255))
        self.scale.requires_grad_(True)
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.low.copy_(torch.minimum(self.low, x.detach().min()))
            self.high.copy_(torch.maximum(self.high, x.detach().max()))
            return x
        grad_factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale.reshape(1).clamp(min=1e-8), self.zero_point.reshape(1), self.qmin, self.qmax, grad_factor)

    def range(self) -> tuple[float, float]:
        """The real range this quantizer represents: what ORT's calibration should use for this tensor."""
        return (float((self.qmin - self.zero_point) * self.scale), float((self.qmax - self.zero_point) * self.scale))


class FakeQuantLayer(nn.Module):
    """A conv or linear whose input and weight are fake-quantized (weights: int8 symmetric per output channel)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, signed_activations: bool):
        super().__init__()
        self.layer = layer
        self.input_quant = ActivationFakeQuant(signed_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / 127.5
        zero = torch.zeros(len(scale), dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
        x = self.input_quant(x)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, wq, self.layer.bias)
        return self.layer._conv_forward(x, wq, self.layer.bias)


def prepare(model: nn.Module, signed_activations: bool) -> nn.Module:
    """A copy of `model` with BatchNorm folded into its convs and every Conv2d / Linear fake-quantized."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise Unsupported(f"torch.fx cannot trace the student to fold BatchNorm: {str(exc).splitlines()[0][:160]}")
    names = [n for n, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise Unsupported("the student has no Conv2d or Linear layer to fake-quantize")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, child, FakeQuantLayer(getattr(parent, child), signed_activations))
    return folded


def strip(model: nn.Module) -> nn.Module:
    """The float model back: each FakeQuantLayer replaced by its (trained) layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.layer)
    return model.eval()


def steps_per_epoch(images: int, available: int, batch: int = 128) -> int:
    return max(1, min(images, available) // batch)


def finetune(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, teacher_logits: torch.Tensor,
             calibration: torch.Tensor, signed_activations: bool, epochs: int, images: int, lr: float,
             temperature: float, alpha: float, seed: int, batch: int = 128, on_step=None) -> nn.Module:
    """Fine-tune a copy of `model` (taking [0, 1] pixels) under fake quantization for `epochs` passes over
    `images` training images drawn with `seed`; loss (1 - alpha) CE + alpha T^2 KL (Hinton). Adam, not SGD: a
    network with one channel scaled up and the next layer's matching weights scaled down (the same function) has
    gradients 100x apart, and SGD diverged on it at every learning rate that moved the rest. Returns the float
    model (BatchNorm folded) for ordinary int8 quantization."""
    torch.manual_seed(seed)
    student = prepare(model, signed_activations)
    with torch.no_grad():  # ranges start from the calibration images' min/max, as ORT's MinMax calibration
        for i in range(0, len(calibration), batch):
            student(datasets.to_float(calibration[i:i + batch]))
    for module in student.modules():
        if isinstance(module, ActivationFakeQuant):
            module.learn()
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(y_train), generator=generator)[:images]
    steps = epochs * steps_per_epoch(images, len(y_train), batch)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    student.train()
    teacher_logits = teacher_logits.detach().clone()
    for _ in range(epochs):
        order = subset[torch.randperm(len(subset), generator=generator)]
        for step in range(steps_per_epoch(images, len(y_train), batch)):
            idx = order[step * batch:(step + 1) * batch]
            logits = student(datasets.to_float(x_train[idx]))
            loss = ((1 - alpha) * F.cross_entropy(logits, y_train[idx])
                    + alpha * kd_loss(logits, teacher_logits[idx], temperature))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step:
                on_step()
    return strip(student)
