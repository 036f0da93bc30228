"""Runners: a target's [onnxruntime] settings reach the session and the record of it, and change no output."""
import numpy as np
import torch

from edgecompress.models import Normalized, create
from edgecompress.quantize import export_onnx
from edgecompress.backends.onnxruntime import OrtRunner
from edgecompress.targets import OnnxRuntimeOptions

SPEC = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}


def test_session_settings_are_applied_and_recorded(tmp_path, fashion_small_test):
    torch.manual_seed(0)
    export_onnx(Normalized(create("resnet_slim_050", 1, 10), SPEC["mean"], SPEC["std"]).eval(), SPEC, 17,
                tmp_path / "m.onnx")
    x = fashion_small_test[0][:, None].astype(np.float32) / 255
    default = OrtRunner(tmp_path / "m.onnx", 2, "onnxruntime-fp32")
    plain = OrtRunner(tmp_path / "m.onnx", 2, "onnxruntime-fp32",
                      settings=OnnxRuntimeOptions(graph_optimization_level="disabled", allow_spinning=False))
    assert default.settings()["graph_optimization_level"] == "ORT_ENABLE_ALL" and default.settings()["allow_spinning"]
    assert plain.settings()["graph_optimization_level"] == "ORT_DISABLE_ALL" and not plain.settings()["allow_spinning"]
    assert plain.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_allclose(plain(x), default(x), rtol=1e-4, atol=1e-4)
