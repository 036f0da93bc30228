"""Quantization schemes: how ONNX Runtime's quantize_static is to be called (types, symmetry, per-channel weights,
bias handling) or, for fp16 / fp32 targets, that no int8 quantization happens at all.

Each backend gives its int8 scheme (backends/*.py); `edgecompress.backends.scheme_for(target)` picks one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Scheme:
    name: str
    precision: str                     # int8 | fp16 | fp32: what the quantize stage's artifact holds
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    activation_symmetric: bool = False
    quantize_bias: bool = True         # int32 bias through DequantizeLinear (ORT's default); TensorRT wants float
    keep_relu: bool = False            # keep Relu nodes between Q/DQ (ORT drops them when activations are uint8)
    float_outputs: tuple[str, ...] = ()  # op types whose outputs are not quantized (the consumer's input is)
    graph_edit: str = ""               # a backend's edit of the quantized graph (backends.QDQ_EDITS), "" for none
    rationale: str = ""

    def extra_options(self) -> dict:
        """quantize_static's extra_options for this scheme."""
        return {"WeightSymmetric": True, "ActivationSymmetric": self.activation_symmetric,
                "QuantizeBias": self.quantize_bias, "QDQKeepRemovableActivations": self.keep_relu,
                "OpTypesToExcludeOutputQuantization": list(self.float_outputs)}

    def to_dict(self) -> dict:
        return asdict(self)


def from_profile(target, name: str, rationale: str) -> Scheme:
    """The int8 QDQ a CPU target's profile asks for: its activation type (uint8 asymmetric, or int8 symmetric), its
    weight type and per-channel choice; the scheme of every CPU backend (ONNX Runtime x86 and mobile, OpenVINO)."""
    return Scheme(name, "int8", target.activation_type, target.weight_type, target.per_channel,
                  activation_symmetric=target.activation_type == "int8", rationale=rationale)


def float16(target) -> Scheme:
    """fp16 weights and compute for GPU targets that ask for it; inputs and outputs stay fp32."""
    return Scheme("fp16", "fp16", rationale="fp16 conversion, inputs and outputs kept fp32")


def float32(target) -> Scheme:
    """No quantization: the fp32 student is the artifact."""
    return Scheme("fp32", "fp32", rationale="the target asks for fp32")
