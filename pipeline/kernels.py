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
    import onnxruntime as ort

    from .runners import ort_session_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort_session_options(threads, settings)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=list(providers))
        return onnx.load(opts.optimized_model_filepath).graph


def kernel_report(path: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                  settings=None) -> dict:
    """Counts of the compute kernels in the optimised graph, and the names of the layers left in float."""
    graph = optimized_graph(path, threads, providers, settings)
    ops = Counter(node.op_type for node in graph.node)
    left_in_float = [node.name or node.output[0] for node in graph.node if node.op_type in FLOAT_COMPUTE]
    return {"int8_compute_layers": sum(ops[op] for op in INT8_COMPUTE), "float_compute_layers": left_in_float,
            "all_compute_int8": not left_in_float, "ops": dict(sorted(ops.items()))}
