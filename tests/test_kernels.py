"""The int8 kernel check reads ONNX Runtime's optimised graph: fused int8 layers, and the ones left in float."""
from __future__ import annotations

import dataclasses

import onnx
import torch

from edgecompress import kernels, quantize, schemes, targets

from testkit import small_run_dir


def test_a_fully_quantized_artifact_runs_every_conv_and_gemm_as_int8(tmp_path_factory, fashion_raw, teacher_spec):
    run = small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)
    artifact = run / "export" / "test-cpu" / "model.onnx"
    report = kernels.kernel_report(artifact)
    convs = sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(run / "quantize" / "student.fp32.onnx")).graph.node)
    assert report["all_compute_int8"] and report["int8_compute_layers"] == convs
    assert report["ops"].get("QLinearConv", 0) > 0
    fp32 = kernels.kernel_report(run / "quantize" / "student.fp32.onnx")
    assert not fp32["all_compute_int8"] and len(fp32["float_compute_layers"]) == convs


def test_a_layer_kept_in_float_is_named(tmp_path_factory, fashion_raw, teacher_spec, tmp_path):
    run = small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)
    fp32 = run / "quantize" / "student.fp32.onnx"
    first_conv = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    # ONNX Runtime re-quantizes a float-weight Conv between a DequantizeLinear and a QuantizeLinear (its
    # WeightBiasQuantization transformer), so the layer kept in float gets a float input too: the normalising Mul's
    # output is left unquantized.
    scheme = dataclasses.replace(schemes.for_target(targets.load("x86-cpu")), float_outputs=("Mul",))
    calibration = torch.from_numpy(fashion_raw["x_train"][:64, None].copy())
    partial = tmp_path / "partial.onnx"
    quantize.quantize_qdq(fp32, partial, calibration, "minmax", scheme, exclude=[first_conv])
    report = kernels.kernel_report(partial)
    assert not report["all_compute_int8"] and len(report["float_compute_layers"]) == 1
    assert report["float_compute_layers"][0].startswith(first_conv)  # the optimiser may rename it (e.g. NCHWc)
    assert report["int8_compute_layers"] >= 1
