import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgecompress import backends, data, targets
from edgecompress.errors import BadInput
from edgecompress.backends.qdq_check import check_tensorrt_qdq
from edgecompress.kernels import optimized_graph
from edgecompress.quantize import convert_fp16, export_onnx, float_output_names, quantize_qdq
from edgecompress.backends.onnxruntime import OrtRunner
from edgecompress.runners import TorchRunner, predict

from edgecompress.models.loaders import WEIGHTS_DIR

from testkit import small_model, top1, train_briefly, trained_student


SPEC = {"input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "classes": [str(i) for i in range(10)]}
X86 = targets.load("x86-cpu")
TENSORRT = dataclasses.replace(X86, name="trt", runtime="tensorrt", execution_providers=("TensorrtExecutionProvider",))


@pytest.fixture(scope="module")
def fashion():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def trained(fashion):
    """The briefly trained student (testkit.trained_student): right on most images, so agreement means something."""
    return trained_student(fashion)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory, trained):
    path = tmp_path_factory.mktemp("fp32") / "m.onnx"
    export_onnx(trained, SPEC, 17, path)
    return path


def assert_int8_computes_the_fp32_function(int8, fp32, fashion):
    """On 500 real test images the fp32 model is well above chance (10% for ten classes), so it predicts many
    classes, and the int8 model predicts the same class on at least 95% of them: a quantizer that zeroes the
    outputs or gets a scale wrong predicts one class, or noise, and fails."""
    x, y = fashion.x_eval[:500], fashion.y_eval[:500].numpy()
    reference = predict(OrtRunner(fp32, 2, "fp32"), x, 250)
    quantized = predict(OrtRunner(int8, 2, "int8"), x, 250)
    fp32_top1, int8_top1, agreement = top1(reference, y), top1(quantized, y), top1(quantized, reference.argmax(1))
    assert fp32_top1 > 0.5 and agreement >= 0.95 and int8_top1 > fp32_top1 - 0.03, (fp32_top1, int8_top1, agreement)


@pytest.fixture(scope="module")
def calib(fashion):
    return fashion.x_train[data.stratified_sample(fashion.y_train, 100, 0)]


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


def _zero_point_types(path) -> set[int]:
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    return {inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"}


def test_x86_scheme_gives_uint8_activations_and_per_channel_int8_weights(tmp_path, fashion, fp32_model, calib):
    int8 = tmp_path / "m.int8.onnx"
    scheme = backends.scheme_for(X86)
    assert scheme.name == "onnxruntime-x86-qdq" and scheme.activation_type == "uint8"
    quantize_qdq(fp32_model, int8, calib, "minmax", scheme)
    assert _zero_point_types(int8) == {onnx.TensorProto.UINT8}
    graph = onnx.load(str(int8)).graph
    inits = {t.name: t for t in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq, "conv weights should be stored as int8"
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)  # per channel
    assert not [p for p in tmp_path.iterdir() if p.name != "m.int8.onnx"]  # no temp files left
    # the logits stay float (no Q/DQ rounding them), and ORT still runs the final Gemm as an int8 QGemm
    logits = graph.output[0].name
    assert [n.op_type for n in graph.node if logits in n.output] == ["Gemm"]
    assert float_output_names(int8) == [logits]
    assert [n.op_type for n in optimized_graph(int8).node if logits in n.output] == ["QGemm"]
    # uint8 activations break TensorRT's rules: the checker says so
    assert any("uint8" in v for v in check_tensorrt_qdq(int8))

    assert_int8_computes_the_fp32_function(int8, fp32_model, fashion)


@pytest.fixture(scope="module")
def tensorrt_model(tmp_path_factory, fp32_model, calib):
    path = tmp_path_factory.mktemp("trt") / "m.trt.onnx"
    quantize_qdq(fp32_model, path, calib, "minmax", backends.scheme_for(TENSORRT))
    return path


def test_tensorrt_scheme_passes_the_checker(tensorrt_model, fashion, fp32_model, calib, tmp_path):
    from edgecompress.quantize import Quantizer

    assert check_tensorrt_qdq(tensorrt_model) == []
    # a fallback artifact (one conv kept in float with its input) still meets the rules
    quantizer = Quantizer(fp32_model, tmp_path, calib, backends.scheme_for(TENSORRT))
    node, group = next((n, g) for n, g in quantizer.candidates.items() if n.endswith("stages.1.0/conv2/Conv"))
    quantizer.quantize(tmp_path / "fallback.onnx", "minmax", group)
    assert check_tensorrt_qdq(tmp_path / "fallback.onnx") == []
    graph = onnx.load(str(tmp_path / "fallback.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.name == node)
    assert producers.get(conv.input[0]) != "DequantizeLinear" and producers.get(conv.input[1]) != "DequantizeLinear"
    assert _zero_point_types(tensorrt_model) == {onnx.TensorProto.INT8}
    graph = onnx.load(str(tensorrt_model)).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # both inputs of every conv come through DequantizeLinear; conv outputs are not quantized (TensorRT fuses)
    assert convs and all(producers[c.input[0]].op_type == producers[c.input[1]].op_type == "DequantizeLinear"
                         for c in convs)
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.op_type)
    # Conv -> Relu and Conv -> residual Add stay unbroken (TensorRT fuses Conv+Add+Relu); a conv output is quantized
    # only as the residual input of an Add (a projection shortcut)
    assert {"Relu", "Add"} <= {op for c in convs for op in consumers[c.output[0]]}
    assert all(consumers[c.output[0]] in (["Relu"], ["Add"], ["QuantizeLinear"]) for c in convs)
    assert_int8_computes_the_fp32_function(tensorrt_model, fp32_model, fashion)


def _rewrite(path, out, change):
    model = onnx.load(str(path))
    change(model.graph)
    onnx.save(model, str(out))
    return out


def test_checker_catches_planted_violations(tmp_path, tensorrt_model, fp32_model):
    def asymmetric(graph):  # shift one activation zero point away from 0
        inits = {t.name: t for t in graph.initializer}
        q = next(n for n in graph.node if n.op_type == "QuantizeLinear")
        inits[q.input[2]].CopyFrom(numpy_helper.from_array(np.array(7, np.int8), q.input[2]))

    def per_tensor_weight(graph):  # one conv weight with a single scale
        inits = {t.name: t for t in graph.initializer}
        weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
        dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in weights)
        for i, value in ((1, np.array(0.01, np.float32)), (2, np.array(0, np.int8))):
            inits[dq.input[i]].CopyFrom(numpy_helper.from_array(value, dq.input[i]))
        del dq.attribute[:]

    def float_input(graph):  # a conv whose activation skips its DequantizeLinear
        producers = {o: n for n in graph.node for o in n.output}
        conv = [n for n in graph.node if n.op_type == "Conv"][1]
        conv.input[0] = producers[conv.input[0]].input[0].replace("_QuantizeLinear_Output", "")

    found = {name: check_tensorrt_qdq(_rewrite(tensorrt_model, tmp_path / f"{name}.onnx", change))
             for name, change in (("asymmetric", asymmetric), ("per_tensor", per_tensor_weight),
                                  ("float_input", float_input))}
    assert any("zero point [7]" in v for v in found["asymmetric"]), found["asymmetric"]
    assert any("per tensor" in v for v in found["per_tensor"]), found["per_tensor"]
    assert any("not fed by DequantizeLinear" in v for v in found["float_input"]), found["float_input"]
    assert "not an explicitly quantized model" in check_tensorrt_qdq(fp32_model)[0]


def test_target_picks_the_scheme():
    assert backends.scheme_for(X86).name == "onnxruntime-x86-qdq"
    assert backends.scheme_for(TENSORRT).activation_symmetric and not backends.scheme_for(TENSORRT).quantize_bias
    mobile = dataclasses.replace(X86, runtime="onnxruntime-mobile", activation_type="int8")
    assert backends.scheme_for(mobile).name == "onnxruntime-mobile-qdq" and backends.scheme_for(mobile).activation_symmetric
    assert backends.scheme_for(dataclasses.replace(TENSORRT, precision="fp16")).precision == "fp16"
    assert backends.scheme_for(dataclasses.replace(X86, precision="fp32")).precision == "fp32"
    with pytest.raises(BadInput, match="no backend for runtime 'coreml'"):
        backends.scheme_for(dataclasses.replace(X86, runtime="coreml"))


def test_fp16_keeps_fp32_inputs_and_outputs(tmp_path, fp32_model, fashion):
    fp16 = tmp_path / "m.fp16.onnx"
    convert_fp16(fp32_model, fp16)
    model = onnx.load(str(fp16))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    x = data.to_float(fashion.x_eval[:200]).numpy()
    np.testing.assert_allclose(OrtRunner(fp16, 1, "fp16")(x), OrtRunner(fp32_model, 1, "fp32")(x), atol=0.05, rtol=0.05)


def test_bad_calibration_is_refused_in_one_line(tmp_path, fp32_model, calib):
    scheme = backends.scheme_for(X86)
    with pytest.raises(BadInput, match="calibration set is empty"):
        quantize_qdq(fp32_model, tmp_path / "q.onnx", calib[:0], "minmax", scheme)
    with pytest.raises(BadInput, match=r"calibration images have shape \(1, 32, 32\) but the model takes"):
        quantize_qdq(fp32_model, tmp_path / "q.onnx", torch.zeros(8, 1, 32, 32, dtype=torch.uint8), "minmax", scheme)


def test_a_model_without_quantizable_nodes_is_refused(tmp_path, calib):
    class Pixels(torch.nn.Module):  # logits straight from pixels: nothing for int8 to act on
        def forward(self, x):
            return x.flatten(1)[:, :10] * 2.0

    path = tmp_path / "pool.onnx"
    export_onnx(Pixels(), SPEC, 17, path)
    with pytest.raises(BadInput, match="no quantizable nodes"):
        quantize_qdq(path, tmp_path / "q.onnx", calib, "minmax", backends.scheme_for(X86))


def make_run(tmp_path, fashion, target_text: str, student: torch.nn.Module | None = None, config=None):
    """A run directory whose distill stage is already done, with `student` (an untrained small zoo net by
    default) as student.pt, on a small stratified subset of real Fashion-MNIST."""
    from edgecompress import config as cfg
    from edgecompress.runner import RunContext

    tmp_path.mkdir(parents=True, exist_ok=True)
    i, j = data.stratified_sample(fashion.y_train, 1500, 0), data.stratified_sample(fashion.y_eval, 500, 0)
    npz = tmp_path / "small.npz"
    np.savez(npz, x=fashion.x_train[i, 0].numpy(), y=fashion.y_train[i].numpy(),
             x_test=fashion.x_eval[j, 0].numpy(), y_test=fashion.y_eval[j].numpy())
    toml = tmp_path / "target.toml"
    toml.write_text(target_text)
    conf = config or cfg.RunConfig()
    conf.data, conf.target, conf.distill.student = str(npz), str(toml), "resnet_slim_050"
    conf.teacher.spec, conf.teacher.weights = "resnet18_half", str(WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt")
    ctx = RunContext(tmp_path / "run", conf, quiet=True)
    model = student or small_model()
    spec = {"student": "resnet_slim_050", "input_shape": [1, 28, 28], "num_classes": 10,
            "classes": ctx.data.classes, "mean": model.mean_values, "std": model.std_values}
    (ctx.out / "distill").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "spec": spec}, ctx.out / "distill" / "student.pt")
    return ctx


TRT_TOML = ('name = "jetson-test"\ndescription = "d"\nruntime = "tensorrt"\nprecision = "int8"\n'
            'execution_providers = ["CPUExecutionProvider"]\n')


def test_stage_dispatches_on_the_target(tmp_path, fashion, trained):
    """With the trained student, whose accuracy is well above chance, so that a drop of 0 means the artifact kept
    the function rather than that both models answer one class."""
    import json

    from edgecompress import quantize
    from edgecompress.runner import run_stage

    ctx = make_run(tmp_path / "trt", fashion, TRT_TOML, trained)
    artifact = run_stage(ctx, quantize.STAGE)
    assert artifact == quantize.artifact_path(ctx.out, ctx.target) == ctx.out / "quantize" / "student.int8.onnx"
    record = json.loads((ctx.out / "quantize" / "calibration.json").read_text())
    assert record["scheme"]["name"] == "tensorrt-explicit-qdq" and record["runtime_check"] == {"runtime": "tensorrt", "violations": []}
    assert check_tensorrt_qdq(artifact) == []
    # bias correction is on by default, recorded, and part of the stage's fingerprint
    weighted = [n.name for n in onnx.load(str(artifact)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert record["bias_correction"]["enabled"] and set(record["bias_correction"]["max_abs_shift"]) == set(weighted)
    assert record["tries"][0]["bias_corrected_nodes"] == list(record["bias_correction"]["max_abs_shift"])
    assert quantize.inputs(ctx)["quantize"]["bias_correction"] is True
    assert record["fp32_selection_top1"] > 0.5 and record["tries"][0]["drop_vs_fp32_pt"] < 1.0

    ctx = make_run(tmp_path / "fp16", fashion, TRT_TOML.replace('"int8"', '"fp16"'), trained)
    artifact = run_stage(ctx, quantize.STAGE)
    assert artifact.name == "student.fp16.onnx"
    record = json.loads((ctx.out / "quantize" / "calibration.json").read_text())
    assert record["format"] == "fp16" and record["fp32_eval_top1"] > 0.5
    assert abs(record["tries"][0]["drop_vs_fp32_pt"]) < 1.0


def test_auto_calibration_tries_each_method_through_the_stage_and_keeps_the_closest(tmp_path, fashion, trained):
    """calibration_method = "auto": MinMax, Entropy and Percentile each quantize the student once, each judged
    on the selection images (the one closest to fp32 on the probe images would be the fallback's base)."""
    import json

    from edgecompress import config as cfg
    from edgecompress import quantize
    from edgecompress.runner import run_stage

    config = cfg.RunConfig()
    config.quantize.calibration_method, config.quantize.fallback, config.quantize.qat_epochs = "auto", False, 0
    x86 = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text()
    ctx = make_run(tmp_path, fashion, x86, trained, config)
    run_stage(ctx, quantize.STAGE)
    record = json.loads((ctx.out / "quantize" / "calibration.json").read_text())
    ptq = [t for t in record["tries"] if t["kind"] == "ptq"]
    assert sorted(t["calibration"] for t in ptq) == ["entropy", "minmax", "percentile"] == sorted(
        {t["calibration"] for t in record["tries"]})
    assert all(t["selection_top1"] > 0.5 for t in ptq)  # each a working int8 model of the trained student
    # shipped: the first try that meets the budget, else the most accurate
    meeting = [t for t in ptq if not t["missed"]]
    shipped = meeting[0] if meeting else max(ptq, key=lambda t: t["selection_top1"])
    assert record["chosen_try"] == shipped["try"] and record["method"] == shipped["calibration"]


def test_sensitivity_ranks_the_planted_outlier_first(tmp_path, fashion, calib):
    """One channel blown up 100x after a BatchNorm (and compensated in the next conv): the function is the
    same, but that conv's int8 input is ruined; keeping it in float must help most."""
    from edgecompress import sensitivity
    from edgecompress.quantize import Quantizer

    model = small_model()
    block = model.net.stages[0][0]
    x = data.to_float(fashion.x_eval[:64])
    with torch.no_grad():
        before = model(x)
        sensitivity.plant_outlier_channel(block.bn1, block.conv2, channel=0, factor=100.0)
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    path = tmp_path / "m.onnx"
    export_onnx(model, SPEC, 17, path)
    quantizer = Quantizer(path, tmp_path, calib, backends.scheme_for(X86))
    judge = sensitivity.Judge(path, fashion.x_eval[:200], fashion.y_eval[:200], fashion.x_train[-500:], 1,
                              ("CPUExecutionProvider",))
    ranking = sensitivity.rank_nodes(lambda p, ex: quantizer.quantize(p, "minmax", ex), quantizer.candidates, judge,
                                     tmp_path)
    assert ranking[0]["node"].endswith("stages.0.0/conv2/Conv"), ranking[:3]
    # x86 quantizes conv outputs, so the conv feeding the outlier activation (through its Relu) goes float too
    assert any(n.endswith("stages.0.0/relu/Relu") for n in ranking[0]["excluded"])
    assert any(n.endswith("stages.0.0/conv1/Conv") for n in ranking[0]["excluded"])
    quantizer.quantize(tmp_path / "all.onnx", "minmax")
    assert ranking[0]["probe_sqnr_db"] > judge.probe_sqnr(tmp_path / "all.onnx") + 3


@pytest.mark.slow
def test_fallback_keeps_the_outlier_layer_in_float_and_recovers_the_drop(tmp_path, fashion):
    import json

    from edgecompress import quantize, sensitivity
    from edgecompress.runner import run_stage

    model = train_briefly(small_model(), fashion)
    block = model.net.stages[0][0]
    sensitivity.plant_outlier_channel(block.bn1, block.conv2, channel=0, factor=100.0)
    ctx = make_run(tmp_path, fashion, (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text(), model)
    run_stage(ctx, quantize.STAGE)
    record = json.loads((ctx.out / "quantize" / "calibration.json").read_text())
    first, final = record["tries"][0], record["tries"][record["chosen_try"]]
    assert first["kind"] == "ptq" and first["missed"], first  # per-tensor int8 breaks on the outlier channel
    assert final["kind"] == "fallback" and final["drop_vs_fp32_pt"] < 0.5, final
    assert any(n.endswith("stages.0.0/conv2/Conv") for n in record["excluded_nodes"])
    assert record["sensitivity"][0]["node"].endswith("stages.0.0/conv2/Conv")
    assert all({"selection_top1", "latency_bs1_ms", "excluded_nodes"} <= set(t) for t in record["tries"])
    # the budget counts a drop beyond 0.3 pt only when the sign test says it is not noise (Budget.misses): on the
    # few selection images of this small run the fallback may stay a few images above it, but it recovers nearly
    # all of PTQ's drop
    assert 0.3 < first["drop_vs_fp32_pt"] and final["drop_vs_fp32_pt"] < first["drop_vs_fp32_pt"] / 10


@pytest.mark.slow
def test_eval_labels_cannot_change_what_the_stage_chooses(tmp_path, fashion):
    """The tries are judged on selection images from the training split: the same run with the eval labels
    scrambled records the same tries, scores and choice (a choice made on eval images would follow them)."""
    import json

    from edgecompress import config as cfg
    from edgecompress import quantize, sensitivity
    from edgecompress.runner import run_stage

    model = train_briefly(small_model(), fashion)
    block = model.net.stages[0][0]
    sensitivity.plant_outlier_channel(block.bn1, block.conv2, channel=0, factor=100.0)  # several tries
    x86 = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text()
    records = []
    for name, scramble in (("labels", False), ("scrambled", True)):
        config = cfg.RunConfig()
        config.quantize.qat_epochs = 0  # the PTQ and fallback tries suffice, and QAT would double the test's time
        ctx = make_run(tmp_path / name, fashion, x86, model, config)
        if scramble:
            order = torch.randperm(len(ctx.data.y_eval), generator=torch.Generator().manual_seed(1))
            ctx.data.y_eval = ctx.data.y_eval[order]
        run_stage(ctx, quantize.STAGE)
        record = json.loads((ctx.out / "quantize" / "calibration.json").read_text())
        tries = [{k: t[k] for k in ("kind", "calibration", "excluded_nodes", "selection_top1", "missed")}
                 for t in record["tries"]]
        records.append(tries + [record["chosen_try"], record["selection_images"] + record["samples"]])
    assert len(records[0]) > 3 and records[0] == records[1]
    assert records[0][-1] == 1500 // 5 + 510  # a fifth of the training images, and 51 per class calibrate


def test_qat_prepares_fake_quant_layers_and_strips_back_to_float(fashion):
    """The trained student, so that the rounded model's agreement with the float one is not that of two models
    predicting one class for every image."""
    from edgecompress import qat

    model = trained_student(fashion)
    x = data.to_float(fashion.x_eval[:64])
    prepared = qat.prepare(model, signed_activations=False)
    layers = qat.layers(prepared)
    assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())  # folded, as ONNX export does
    # a block's conv1 and its shortcut read one tensor, which the int8 model quantizes once: one shared quantizer
    assert layers["net.stages.1.0.conv1"].input_quant is layers["net.stages.1.0.shortcut.0"].input_quant
    with torch.no_grad():
        folded = qat.float_copy(prepared)
        assert not any(isinstance(m, (qat.FakeQuantLayer, qat.ActivationFakeQuant)) for m in folded.modules())
        torch.testing.assert_close(folded(x), model(x), rtol=1e-2, atol=5e-3)
        qat.set_input_ranges(prepared, {name: (0.0, 4.0) if name != "net.stem.0" else (-1.0, 3.0)
                                        for name in layers})
        rounded = prepared(x)
    assert not torch.equal(rounded, folded(x))
    assert top1(folded(x), fashion.y_eval[:64]) > 0.5
    assert top1(rounded, folded(x).argmax(1)) > 0.8
    # ONNX Runtime's scale and zero point for a uint8 range: s = (high - low) / 255, z = round(-low / s)
    scale, zero = qat.input_quant_params(prepared)["net.stem.0"]
    assert scale == pytest.approx(4.0 / 255) and zero == round(1.0 / (4.0 / 255))


def _activation_quant_params(path) -> dict[str, tuple[float, int]]:
    """{tensor: (scale, zero point)} of every QuantizeLinear of an activation in a QDQ model."""
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {n.input[0]: (float(values[n.input[1]]), int(values[n.input[2]])) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in values}


@pytest.mark.parametrize("target", [X86, TENSORRT], ids=["x86", "tensorrt"])
def test_qat_artifact_quantizes_with_the_trained_ranges(tmp_path, fashion, calib, target):
    """QAT starts from the quantization PTQ uses, trains the step sizes, and the exported QDQ model quantizes
    each fake-quantized tensor with exactly the trained scale and zero point, so it computes what QAT trained
    (not fresh calibration the network never saw). The student is the trained one, which predicts every class,
    so the artifact's agreement with QAT's simulation is not that of two models answering one class throughout."""
    from edgecompress import qat, quantize

    scheme = backends.scheme_for(target)
    prepared = qat.prepare(trained_student(fashion), signed_activations=scheme.activation_symmetric)
    start = quantize.qat_start(prepared, SPEC, 17, calib, scheme, "percentile", tmp_path / "start")
    inputs = quantize.qat_layer_inputs(start, prepared)
    assert set(inputs) == set(qat.layers(prepared))
    folded = start.quantize(tmp_path / "ptq.onnx", "percentile")
    assert bool(folded) == (target is X86)  # x86 quantizes the raw pixels (inputfold); TensorRT cannot
    pixels = folded["normalized_tensor"] if folded else None
    ptq = _activation_quant_params(tmp_path / "ptq.onnx")
    before = qat.input_quant_params(prepared)
    for layer, tensor in inputs.items():  # the same quantization the PTQ model uses
        if tensor == pixels:  # folded: raw pixels at 1/255, so the normalised input's grid is std * 255 finer
            assert ptq["input"] == (pytest.approx(1 / 255), 0)
            assert before[layer] == (pytest.approx(1 / (folded["std"] * 255)), folded["normalized_zero_point"])
        else:
            assert before[layer][0] == pytest.approx(ptq[tensor][0], rel=1e-5) and before[layer][1] == ptq[tensor][1]

    qat.finetune(prepared, fashion.x_train[:512], fashion.y_train[:512], torch.zeros(512, 10), epochs=1,
                 images=512, lr=1e-4, scale_lr=5e-2, temperature=4.0, alpha=0.5, seed=0)
    trained = qat.input_quant_params(prepared)
    assert any(abs(trained[k][0] / before[k][0] - 1) > 0.01 for k in trained)  # the step sizes moved ...
    assert all(trained[layer] == before[layer] for layer, tensor in inputs.items() if tensor == pixels)  # not this
    quantize.qat_export(prepared, SPEC, 17, calib, scheme, "percentile", tmp_path / "tuned", tmp_path / "qat.onnx")
    exported = _activation_quant_params(tmp_path / "qat.onnx")
    for layer, tensor in inputs.items():
        if tensor != pixels:
            assert exported[tensor][0] == pytest.approx(trained[layer][0], rel=1e-6)
            assert exported[tensor][1] == trained[layer][1]
    if target.runtime == "tensorrt":
        assert check_tensorrt_qdq(tmp_path / "qat.onnx") == []
    x = data.to_float(fashion.x_eval[:300]).numpy()
    int8 = OrtRunner(tmp_path / "qat.onnx", 1, "ort")(x)
    assert top1(int8, fashion.y_eval[:300]) > 0.5
    assert top1(int8, TorchRunner(prepared, 1)(x).argmax(1)) > 0.95  # the artifact runs what QAT simulated


def test_search_qat_records_a_fully_int8_try(tmp_path, fashion, calib):
    import contextlib
    from types import SimpleNamespace

    from edgecompress import config, quantize, sensitivity

    model = small_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, SPEC, 17, path)
    judge = sensitivity.Judge(path, fashion.x_eval[:200], fashion.y_eval[:200], fashion.x_train[-200:], 1,
                              ("CPUExecutionProvider",))
    search = quantize.Search(judge, quantize.Budget(judge.correct(path), 1.0, 0.3, 2.0), tmp_path, lambda line: None)
    inputs = quantize.QatInputs(fashion.x_train[:512], fashion.y_train[:512], lambda: torch.zeros(512, 10), 4.0, 0.5, 0)
    quantize.search_qat(model, SPEC, backends.scheme_for(X86), "percentile", config.QuantizeConfig(qat_images=256),
                        calib, inputs, 17, search, tmp_path,
                        lambda *a, **k: contextlib.nullcontext(SimpleNamespace(update=lambda steps: None)))
    (entry,) = search.tries
    assert search.qat_note == "ran" and entry["kind"] == "qat" and entry["excluded_nodes"] == []
    assert entry["bias_corrected_nodes"] == []  # QAT trained its biases against its int8 weights
    assert {"qat_seconds", "qat_scale_lr", "selection_top1", "latency_bs1_ms"} <= set(entry)
    graph = onnx.load(str(entry["path"])).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert weighted and all(producer[n.input[0]] == "DequantizeLinear" for n in weighted)  # no layer left in float


def conv_fc_model(path: Path) -> dict[str, np.ndarray]:
    """A hand-built ONNX model, input -> Conv 3x3 (4 channels, no padding) -> Relu -> Flatten -> Gemm -> logits,
    with random weights and biases (returned), so the tests below can work out its arithmetic in numpy."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 4).astype(np.float32),
              "w2": rng.normal(0, 0.05, (10, 4 * 26 * 26)).astype(np.float32),
              "b2": rng.normal(0, 0.1, 10).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv", kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
         helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1)],
        "conv_fc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in params.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return params


def _dequantized(path: Path, node_name: str, position: int) -> np.ndarray:
    """Input `position` of node `node_name` of a QDQ model: a float initializer, or what a DequantizeLinear of
    initializers gives (per channel along axis 0, which is how both the weights and the biases here are laid out)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    name = next(n for n in graph.node if n.name == node_name).input[position]
    if name in inits:
        return inits[name]
    dq = next(n for n in graph.node if name in n.output)
    q, scale, zero = (inits[i] for i in dq.input)
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def test_bias_correction_cancels_the_mean_shift_int8_weights_cause(tmp_path, calib):
    """Empirical bias correction (Nagel et al. 2019, sec. 4.2), checked against numpy: for each layer the
    correction is -E[(W_q - W) x] over the calibration images (x: the fp32 layer input, W_q: ORT's per-channel
    symmetric int8 rounding, scale max|W_c| / 127, round half to even), the artifact carries it in its bias, and
    with it each layer's mean output error per channel on those images is smaller than without it."""
    from numpy.lib.stride_tricks import sliding_window_view

    from edgecompress.quantize import Quantizer

    params = conv_fc_model(tmp_path / "m.onnx")
    x = data.to_float(calib).numpy().astype(np.float64)
    windows = sliding_window_view(x, (3, 3), axis=(2, 3))  # (N, 1, 26, 26, 3, 3)

    def conv(w):
        return np.einsum("nihwkl,oikl->nohw", windows, w)

    hidden = np.maximum(conv(params["w1"]) + params["b1"][None, :, None, None], 0).reshape(len(x), -1)
    rounded = {}
    for key in ("w1", "w2"):
        w = params[key].astype(np.float64)
        scale = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32).astype(np.float64)
        scale = scale.reshape((-1,) + (1,) * (w.ndim - 1))
        rounded[key] = np.clip(np.round(w / scale), -127, 127) * scale
    shift_conv = conv(rounded["w1"] - params["w1"]).mean(axis=(0, 2, 3))
    shift_fc = hidden.mean(0) @ (rounded["w2"] - params["w2"]).T

    scheme = backends.scheme_for(X86)
    plain, corrected = tmp_path / "plain", tmp_path / "corrected"
    plain.mkdir(), corrected.mkdir()
    Quantizer(tmp_path / "m.onnx", plain, calib, scheme).quantize(plain / "q.onnx", "minmax")
    quantizer = Quantizer(tmp_path / "m.onnx", corrected, calib, scheme, bias_correction=True)
    quantizer.quantize(corrected / "q.onnx", "minmax")

    corrections = quantizer.corrections_for("minmax")
    np.testing.assert_allclose(corrections["conv"], -shift_conv, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(corrections["fc"], -shift_fc, rtol=1e-4, atol=1e-7)
    for folder in (plain, corrected):  # ORT rounded the weights as computed above, with or without correction
        np.testing.assert_allclose(_dequantized(folder / "q.onnx", "conv", 1), rounded["w1"], rtol=1e-6)
        np.testing.assert_allclose(_dequantized(folder / "q.onnx", "fc", 1), rounded["w2"], rtol=1e-6)

    def mean_error(folder: Path) -> dict[str, np.ndarray]:
        """Per layer and output channel: E[W_q x + b_q] - E[W x + b] over the calibration images, fp32 inputs."""
        q = folder / "q.onnx"
        return {"conv": shift_conv + _dequantized(q, "conv", 2) - params["b1"],
                "fc": shift_fc + _dequantized(q, "fc", 2) - params["b2"]}

    before, after = mean_error(plain), mean_error(corrected)
    for layer in ("conv", "fc"):
        assert np.abs(after[layer]).sum() < np.abs(before[layer]).sum() / 10, (layer, before[layer], after[layer])
    # the fallback keeps a node in float with its own bias; the other nodes stay corrected
    quantizer.quantize(corrected / "q.onnx", "minmax", exclude=["fc"])
    np.testing.assert_array_equal(_dequantized(corrected / "q.onnx", "fc", 2), params["b2"])
    assert np.abs(mean_error(corrected)["conv"]).sum() < np.abs(before["conv"]).sum() / 10
