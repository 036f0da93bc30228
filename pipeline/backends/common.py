"""What every backend's export shares: the artifact's I/O description, the images an exported file is checked on,
the comparison of two runtimes' logits, and what an ONNX file holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .. import data as datasets
from ..errors import StageFailed

CHECK_IMAGES = 256  # eval images an exported artifact must reproduce the quantized model's outputs on
# The offline-optimised graph may differ from its source by float rounding in fused kernels, never in its class.
CHECK_ATOL = 1e-3


def io_description(model: onnx.ModelProto) -> dict:
    graph = model.graph
    dims = [d.dim_value if d.dim_value else (d.dim_param or "?") for d in graph.input[0].type.tensor_type.shape.dim]
    return {"input": {"name": graph.input[0].name, "shape": dims, "dtype": "float32", "layout": "NCHW",
                      "range": "[0, 1] pixels (normalisation is inside the graph)"},
            "output": {"name": graph.output[0].name, "meaning": "logits"}}


def check_images(ctx) -> np.ndarray:
    return datasets.to_float(ctx.data.x_eval[:CHECK_IMAGES]).numpy()


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, what: str, atol: float = CHECK_ATOL) -> dict:
    """Max |difference| and top-1 agreement of two runtimes' logits on the same images; StageFailed beyond atol."""
    diff = float(np.abs(reference - candidate).max())
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    if not diff <= atol:
        raise StageFailed(f"{what}: outputs differ from the quantized model by up to {diff:.3g} "
                          f"(top-1 agreement {agreement:.4f}) on {len(reference)} eval images; tolerance {atol}")
    return {"images": len(reference), "max_abs_diff": diff, "top1_agreement": agreement, "tolerance": atol}


def onnx_format(path: Path) -> str:
    """What the ONNX file holds, read from its graph: onnx-qdq-int8, onnx-int8 (QOperator), onnx-fp16 or onnx-fp32."""
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    if "QuantizeLinear" in ops and "DequantizeLinear" in ops:
        return "onnx-qdq-int8"
    if any(op.startswith("QLinear") or op.endswith("Integer") for op in ops):
        return "onnx-int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "onnx-fp16"
    return "onnx-fp32"


def runtime_label(onnx_format: str) -> str:
    """onnx-qdq-int8 -> onnxruntime-int8: the runtime and the precision it computes in."""
    return "onnxruntime-" + onnx_format.rsplit("-", 1)[1]
