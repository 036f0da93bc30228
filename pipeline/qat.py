"""Quantization-aware fine-tuning with the teacher's KD loss active.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
arXiv:1712.05877 (2018): the forward pass rounds what int8 will round, q(x) = s * (clamp(round(x / s) + z,
qmin, qmax) - z), and the backward pass treats the rounding as identity inside the clamp range (straight-through
estimator), so the weights learn to sit where int8 loses little. What is simulated matches the deployed QDQ
model: BatchNorm folded into the preceding conv (as the ONNX export folds it), int8 symmetric per-output-channel
weights rounded as ONNX Runtime rounds them (scale max|w| / 127, levels -127..127), and per-tensor activations at
the input of every conv / linear (uint8 asymmetric, or int8 symmetric for schemes with symmetric activations).
Those activation quantizers start from the ranges the chosen PTQ calibration found (the caller passes them) and
their step sizes are then trained (LSQ); the quantize stage exports the QDQ model with exactly the trained scales
and zero points (`input_quant_params`), so the int8 model runs the quantization the network was trained for.
The loss is Hinton et al.'s KD (distill.methods.kd_loss) plus cross-entropy, with the distill stage's T and alpha.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import data as datasets
from .distill.methods import kd_loss


class Unsupported(Exception):
    """The student cannot be prepared for QAT (e.g. torch.fx cannot trace it); the caller records why."""


class ActivationFakeQuant(nn.Module):
    """Per-tensor fake quantization of an activation with a learned step size (LSQ, Esser et al., "Learned Step
    Size Quantization", arXiv:1902.08153: d q / d s flows through rounding and clipping, so training can trade
    clipping an outlier channel for resolution in the others). The step is learned as log(s): Adam's updates are
    then relative, so a tensor whose range is 100x another's (an outlier channel) moves its step as readily."""

    def __init__(self, signed: bool):
        super().__init__()
        self.signed = signed
        self.qmin, self.qmax = (-128, 127) if signed else (0, 255)
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def set_range(self, low: float, high: float) -> None:
        """Scale and zero point for the real range [low, high] as ONNX Runtime computes them (compute_scale_zp):
        the range widened to hold 0; uint8: s = (high - low) / 255, z = round(-low / s); int8 symmetric:
        s = max(|low|, |high|) / 127, z = 0."""
        low, high = min(low, 0.0), max(high, 0.0)
        if self.signed:
            scale, zero = max(-low, high) / 127, 0.0
        else:
            scale = (high - low) / 255
            zero = float(round(-low / scale)) if scale > 0 else 0.0
        with torch.no_grad():
            self.log_scale.fill_(torch.log(torch.tensor(max(scale, 1e-8))))
            self.zero_point.fill_(zero)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # grad_factor 1: under Adam, LSQ's gradient scaling 1 / sqrt(numel * qmax) cancels out
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale.reshape(1), self.zero_point.reshape(1), self.qmin, self.qmax, 1.0)

    def params(self) -> tuple[float, int]:
        """(scale, zero point): what the exported QuantizeLinear of this tensor must use."""
        return float(self.scale.detach()), int(self.zero_point)


class FakeQuantLayer(nn.Module):
    """A conv or linear whose input and weight are fake-quantized (weights: int8 symmetric per output channel)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, signed_activations: bool):
        super().__init__()
        self.layer = layer
        self.input_quant = ActivationFakeQuant(signed_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        # ORT's symmetric int8 weights: scale = max|w| / 127 per output channel, levels -127..127
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / 127
        zero = torch.zeros(len(scale), dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)
        x = self.input_quant(x)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, wq, self.layer.bias)
        return self.layer._conv_forward(x, wq, self.layer.bias)


def _plain_batchnorms(model: nn.Module) -> nn.Module:
    """`model` with timm's BatchNormAct2d (a BatchNorm2d subclass running its activation inside) split into
    BatchNorm2d, dropout and activation: torch.fx's fuse folds only an exact BatchNorm2d into its conv, and the
    ONNX export folds every one, so QAT must simulate the same folded convs."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d and hasattr(module, "act"):
            plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
            plain.load_state_dict(module.state_dict(), strict=False)
            model.set_submodule(name, nn.Sequential(plain, getattr(module, "drop", nn.Identity()), module.act))
    return model.eval()


def prepare(model: nn.Module, signed_activations: bool) -> nn.Module:
    """A copy of `model` with BatchNorm folded into its convs and every Conv2d / Linear fake-quantized."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(_plain_batchnorms(copy.deepcopy(model).eval()))
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise Unsupported(f"torch.fx cannot trace the student to fold BatchNorm: {str(exc).splitlines()[0][:160]}")
    names = [n for n, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise Unsupported("the student has no Conv2d or Linear layer to fake-quantize")
    # layers reading the same tensor (a block's conv and its shortcut) share one quantizer, as the int8 model
    # quantizes that tensor once
    sources = {node.target: node.args[0] for node in folded.graph.nodes if node.op == "call_module"}
    quantizers: dict = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        layer = FakeQuantLayer(getattr(parent, child), signed_activations)
        source = sources.get(name, name)
        layer.input_quant = quantizers.setdefault(source, layer.input_quant)
        setattr(parent, child, layer)
    return folded


def layers(prepared: nn.Module) -> dict[str, FakeQuantLayer]:
    return {name: m for name, m in prepared.named_modules() if isinstance(m, FakeQuantLayer)}


def float_copy(prepared: nn.Module) -> nn.Module:
    """The float model (BatchNorm folded) the prepared one simulates: each FakeQuantLayer replaced by its layer."""
    model = copy.deepcopy(prepared)
    for name, module in layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.layer)
    return model.eval()


def set_input_ranges(prepared: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    """Start each layer's input quantizer from a calibrated real range {layer name: (low, high)}."""
    for name, layer in layers(prepared).items():
        layer.input_quant.set_range(*ranges[name])


def freeze_input_quant(prepared: nn.Module, layer: str, scale: float, zero_point: int) -> None:
    """Fix one layer's input quantization to what the int8 model will use regardless (not trained)."""
    quant = layers(prepared)[layer].input_quant
    with torch.no_grad():
        quant.log_scale.fill_(torch.log(torch.tensor(scale)))
        quant.zero_point.fill_(float(zero_point))
    quant.log_scale.requires_grad_(False)


def input_quant_params(prepared: nn.Module) -> dict[str, tuple[float, int]]:
    """{layer name: (scale, zero point)} of each layer's input quantizer, as trained."""
    return {name: layer.input_quant.params() for name, layer in layers(prepared).items()}


def steps_per_epoch(images: int, available: int, batch: int = 128) -> int:
    return max(1, min(images, available) // batch)


def finetune(prepared: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, teacher_logits: torch.Tensor,
             epochs: int, images: int, lr: float, scale_lr: float, temperature: float, alpha: float, seed: int,
             batch: int = 128, on_step=None, pool: torch.Tensor | None = None) -> nn.Module:
    """Fine-tune `prepared` (see `prepare`; taking [0, 1] pixels) in place for `epochs` passes over `images`
    training images drawn with `seed` from the indices `pool` (default all); loss (1 - alpha) CE + alpha T^2 KL
    (Hinton). Adam, not SGD: a network with one channel scaled up and the next layer's matching weights scaled
    down (the same function) has gradients 100x apart, and SGD diverged on it at every learning rate that moved
    the rest. The log step sizes have their own learning rate `scale_lr`. Cosine schedule. Returns `prepared`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(y_train)) if pool is None else pool
    subset = pool[torch.randperm(len(pool), generator=generator)[:images]]
    per_epoch = steps_per_epoch(images, len(pool), batch)
    trainable = [(n, p) for n, p in prepared.named_parameters() if p.requires_grad]
    scales = [p for n, p in trainable if n.endswith("log_scale")]
    others = [p for n, p in trainable if not n.endswith("log_scale")]
    opt = torch.optim.Adam([{"params": others, "lr": lr}, {"params": scales, "lr": scale_lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    prepared.train()
    teacher_logits = teacher_logits.detach().clone()
    for _ in range(epochs):
        order = subset[torch.randperm(len(subset), generator=generator)]
        for step in range(per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            logits = prepared(datasets.to_float(x_train[idx]))
            loss = ((1 - alpha) * F.cross_entropy(logits, y_train[idx])
                    + alpha * kd_loss(logits, teacher_logits[idx], temperature))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step:
                on_step()
    return prepared.eval()
