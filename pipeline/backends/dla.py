"""DLA placement report for Jetson targets, predicted from the ONNX graph before any engine exists.

Each node is matched against TensorRT's "DLA Supported Layers and Restrictions" (TensorRT 10 developer guide and
NvInfer.h) as TensorRT's ONNX parser imports it: layers are 4D ("2D only" spatially); Convolution / FullyConnected
kernels [1, 32], strides [1, 8], padding [0, 31], dilation [1, 32], channels [1, 8192]; Deconvolution kernels and
strides [1, 32], no padding, groups or dilation, output maps [1, 8192]; Pooling (max, average) windows [1, 8],
strides [1, 16], padding [0, 7]; Reduce: MAX only, which matters because the parser imports GlobalAveragePool and
GlobalMaxPool as Reduce layers (onnx-tensorrt's globalPoolingHelper, kAVG / kMAX), not as Pooling; Activation:
ReLU, Sigmoid, TanH, Clipped ReLU, Leaky ReLU; ElementWise: Sum, Sub, Product, Max, Min, Div, Pow; SoftMax over a
channel or spatial axis of at most 8192 (1024 when another non-batch dimension exceeds 1), Orin only; Resize with
integer scales of 1 on N and C and [1, 32] (nearest) or [1, 4] (linear) on H and W; Concatenation along channels
only; batch at most 4096 and other dimensions at most 8192; fixed shapes only.
A node that breaks a rule runs on the GPU when GPU fallback is on. Q/DQ pairs carry scales that TensorRT folds
into the neighbouring layers, so they are listed as folded, not placed. The builder makes the final choice on the
device (IBuilderConfig.can_run_on_DLA; the export's layer_info.json holds the engine's own account); this report
says what to expect and why.
"""
from __future__ import annotations

import onnx
from onnx import shape_inference

MAX_BATCH, MAX_DIM, MAX_CHANNELS = 4096, 8192, 8192
MAX_LOADABLES_PER_CORE = 16
ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu"}
ELEMENTWISE = {"Add": "Sum", "Sub": "Sub", "Mul": "Product", "Div": "Div", "Max": "Max", "Min": "Min", "Pow": "Pow"}
SHUFFLES = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
FOLDED = {"QuantizeLinear": "Q/DQ scale, folded into its neighbours",
          "DequantizeLinear": "Q/DQ scale, folded into its neighbours",
          "Identity": "removed by the builder", "Dropout": "removed by the builder",
          "Constant": "a constant, no layer"}


def wanted(target) -> bool:
    """Jetson targets get the report: TensorRT on arm64, whether or not the profile asks for a DLA core."""
    return target.runtime == "tensorrt" and target.docker.platform == "linux/arm64"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _out_of(values, low: int, high: int) -> bool:
    return any(not low <= int(v) <= high for v in values)


class Graph:
    """Shapes and constants of an ONNX graph, with the batch axis fixed to the profile's opt batch."""

    def __init__(self, model: onnx.ModelProto, batch: int):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        inferred = shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int]] = {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            self.shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
        self.constants = {t.name: t for t in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        for name, tensor in self.constants.items():
            self.shapes.setdefault(name, list(tensor.dims))
        self.nodes = list(model.graph.node)

    def is_constant(self, name: str) -> bool:
        """An initializer, or a DequantizeLinear / Constant of one (quantized weights)."""
        if name in self.constants:
            return True
        node = self.producers.get(name)
        return node is not None and (node.op_type == "Constant" or
                                     (node.op_type == "DequantizeLinear" and self.is_constant(node.input[0])))

    def weight_shape(self, name: str) -> list[int]:
        node = self.producers.get(name)
        while node is not None and node.op_type == "DequantizeLinear":
            name, node = node.input[0], self.producers.get(node.input[0])
        return list(self.constants[name].dims) if name in self.constants else self.shapes.get(name, [])


def place(node: onnx.NodeProto, graph: Graph) -> tuple[str, str, str]:
    """(device, TensorRT layer, reason) for one node: device is DLA, GPU or folded."""
    op, attrs = node.op_type, _attrs(node)
    if op in FOLDED:
        return "folded", "-", FOLDED[op]
    shape_in = graph.shapes.get(node.input[0], []) if node.input else []
    shape_out = graph.shapes.get(node.output[0], [])
    for shape in (shape_in, shape_out):
        if shape and (shape[0] > MAX_BATCH or any(d > MAX_DIM for d in shape[1:])):
            return "GPU", op, f"tensor {shape} exceeds DLA's batch {MAX_BATCH} / dimension {MAX_DIM} limits"
    if op in ("Conv", "ConvTranspose"):
        return _convolution(node, attrs, graph)
    if op in ("Gemm", "MatMul"):
        return "GPU", "MatrixMultiply", ("2-D matrix product: DLA layers take 4-D tensors; exporting the classifier "
                                         "as a 1x1 convolution would keep it on DLA")
    if op in ACTIVATIONS:
        return "DLA", f"Activation ({op})", "DLA activation"
    if op == "PRelu":
        return ("DLA", "ParametricReLU", "constant slope") if graph.is_constant(node.input[1]) else \
            ("GPU", "ParametricReLU", "slope is not a build-time constant")
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        # TensorRT's ONNX parser makes these Reduce layers over H and W, and DLA reduces with MAX only
        if op == "GlobalAveragePool":
            return "GPU", "Reduce (average)", "the parser imports a global average pool as a Reduce layer, and DLA " \
                                              "reduces with MAX only (an AveragePool with an HxW window stays a " \
                                              "Pooling layer)"
        return "DLA", "Reduce (max)", "a global max pool is a Reduce MAX layer over H and W: DLA runs it"
    if op in ("MaxPool", "AveragePool"):
        layer = f"Pooling ({'max' if op == 'MaxPool' else 'average'})"
        window = list(attrs.get("kernel_shape", ()))
        if len(window) != 2:
            return "GPU", layer, "DLA pools over 2-D windows only"
        if _out_of(window, 1, 8):
            return "GPU", layer, f"window {window} outside DLA's [1, 8]"
        if _out_of(attrs.get("strides", (1, 1)), 1, 16) or _out_of(attrs.get("pads", (0, 0, 0, 0)), 0, 7):
            return "GPU", layer, "strides outside [1, 16] or padding outside [0, 7]"
        return "DLA", layer, f"{window[0]}x{window[1]} window: within DLA's limits"
    if op == "BatchNormalization":
        return "DLA", "Scale", "per-channel scale and shift"
    if op in ELEMENTWISE:
        layer = f"ElementWise ({ELEMENTWISE[op]})"
        operands = [graph.shapes.get(name, []) for name in node.input]
        if any(graph.is_constant(name) for name in node.input):
            return "DLA", "Scale" if op in ("Add", "Sub", "Mul") else layer, "one operand is a constant"
        if len(shape_out) == 4 and all(s == shape_out for s in operands):
            return "DLA", layer, "two 4-D operands of the same shape"
        return "GPU", layer, f"operands {operands}: DLA element-wise layers take equal 4-D shapes"
    if op == "Concat":
        axis = attrs.get("axis", 0) % max(len(shape_out), 1)
        return ("DLA", "Concatenation", "along channels") if axis == 1 and len(shape_out) == 4 else \
            ("GPU", "Concatenation", f"axis {axis}: DLA concatenates along channels of 4-D tensors only")
    if op in SHUFFLES:
        if len(shape_in) == 4 and len(shape_out) == 4:
            return "DLA", "Shuffle", "4-D in and out"
        return "GPU", "Shuffle", f"rank {len(shape_in)} -> {len(shape_out)}: DLA shuffles keep 4-D tensors"
    if op == "Softmax":
        return _softmax(attrs, shape_in)
    if op == "Resize":
        return _resize(node, attrs, graph, shape_in, shape_out)
    return "GPU", op, "not among DLA's layer types"


def _convolution(node: onnx.NodeProto, attrs: dict, graph: Graph) -> tuple[str, str, str]:
    """Convolution and Deconvolution (ConvTranspose, whose weight is [input channels, output channels / groups,
    kH, kW]) against their DLA limits."""
    deconvolution = node.op_type == "ConvTranspose"
    layer = "Deconvolution" if deconvolution else "Convolution"
    kernel = attrs.get("kernel_shape") or graph.weight_shape(node.input[1])[2:]
    if len(kernel) != 2:
        return "GPU", layer, f"{len(kernel)}-D kernel: DLA runs 2-D convolutions only"
    if not graph.is_constant(node.input[1]):
        return "GPU", layer, "weights are not constant"
    weight, group = graph.weight_shape(node.input[1]), attrs.get("group", 1)
    outputs = (weight[1] * group if deconvolution else weight[0]) if weight else 0
    inputs = (weight[0] if deconvolution else weight[1] * group) if weight else 0
    if _out_of([outputs, inputs], 1, MAX_CHANNELS):
        return "GPU", layer, f"{outputs} output / {inputs} input channels outside DLA's [1, {MAX_CHANNELS}]"
    if _out_of(kernel, 1, 32):
        return "GPU", layer, f"kernel {list(kernel)} outside DLA's [1, 32]"
    strides = attrs.get("strides", (1, 1))
    if deconvolution:
        if group > 1 or any(p for p in attrs.get("pads", ())) or _out_of(attrs.get("dilations", (1, 1)), 1, 1):
            return "GPU", layer, "DLA deconvolution takes no groups, dilation or padding"
        if _out_of(strides, 1, 32):
            return "GPU", layer, f"strides {list(strides)} outside DLA's deconvolution range [1, 32]"
    else:
        if _out_of(strides, 1, 8):
            return "GPU", layer, f"strides {list(strides)} outside DLA's [1, 8]"
        if _out_of(attrs.get("pads", (0, 0, 0, 0)), 0, 31):
            return "GPU", layer, f"padding {list(attrs['pads'])} outside DLA's [0, 31]"
        if _out_of(attrs.get("dilations", (1, 1)), 1, 32):
            return "GPU", layer, f"dilation {list(attrs['dilations'])} outside DLA's [1, 32]"
    return "DLA", layer, f"{kernel[0]}x{kernel[1]} kernel, {outputs} output channels: within DLA's limits"


def _softmax(attrs: dict, shape: list[int]) -> tuple[str, str, str]:
    """DLA's SoftMax (Orin, fp16): over a channel or spatial axis of a 4-D tensor; the axis at most 8192 long when
    every other non-batch dimension is 1, else at most 1024."""
    if len(shape) != 4:
        return "GPU", "SoftMax", f"rank {len(shape)}: DLA's softmax takes 4-D tensors"
    axis = attrs.get("axis", -1) % 4
    if axis == 0:
        return "GPU", "SoftMax", "over the batch axis: DLA's softmax runs over a channel or spatial axis"
    others = [d for i, d in enumerate(shape[1:], 1) if i != axis]
    limit = 8192 if all(d == 1 for d in others) else 1024
    if shape[axis] > limit:
        return "GPU", "SoftMax", f"axis length {shape[axis]} over DLA's {limit}"
    return "DLA", "SoftMax", f"axis {axis} of length {shape[axis]} (Orin's DLA; runs in fp16)"


def _resize(node: onnx.NodeProto, attrs: dict, graph: Graph, shape_in: list[int],
            shape_out: list[int]) -> tuple[str, str, str]:
    """DLA's Resize: 4-D, scale exactly 1 on N and C, integer scales in [1, 32] (nearest) or [1, 4] (linear)."""
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(shape_in) != 4 or len(shape_out) != 4 or mode not in ("nearest", "linear"):
        return "GPU", "Resize", f"{mode} resize of rank {len(shape_in)}: DLA resizes 4-D tensors, nearest or linear"
    scales = [o / i if i else 0.0 for i, o in zip(shape_in, shape_out)]
    high = 32 if mode == "nearest" else 4
    if scales[0] != 1 or scales[1] != 1:
        return "GPU", "Resize", f"scales {scales}: DLA keeps N and C"
    if any(not s.is_integer() or not 1 <= s <= high for s in scales[2:]):
        return "GPU", "Resize", f"H and W scales {scales[2:]}: DLA takes integers in [1, {high}] for {mode}"
    return "DLA", "Resize", f"{mode} x{int(scales[2])}/x{int(scales[3])}: within DLA's limits"


def report(model: onnx.ModelProto, target, settings) -> dict:
    """Per-node placement with reasons, and a summary: counts and the number of DLA segments (loadables)."""
    graph = Graph(model, settings.opt_shape[0])
    rows, segments, previous = [], 0, None
    for node in graph.nodes:
        device, layer, reason = place(node, graph)
        rows.append({"node": node.name, "op": node.op_type, "layer": layer, "device": device, "reason": reason})
        if device != "folded":
            segments += device == "DLA" and previous != "DLA"
            previous = device
    counts = {d: sum(r["device"] == d for r in rows) for d in ("DLA", "GPU", "folded")}
    dla_core = target.tensorrt.dla_core
    notes = []
    if dla_core < 0:
        notes.append("this profile builds for the GPU only (dla_core = -1); the table shows which layers a Jetson "
                     "with DLA cores (Orin NX, AGX Orin) could move to DLA")
    elif not target.tensorrt.gpu_fallback and counts["GPU"]:
        notes.append("gpu_fallback is off: the build will fail on the GPU-only layers")
    if segments > MAX_LOADABLES_PER_CORE:
        notes.append(f"{segments} DLA segments: more than the {MAX_LOADABLES_PER_CORE} loadables a DLA core holds")
    return {
        "target": target.name, "dla_core": dla_core, "gpu_fallback": target.tensorrt.gpu_fallback,
        "precision": target.precision, "batch": settings.opt_shape[0],
        "method": "predicted from the ONNX graph with TensorRT's DLA layer restrictions; the builder decides on "
                  "the device (trtexec --verbose shows the final placement)",
        "summary": {"dla_layers": counts["DLA"], "gpu_layers": counts["GPU"], "folded": counts["folded"],
                    "dla_segments": segments, "notes": notes},
        "layers": rows,
    }


def markdown(r: dict) -> str:
    s = r["summary"]
    device = f"DLA core {r['dla_core']}" if r["dla_core"] >= 0 else "GPU only (no DLA core)"
    lines = [f"# DLA placement: {r['target']}", "",
             f"{device}, GPU fallback {'on' if r['gpu_fallback'] else 'off'}, {r['precision']}, batch {r['batch']}.", "",
             f"Method: {r['method']}.", "",
             f"{s['dla_layers']} layers on DLA, {s['gpu_layers']} on the GPU, {s['folded']} folded; "
             f"{s['dla_segments']} DLA segment(s).", ""]
    lines += [f"- {note}" for note in s["notes"]]
    lines += ["", "| node | op | TensorRT layer | device | why |", "|---|---|---|---|---|"]
    lines += [f"| {row['node']} | {row['op']} | {row['layer']} | {row['device']} | {row['reason']} |"
              for row in r["layers"] if row["device"] != "folded"]
    return "\n".join(lines) + "\n"
