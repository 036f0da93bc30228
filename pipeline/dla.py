"""DLA placement report for Jetson targets, predicted from the ONNX graph before any engine exists.

Each node is matched against TensorRT's "DLA Supported Layers and Restrictions" (TensorRT 10 developer guide):
layers are 4D ("2D only" spatially); Convolution / FullyConnected kernels [1, 32], strides [1, 8], padding
[0, 31], dilation [1, 32], channels [1, 8192]; Pooling windows [1, 8], strides [1, 16], padding [0, 7];
Activation: ReLU, Sigmoid, TanH, Clipped ReLU, Leaky ReLU; ElementWise: Sum, Sub, Product, Max, Min, Div, Pow;
Concatenation along channels only; batch at most 4096 and other dimensions at most 8192; fixed shapes only.
A node that breaks a rule runs on the GPU when GPU fallback is on. Q/DQ pairs carry scales that TensorRT folds
into the neighbouring layers, so they are listed as folded, not placed. The builder makes the final choice on the
device (IBuilderConfig.can_run_on_DLA; `trtexec --verbose` prints it); this report says what to expect and why.
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
        kernel = attrs.get("kernel_shape") or graph.weight_shape(node.input[1])[2:]
        layer = "Convolution" if op == "Conv" else "Deconvolution"
        if len(kernel) != 2:
            return "GPU", layer, f"{len(kernel)}-D kernel: DLA runs 2-D convolutions only"
        weight = graph.weight_shape(node.input[1])
        if not graph.is_constant(node.input[1]):
            return "GPU", layer, "weights are not constant"
        channels = [weight[0], weight[1] * attrs.get("group", 1)] if weight else []
        if _out_of(channels, 1, MAX_CHANNELS):
            return "GPU", layer, f"channels {channels} outside DLA's [1, {MAX_CHANNELS}]"
        if _out_of(kernel, 1, 32):
            return "GPU", layer, f"kernel {list(kernel)} outside DLA's [1, 32]"
        if op == "ConvTranspose" and (attrs.get("group", 1) > 1 or any(p for p in attrs.get("pads", ()))
                                      or _out_of(attrs.get("dilations", (1, 1)), 1, 1)):
            return "GPU", layer, "DLA deconvolution takes no groups, dilation or padding"
        if _out_of(attrs.get("strides", (1, 1)), 1, 8):
            return "GPU", layer, f"strides {list(attrs['strides'])} outside DLA's [1, 8]"
        if _out_of(attrs.get("pads", (0, 0, 0, 0)), 0, 31):
            return "GPU", layer, f"padding {list(attrs['pads'])} outside DLA's [0, 31]"
        if _out_of(attrs.get("dilations", (1, 1)), 1, 32):
            return "GPU", layer, f"dilation {list(attrs['dilations'])} outside DLA's [1, 32]"
        return "DLA", layer, f"{kernel[0]}x{kernel[1]} kernel, {channels[0]} output channels: within DLA's limits"
    if op in ("Gemm", "MatMul"):
        return "GPU", "MatrixMultiply", ("2-D matrix product: DLA layers take 4-D tensors; exporting the classifier "
                                         "as a 1x1 convolution would keep it on DLA")
    if op in ACTIVATIONS:
        return "DLA", f"Activation ({op})", "DLA activation"
    if op == "PRelu":
        return ("DLA", "ParametricReLU", "constant slope") if graph.is_constant(node.input[1]) else \
            ("GPU", "ParametricReLU", "slope is not a build-time constant")
    if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
        layer = f"Pooling ({'max' if 'Max' in op else 'average'})"
        window = shape_in[2:] if op.startswith("Global") else list(attrs.get("kernel_shape", ()))
        if len(window) != 2:
            return "GPU", layer, "DLA pools over 2-D windows only"
        if _out_of(window, 1, 8):
            return "GPU", layer, f"window {window} outside DLA's [1, 8]" + (
                " (a global pool spans the whole feature map)" if op.startswith("Global") else "")
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
        return ("DLA", "SoftMax", "channel axis of a 4-D tensor") if len(shape_in) == 4 and \
            attrs.get("axis", -1) % 4 == 1 else ("GPU", "SoftMax", "DLA's softmax runs over channels of 4-D tensors")
    if op == "Resize":
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return ("DLA", "Resize", f"{mode} 2-D resize") if len(shape_in) == 4 and mode in ("nearest", "linear") \
            else ("GPU", "Resize", f"{mode} resize of rank {len(shape_in)}")
    return "GPU", op, "not among DLA's layer types"


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
