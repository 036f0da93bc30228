"""Which kernels ONNX Runtime actually runs for an int8 QDQ model: every Conv/Gemm/MatMul should become a fused
integer kernel (QLinearConv, QGemm, ...). A DequantizeLinear feeding a float Conv means the int8 weights are
dequantized and the layer runs in fp32: slower than the fp32 model, with the accuracy cost of int8."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"})
INT8_COMPUTE = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                          "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConvTranspose"})


def optimized_graph(path: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                    settings=None):
    """The graph ONNX Runtime runs after its optimisations (the target's level), as an onnx.GraphProto."""
    import onnx

    from .backends.onnxruntime import ort_session_options, session

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort_session_options(threads, settings)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session(path, threads, providers, options=opts)
        return onnx.load(opts.optimized_model_filepath).graph


def kernel_report(path: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                  settings=None) -> dict:
    """Counts of the compute kernels in the optimised graph, the names of the layers left in float, and the
    operators that run in float between int8 kernels (`dequantized_ops`, by type: a DequantizeLinear feeds
    them): activations and blocks ORT has no int8 kernel for (Hardswish, SiLU, squeeze-excite's Mul and
    ReduceMean, LayerNorm, GELU), each a dequantize-requantize round trip in the int8 graph."""
    graph = optimized_graph(path, threads, providers, settings)
    ops = Counter(node.op_type for node in graph.node)
    left_in_float = [node.name or node.output[0] for node in graph.node if node.op_type in FLOAT_COMPUTE]
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    islands = Counter(node.op_type for node in graph.node
                      if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape", *FLOAT_COMPUTE)
                      and any(name in dequantized for name in node.input))
    return {"int8_compute_layers": sum(ops[op] for op in INT8_COMPUTE), "float_compute_layers": left_in_float,
            "all_compute_int8": not left_in_float, "dequantized_ops": dict(sorted(islands.items())),
            "ops": dict(sorted(ops.items()))}


def macs_per_image(path: Path) -> int:
    """Multiply-accumulates of one image through the Conv and Gemm/MatMul nodes of an fp32 ONNX graph."""
    return sum(macs_per_layer(path).values())


def macs_per_layer(path: Path) -> dict[str, int]:
    """Multiply-accumulates of one image through each Conv and Gemm/MatMul node of an fp32 ONNX graph (a
    MatMul of two activations, as in attention, is not counted). The layers' output shapes are read from one
    ONNX Runtime run on a blank image: shape inference loses them behind a reshape that reads a tensor's shape
    (ShuffleNet's channel shuffle)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from .backends.onnxruntime import ort_session_options, session

    model = onnx.load(str(path))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type == "Conv"
              or n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in weights]
    listed = {o.name for o in model.graph.output}
    for node in layers:
        if node.output[0] not in listed:
            model.graph.output.add().name = node.output[0]
    opts = ort_session_options(1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    run = session(model.SerializeToString(), 1, options=opts)
    feed = run.get_inputs()[0]
    blank = np.zeros([1, *[d if isinstance(d, int) else 1 for d in feed.shape[1:]]], dtype=np.float32)
    names = [o.name for o in run.get_outputs()]
    shapes = dict(zip(names, (a.shape for a in run.run(names, {feed.name: blank}))))
    macs = {}
    for node in layers:
        if node.op_type == "Conv":
            _, cin_per_group, *kernel = weights[node.input[1]]
            macs[node.name] = int(np.prod(shapes[node.output[0]][1:])) * cin_per_group * int(np.prod(kernel))
        else:
            macs[node.name] = int(np.prod(weights[node.input[1]]))
    return macs
