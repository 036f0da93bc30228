"""TensorRT's explicit-quantization rules (TensorRT developer guide, "Explicit Quantization" and "Q/DQ
Layer-Placement Recommendations"): the check of a QDQ ONNX file, and the one placement edit the quantizer needs.

TensorRT builds an explicitly quantized engine from the Q/DQ nodes it finds and honours them exactly, so a file
that breaks a rule either fails to build or builds with the int8 layers running in float. The rules checked:

1. Q/DQ carry int8 with zero point 0: TensorRT's quantization is symmetric; uint8 and non-zero zero points are
   rejected by its ONNX parser.
2. Activations are quantized per tensor: one scale for the whole tensor.
3. Weights of Conv / Gemm / MatMul are int8, per output channel (axis 0 for Conv and for Gemm with transB=1,
   the last axis for MatMul and Gemm with transB=0), one scale per channel, zero points 0.
4. No int32 bias through DequantizeLinear: TensorRT dequantizes int8/fp8/int4 only; bias stays float.
5. Placement for fusion: a weighted op (Conv, ConvTranspose, Gemm, MatMul) has both its input and its weight
   coming through DequantizeLinear, or neither (kept in float on purpose); at least one is quantized; and every
   DequantizeLinear on an activation is fed by a QuantizeLinear with the same scale and zero point (a Q->DQ
   pair TensorRT folds into the op that follows).
6. Residual Adds: a convolution's output goes into the Add unquantized and the Add's other input (the residual)
   through Q/DQ, so TensorRT fuses Conv+Add(+Relu) into one int8 kernel; a Q/DQ pair between the convolution and
   the Add separates them ("Q/DQ Layer-Placement Recommendations"). ONNX Runtime's quantizer puts Q/DQ on every
   input of an Add, so `unquantize_fused_add_inputs` moves them as TensorRT recommends.
Not violations: a Q/DQ without a zero point (ONNX's default is uint8, but TensorRT's parser takes it as int8:
onnx-tensorrt's QuantDequantLinearHelper), and a MatMul of two quantized activations (attention: TensorRT runs it
with per-tensor scales on both).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _output_channel_axis(node: onnx.NodeProto, rank: int) -> int:
    """The axis of a weight that indexes output channels, where TensorRT wants per-channel scales."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0


def check_tensorrt_qdq(onnx_path: Path | str) -> list[str]:
    """Human-readable violations of TensorRT's explicit-quantization rules; empty when `onnx_path` meets them."""
    model = onnx.load(str(onnx_path))
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold scales and zero points in some exporters (torch's among them)
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return [f"{Path(onnx_path).name} has no QuantizeLinear/DequantizeLinear nodes: it is not an explicitly "
                "quantized model"]
    problems: list[str] = []

    def label(node: onnx.NodeProto) -> str:
        return f"{node.op_type} {node.name or node.output[0]!r}"

    bias_inputs = {n.input[2] for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2}

    for node in qdq:
        has_zero = len(node.input) > 2 and bool(node.input[2])
        # without a zero point TensorRT's parser assumes int8 with zero point 0 (ONNX would say uint8)
        scale, zero = consts.get(node.input[1]), consts.get(node.input[2]) if has_zero else np.zeros(1, np.int8)
        if scale is None or zero is None:
            problems.append(f"{label(node)}: scale and zero point must be constants for TensorRT")
            continue
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in consts
        if zero.dtype == np.int32 and node.output[0] in bias_inputs:
            problems.append(f"{label(node)} dequantizes an int32 bias: TensorRT dequantizes int8 only; "
                            "keep biases in float (ORT: extra_options QuantizeBias=False)")
            continue
        if zero.dtype != np.int8:
            problems.append(f"{label(node)} uses {zero.dtype} (zero point {zero.reshape(-1)[:1].tolist()}): "
                            "TensorRT needs int8 with symmetric scales")
        if np.any(zero != 0):
            problems.append(f"{label(node)} has zero point {zero.reshape(-1)[:4].tolist()}: TensorRT needs "
                            "symmetric quantization, zero point 0")
        if np.any(~np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label(node)} has a scale that is not finite and positive")
        if not is_weight and scale.size != 1:
            problems.append(f"{label(node)} quantizes an activation per channel ({scale.size} scales): TensorRT "
                            "quantizes activations per tensor")

    quantized_ops = 0
    for op in (n for n in graph.node if n.op_type in WEIGHTED_OPS):
        through_dq = [(producer.get(name) is not None and producer[name].op_type == "DequantizeLinear")
                      for name in op.input[:2]]
        if not any(through_dq):
            continue  # kept in float on purpose (accuracy fallback): TensorRT runs it in fp16/fp32
        if not all(through_dq):
            which = "input" if not through_dq[0] else "weight"
            problems.append(f"{label(op)}: its {which} {op.input[0 if which == 'input' else 1]!r} is not fed by "
                            "DequantizeLinear while its other input is, so TensorRT cannot fuse an int8 kernel "
                            "(quantize every input of a weighted op, or none)")
            continue
        quantized_ops += 1
        if op.op_type == "MatMul" and not _from_constant(op.input[1], consts, producer):
            continue  # activation x activation: per-tensor scales on both, which rule 2 checks
        problems.extend(_weight_problems(op, producer[op.input[1]], consts, producer, label))
    if quantized_ops == 0:
        problems.append("no Conv/Gemm/MatMul has quantized inputs: TensorRT would run every layer in float")
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts):
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{label(dq)} is not fed by a QuantizeLinear: TensorRT fuses Q->DQ pairs only")
            continue
        same = all(np.array_equal(consts.get(q.input[i]), consts.get(dq.input[i])) for i in (1, 2)
                   if len(q.input) > i and len(dq.input) > i)
        if not same:
            problems.append(f"{label(q)} -> {label(dq)} use different scales or zero points")
    for add, index in _fusable_add_inputs(graph):
        problems.append(f"{label(add)}: its input {add.input[index]!r} is a convolution's output passed through "
                        "Q/DQ, which blocks TensorRT's Conv+Add fusion: quantize the residual input only")
    return problems


def _from_constant(name: str, consts: dict, producer: dict) -> bool:
    """True when `name` is a constant, or DequantizeLinear / QuantizeLinear of one (a weight)."""
    node = producer.get(name)
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        name, node = node.input[0], producer.get(node.input[0])
    return name in consts


def _fusable_add_inputs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, int]]:
    """(Add, input index) where TensorRT could fuse the Add into the convolution behind that input but a Q->DQ pair
    sits between them: each input of the Add comes through DequantizeLinear (so the residual is int8), and behind
    the chosen one is Conv -> Q -> DQ with no other consumer. Of two such inputs, the convolution with the larger
    kernel (the main branch; a projection shortcut is 1x1), else the first."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    found = []
    for add in (n for n in graph.node if n.op_type == "Add" and len(n.input) == 2):
        dqs = [producer.get(name) for name in add.input]
        if not all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs):
            continue
        choices = []
        for index, dq in enumerate(dqs):
            q = producer.get(dq.input[0])
            conv = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            single = all(consumers.get(t, 0) == 1 and t not in outputs for t in (dq.output[0], q.output[0] if q else "",
                                                                                conv.output[0] if conv else ""))
            if conv is not None and conv.op_type == "Conv" and single:
                kernel = next((list(a.ints) for a in conv.attribute if a.name == "kernel_shape"), [1])
                choices.append((-int(np.prod(kernel)), index))
        if choices:
            found.append((add, min(choices)[1]))
    return found


def unquantize_fused_add_inputs(model: onnx.ModelProto) -> int:
    """Rule 6 applied: for each residual Add that TensorRT could fuse into a convolution, drop the Q->DQ pair
    between that convolution and the Add (the other input keeps its Q/DQ). Returns the number of Adds changed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    edits = _fusable_add_inputs(graph)
    for add, index in edits:
        dq = producer[add.input[index]]
        q = producer[dq.input[0]]
        add.input[index] = q.input[0]
        graph.node.remove(dq)
        graph.node.remove(q)
    return len(edits)


def _weight_problems(op, dq, consts, producer, label) -> list[str]:
    """Rule 3 for one weighted op whose weight comes through `dq`."""
    weight = consts.get(dq.input[0])
    if weight is None:
        source = producer.get(dq.input[0])
        if source is None or source.op_type != "QuantizeLinear" or source.input[0] not in consts:
            return [f"{label(op)}: the weight behind {label(dq)} is neither an int8 constant nor a Q/DQ pair "
                    "on a constant"]
        weight = consts[source.input[0]]
    scale = consts.get(dq.input[1])
    if scale is None or weight.ndim < 2:
        return []
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
    wanted = _output_channel_axis(op, weight.ndim)
    if scale.size == 1 and weight.shape[wanted] > 1:
        return [f"{label(op)}: weight {op.input[1]!r} is quantized per tensor; TensorRT's accuracy needs "
                f"per-channel scales on axis {wanted}"]
    if scale.size > 1 and (axis != wanted or scale.size != weight.shape[wanted]):
        return [f"{label(op)}: weight {op.input[1]!r} has {scale.size} scales on axis {axis}; TensorRT needs one "
                f"per output channel on axis {wanted} ({weight.shape[wanted]})"]
    return []
