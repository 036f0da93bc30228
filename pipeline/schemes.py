"""Quantization schemes, one function per kind of target; the target profile's runtime and precision pick one.

A scheme says how ONNX Runtime's quantize_static is to be called (types, symmetry, per-channel weights, bias
handling) or, for fp16 / fp32 targets, that no int8 quantization happens at all.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from .errors import BadInput


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
    rationale: str = ""

    def extra_options(self) -> dict:
        """quantize_static's extra_options for this scheme."""
        return {"WeightSymmetric": True, "ActivationSymmetric": self.activation_symmetric,
                "QuantizeBias": self.quantize_bias, "QDQKeepRemovableActivations": self.keep_relu,
                "OpTypesToExcludeOutputQuantization": list(self.float_outputs)}

    def to_dict(self) -> dict:
        return asdict(self)


def x86_cpu(target) -> Scheme:
    """ONNX Runtime on x86: QDQ, uint8 activations (asymmetric), int8 per-channel weights."""
    return Scheme(
        "onnxruntime-x86-qdq", "int8", target.activation_type, target.weight_type, target.per_channel,
        activation_symmetric=target.activation_type == "int8",
        rationale="uint8 activations x int8 weights use ORT's u8s8 (VNNI) kernels on x86; int8 activations "
                  "(s8s8) measured slower on x86, see benchmarks/results/quantization.md")


def tensorrt(target) -> Scheme:
    """TensorRT explicit quantization: int8 symmetric activations (zero point 0), int8 per-channel weights on
    the output-channel axis, float bias, Q/DQ on the inputs of weighted ops and of residual Adds but not on
    the outputs of weighted ops, with Relu kept, so TensorRT fuses Conv+Relu+Add (its placement
    recommendations). The profile's activation_type/weight_type do not apply: TensorRT accepts only this."""
    return Scheme("tensorrt-explicit-qdq", "int8", "int8", "int8", True, activation_symmetric=True,
                  quantize_bias=False, keep_relu=True, float_outputs=("Conv", "ConvTranspose", "Gemm", "MatMul"),
                  rationale="TensorRT's explicit quantization is symmetric int8 with per-channel weights; "
                            "checked by edgecompress.qdq_check.check_tensorrt_qdq")


def mobile_arm(target) -> Scheme:
    """ONNX Runtime mobile on ARM64: QDQ with the profile's activation type (uint8 asymmetric or int8
    symmetric, both run by ORT's ARM kernels) and int8 per-channel weights."""
    return Scheme("onnxruntime-mobile-qdq", "int8", target.activation_type, target.weight_type, target.per_channel,
                  activation_symmetric=target.activation_type == "int8",
                  rationale="QDQ operators that the ORT mobile (ORT format) build runs on ARM64")


def float16(target) -> Scheme:
    """fp16 weights and compute for GPU targets that ask for it; inputs and outputs stay fp32."""
    return Scheme("fp16", "fp16", rationale="fp16 conversion, inputs and outputs kept fp32")


def float32(target) -> Scheme:
    """No quantization: the fp32 student is the artifact."""
    return Scheme("fp32", "fp32", rationale="the target asks for fp32")


INT8_SCHEMES: dict[str, Callable[..., Scheme]] = {"onnxruntime": x86_cpu, "tensorrt": tensorrt,
                                                   "onnxruntime-mobile": mobile_arm}


def for_target(target) -> Scheme:
    """The scheme for a target profile: by precision first, then (for int8) by runtime."""
    if target.precision == "fp16":
        return float16(target)
    if target.precision == "fp32":
        return float32(target)
    if target.runtime not in INT8_SCHEMES:
        raise BadInput(f"target {target.name}: no int8 scheme for runtime {target.runtime!r} "
                       f"(known: {', '.join(INT8_SCHEMES)}); set precision = \"fp32\" or \"fp16\"")
    return INT8_SCHEMES[target.runtime](target)
