"""Fold the model's input normalisation into the quantization of its input (int8 QDQ graphs for ONNX Runtime).

Our ONNX files take [0, 1] pixels and normalise inside the graph, `(x - mean) * inv_std`. After quantize_static
that is Sub -> Q -> DQ -> Mul -> Q -> DQ -> first conv: four small operators that, at batch 1, cost about as
much as a convolution. An affine map needs none of them. Quantize the raw pixels with scale 1/255 and zero
point 0 (exact for 8-bit images), and let the first DequantizeLinear undo the normalisation:

    (q - round(255 * mean)) * inv_std / 255  ==  (x - mean) * inv_std,  up to 0.5 / 255 of the mean

That error is well under the half step (range / 510) the calibrated quantizer of the normalised input had.
The fold needs one mean and one std for all channels (a per-tensor zero point cannot hold three) and
asymmetric uint8 activations (a symmetric scheme, TensorRT's, needs zero point 0): otherwise the graph is left
as it is.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

PIXEL_LEVELS = 255


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of `name` when it is an initializer, or the output of a DequantizeLinear of initializers."""
    inits = {t.name: t for t in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float64)
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear" and all(i in inits for i in producer.input):
        q, scale, zero = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in producer.input[:3])
        return (q - zero) * scale
    return None


def _single_consumer(graph: onnx.GraphProto, tensor: str, op_type: str) -> onnx.NodeProto | None:
    consumers = [n for n in graph.node if tensor in n.input]
    return consumers[0] if len(consumers) == 1 and consumers[0].op_type == op_type else None


def fold_input_normalization(model: onnx.ModelProto) -> dict | None:
    """Rewrite `model` in place when its input goes Sub(mean) -> Q -> DQ -> Mul(inv_std) -> Q -> DQs; returns
    what was folded (mean, std, zero point, the normalised tensor's name), or None when the graph does not have
    that shape."""
    graph = model.graph
    if len(graph.input) != 1:
        return None
    sub = _single_consumer(graph, graph.input[0].name, "Sub")
    if sub is None or sub.input[0] != graph.input[0].name:
        return None
    mean = _constant(graph, sub.input[1])
    q_sub = _single_consumer(graph, sub.output[0], "QuantizeLinear")
    dq_sub = q_sub and _single_consumer(graph, q_sub.output[0], "DequantizeLinear")
    mul = dq_sub and _single_consumer(graph, dq_sub.output[0], "Mul")
    if mean is None or mul is None:
        return None
    inv_std = _constant(graph, mul.input[1] if mul.input[0] == dq_sub.output[0] else mul.input[0])
    q_mul = _single_consumer(graph, mul.output[0], "QuantizeLinear")
    if inv_std is None or q_mul is None or np.ptp(mean) > 0 or np.ptp(inv_std) > 0:
        return None
    inits = {t.name: t for t in graph.initializer}
    zero_type = inits[q_mul.input[2]].data_type if len(q_mul.input) > 2 and q_mul.input[2] in inits else None
    if zero_type != onnx.TensorProto.UINT8:
        return None  # only asymmetric uint8 activations can carry the mean in the zero point
    mean_value, inv_std_value = float(mean.flat[0]), float(inv_std.flat[0])
    zero_point = int(round(PIXEL_LEVELS * mean_value))
    if not 0 <= zero_point <= PIXEL_LEVELS or inv_std_value <= 0:
        return None
    dequantizers = [n for n in graph.node if q_mul.output[0] in n.input]
    if not dequantizers or any(n.op_type != "DequantizeLinear" for n in dequantizers):
        return None

    prefix = "input_pixels"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1.0 / PIXEL_LEVELS, np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), f"{prefix}_zero_point"),
        numpy_helper.from_array(np.array(inv_std_value / PIXEL_LEVELS, np.float32), f"{prefix}_normalized_scale"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), f"{prefix}_normalized_zero_point")])
    quantize = helper.make_node("QuantizeLinear", [graph.input[0].name, f"{prefix}_scale", f"{prefix}_zero_point"],
                                [q_mul.output[0]], name=f"{prefix}_QuantizeLinear")
    for dq in dequantizers:
        dq.input[1], dq.input[2] = f"{prefix}_normalized_scale", f"{prefix}_normalized_zero_point"
    position = list(graph.node).index(sub)
    for node in (sub, q_sub, dq_sub, mul, q_mul):
        graph.node.remove(node)
    graph.node.insert(position, quantize)
    drop_unused(graph)
    return {"mean": mean_value, "std": 1.0 / inv_std_value, "input_scale": 1.0 / PIXEL_LEVELS,
            "normalized_zero_point": zero_point, "normalized_tensor": mul.output[0]}


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (the DequantizeLinear of inv_std, the mean)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
