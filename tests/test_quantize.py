import numpy as np
import onnx
import torch

from edgecompress import data
from edgecompress.models import Normalized, create
from edgecompress.quantize import export_onnx, quantize_qdq
from edgecompress.runners import OrtRunner, TorchRunner, predict


def small_model():
    torch.manual_seed(0)
    return Normalized(create("resnet_slim_050", 1, 10), [0.286], [0.353]).eval()


SPEC = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}


def test_fp32_onnx_matches_torch_and_carries_its_normalisation(tmp_path):
    model = small_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, SPEC, 17, path)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(OrtRunner(path, 1, "ort")(x), TorchRunner(model, 1)(x), rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["edgecompress.mean"] == "[0.286]"
    # a dynamic batch axis: the same file runs at batch 1 and 64
    assert OrtRunner(path, 1, "ort")(np.zeros((64, 1, 28, 28), np.float32)).shape == (64, 10)


def test_x86_scheme_gives_uint8_activations_and_per_channel_int8_weights(tmp_path):
    fashion = data.load("fashion-mnist")
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    export_onnx(small_model(), SPEC, 17, fp32)
    calib = fashion.x_train[data.stratified_sample(fashion.y_train, 100, 0)]
    quantize_qdq(fp32, int8, calib, "minmax", "uint8", "int8", per_channel=True)
    graph = onnx.load(str(int8)).graph
    inits = {t.name: t for t in graph.initializer}
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quant and {inits[n.input[2]].data_type for n in quant} == {onnx.TensorProto.UINT8}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq, "conv weights should be stored as int8"
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)  # per channel
    assert not [p for p in tmp_path.iterdir() if p.name not in ("m.onnx", "m.int8.onnx")]  # no temp files left

    # the int8 model computes the same function: it agrees with fp32 on real images
    x = fashion.x_eval[:500]
    agree = (predict(OrtRunner(int8, 2, "int8"), x, 250).argmax(1) == predict(OrtRunner(fp32, 2, "fp32"), x, 250).argmax(1))
    assert agree.mean() > 0.9
