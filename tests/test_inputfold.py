"""The input normalisation folded into the input's quantization: the graph loses Sub/Mul and their Q/DQ, and the
int8 model computes what it computed before (up to rounding finer than int8's own)."""
import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from edgecompress import backends, data, targets
from edgecompress.inputfold import fold_input_normalization
from edgecompress.models import Normalized, create
from edgecompress.quantize import CalibrationReader, export_onnx, quantize_qdq
from edgecompress.backends.onnxruntime import OrtRunner

from testkit import top1, trained_student

SPEC = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}


@pytest.fixture(scope="module")
def fashion():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def images(fashion_small):
    return torch.from_numpy(fashion_small[0]).unsqueeze(1)


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory, fashion):
    """The briefly trained resnet_slim_050 (testkit.trained_student), with SPEC's normalisation: an untrained one
    answers one class for every image, and any int8 model would agree with it."""
    path = tmp_path_factory.mktemp("fold") / "fp32.onnx"
    export_onnx(trained_student(fashion), SPEC, 17, path)
    return path


def ort_qdq(fp32_path, out, images):
    """ONNX Runtime's own QDQ quantization of the same model, with the x86 scheme's options and no fold."""
    scheme = backends.scheme_for(targets.load("x86-cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(fp32_path), str(out), CalibrationReader(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=scheme.extra_options())
    return out


def test_fold_removes_the_normalisation_and_keeps_the_function(fp32_path, images, fashion, tmp_path):
    plain = onnx.load(str(ort_qdq(fp32_path, tmp_path / "plain.onnx", images)))
    folded = copy.deepcopy(plain)
    record = fold_input_normalization(folded)
    assert record.pop("normalized_tensor") in {n.output[0] for n in plain.graph.node if n.op_type == "Mul"}
    assert record == {"mean": pytest.approx(0.286), "std": pytest.approx(0.353, rel=1e-6),
                      "input_scale": 1 / 255, "normalized_zero_point": 73}
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert "Sub" not in ops and "Mul" not in ops
    assert len(folded.graph.node) == len(plain.graph.node) - 5  # Sub, Q, DQ, Mul, Q out; DQ of inv_std unused
    first = next(n for n in folded.graph.node if folded.graph.input[0].name in n.input)
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert first.op_type == "QuantizeLinear" and inits[first.input[1]] == np.float32(1 / 255)
    onnx.save(folded, str(tmp_path / "folded.onnx"))

    x, y = data.to_float(fashion.x_eval[:500]).numpy(), fashion.y_eval[:500].numpy()  # images not calibrated on
    reference = OrtRunner(fp32_path, 1, "fp32")(x)
    before, after = OrtRunner(tmp_path / "plain.onnx", 1, "int8")(x), OrtRunner(tmp_path / "folded.onnx", 1, "int8")(x)
    # the fold replaces two roundings of the normalised input by one exact one of the pixels: no worse than before
    assert np.abs(after - reference).mean() <= 1.1 * np.abs(before - reference).mean()
    # well above chance, so the model predicts many classes and agreeing with it means something
    accuracy, agreement = top1(reference, y), (top1(after, reference.argmax(1)), top1(after, before.argmax(1)))
    assert accuracy > 0.5 and min(agreement) >= 0.95, (accuracy, agreement)


def test_quantize_folds_for_x86_but_not_for_tensorrt(fp32_path, images, tmp_path):
    x86 = backends.scheme_for(targets.load("x86-cpu"))
    trt = backends.scheme_for(targets.load("x86-nvidia"))
    quantize_qdq(fp32_path, tmp_path / "x86.onnx", images, "minmax", x86)
    quantize_qdq(fp32_path, tmp_path / "trt.onnx", images, "minmax", trt)
    assert "Sub" not in {n.op_type for n in onnx.load(str(tmp_path / "x86.onnx")).graph.node}
    # TensorRT's activations are symmetric int8 (zero point 0): the mean cannot live in a zero point
    assert "Sub" in {n.op_type for n in onnx.load(str(tmp_path / "trt.onnx")).graph.node}


def test_per_channel_normalisation_is_left_alone(tmp_path):
    spec = SPEC | {"input_shape": [3, 28, 28], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    torch.manual_seed(0)
    model = Normalized(create("resnet_slim_050", 3, 10), spec["mean"], spec["std"]).eval()
    export_onnx(model, spec, 17, tmp_path / "rgb.onnx")
    rgb = torch.rand(16, 3, 28, 28)  # only the channel count matters here
    quantized = onnx.load(str(ort_qdq(tmp_path / "rgb.onnx", tmp_path / "rgb.int8.onnx", rgb)))
    nodes = len(quantized.graph.node)
    assert fold_input_normalization(quantized) is None
    assert len(quantized.graph.node) == nodes
