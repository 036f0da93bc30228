"""The int8 kernel check reads ONNX Runtime's optimised graph: fused int8 layers, and the ones left in float."""
from __future__ import annotations

import dataclasses

import onnx
import torch

from edgecompress import backends, kernels, quantize, targets

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
    scheme = dataclasses.replace(backends.scheme_for(targets.load("x86-cpu")), float_outputs=("Mul",))
    calibration = torch.from_numpy(fashion_raw["x_train"][:64, None].copy())
    partial = tmp_path / "partial.onnx"
    quantize.quantize_qdq(fp32, partial, calibration, "minmax", scheme, exclude=[first_conv])
    report = kernels.kernel_report(partial)
    assert not report["all_compute_int8"] and len(report["float_compute_layers"]) == 1
    assert report["float_compute_layers"][0].startswith(first_conv)  # the optimiser may rename it (e.g. NCHWc)
    assert report["int8_compute_layers"] >= 1


def test_operators_without_an_int8_kernel_are_named_by_type(tmp_path, fashion_raw):
    """A squeeze-excite gate with Hardsigmoid (MobileNetV3's) between int8 convolutions: ONNX Runtime runs the
    convolutions in int8 and the Hardsigmoid in float between them; the check names it, and an all-ReLU copy of
    the same network has nothing there."""
    def net(activation: torch.nn.Module) -> torch.nn.Module:
        class Gated(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
                self.gate, self.head = activation, torch.nn.Conv2d(8, 4, 1)

            def forward(self, x):
                y = torch.relu(self.conv1(x))
                return self.head(self.conv2(y) * self.gate(y)).mean((2, 3))
        torch.manual_seed(0)
        return Gated().eval()

    spec = {"input_shape": [1, 28, 28], "mean": [0.0], "std": [1.0], "classes": list("abcd")}
    scheme = backends.scheme_for(targets.load("x86-cpu"))
    calibration = torch.from_numpy(fashion_raw["x_train"][:64, None].copy())
    found = {}
    for name, activation in (("hardsigmoid", torch.nn.Hardsigmoid()), ("relu", torch.nn.ReLU())):
        fp32, int8 = tmp_path / f"{name}.fp32.onnx", tmp_path / f"{name}.int8.onnx"
        quantize.export_onnx(net(activation), spec, 17, fp32)
        quantize.quantize_qdq(fp32, int8, calibration, "minmax", scheme)
        found[name] = kernels.kernel_report(int8)
    assert found["hardsigmoid"]["all_compute_int8"] and found["hardsigmoid"]["dequantized_ops"].get("HardSigmoid") == 1
    assert "HardSigmoid" not in found["relu"]["dequantized_ops"] and "Relu" not in found["relu"]["dequantized_ops"]
