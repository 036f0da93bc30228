"""Quantize stage: fp32 ONNX of the student, then ONNX Runtime static int8 QDQ with real calibration images."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgecompress.models.loaders import build_model

from . import data as datasets
from . import files, schemes
from .errors import BadInput, StageFailed
from .qdq_check import check_tensorrt_qdq
from .runner import RunContext, Stage
from .runners import OrtRunner, predict


def load_student(path: Path, student_spec: str) -> tuple[torch.nn.Module, dict]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = saved["spec"]
    model, _ = build_model(student_spec, "", spec["input_shape"][0], spec["num_classes"], spec["mean"], spec["std"],
                           role="student")
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec


def export_onnx(model: torch.nn.Module, spec: dict, opset: int, path: Path) -> None:
    """fp32 ONNX with a dynamic batch axis; input `input` takes [0, 1] pixels, output `logits`."""
    example = torch.zeros(1, *spec["input_shape"])
    with files.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: deterministic, and needs no onnxscript for these plain CNNs.
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(tmp))
        meta = {"edgecompress.input": "float32 NCHW pixels in [0, 1]; normalisation is inside the graph",
                "edgecompress.mean": str(spec["mean"]), "edgecompress.std": str(spec["std"]),
                "edgecompress.classes": ",".join(spec["classes"])}
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


class CalibrationReader:
    """Feeds ORT's calibrator batches of real training images (onnxruntime.quantization.CalibrationDataReader)."""

    def __init__(self, images: torch.Tensor, batch: int = 64, on_batch=None):
        self.batches = [datasets.to_float(images[i:i + batch]).numpy() for i in range(0, len(images), batch)]
        self.position = 0
        self.on_batch = on_batch

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        if self.on_batch:
            self.on_batch()
        return {"input": self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


QUANT_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ARTIFACT_NAMES = {"int8": "student.int8.onnx", "fp16": "student.fp16.onnx", "fp32": "student.fp32.onnx"}


def artifact_path(out: Path, target) -> Path:
    """Where the quantize stage leaves the model the export stage reads, for a target's precision."""
    return out / "quantize" / ARTIFACT_NAMES[schemes.for_target(target).precision]


def quantizable_nodes(model_path: Path) -> list[str]:
    """Names of the nodes int8 quantization acts on first: the weighted ones (Conv, Gemm, MatMul)."""
    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in WEIGHTED_OPS]


def check_calibration(calibration: torch.Tensor, model_path: Path) -> None:
    """The calibration images must exist and have the shape the model's input takes."""
    if len(calibration) == 0:
        raise BadInput("the calibration set is empty: raise quantize.calibration_size or give more training images")
    dims = onnx.load(str(model_path)).graph.input[0].type.tensor_type.shape.dim[1:]
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    got = tuple(calibration.shape[1:])
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise BadInput(f"calibration images have shape {got} but the model takes {expected}: calibrate with "
                       "images of the training data's shape (quantize.calibration_data)")


def calibration_options(method: str) -> dict:
    """extra_options that configure ORT's calibrator itself (percentile: 99.999th, ORT's default)."""
    return {"CalibPercentile": 99.999} if method == "percentile" else {}


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: torch.Tensor, method: str, scheme: schemes.Scheme,
                 exclude: list[str] | None = None, cache: Path | None = None, on_batch=None) -> None:
    """Static int8 QDQ with ONNX Runtime's quantize_static under `scheme`, keeping the `exclude` nodes in float.

    `cache`: a calibration-ranges file (ORT's calibration_cache_path): calibration runs once and every later call
    with the same cache reuses its ranges, so the fallback's tries cost a quantization each, not a calibration.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    check_calibration(calibration, fp32_path)
    if not quantizable_nodes(fp32_path):
        raise BadInput(f"{fp32_path.name} has no quantizable nodes (Conv, Gemm or MatMul): int8 cannot speed it up; "
                       "use a target with precision = \"fp32\" or \"fp16\"")
    reader = CalibrationReader(calibration, on_batch=on_batch)
    with files.atomic_path(out_path.with_suffix(".pre.onnx")) as pre, files.atomic_path(out_path) as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel,
                        activation_type=types[scheme.activation_type], weight_type=types[scheme.weight_type],
                        calibrate_method=methods[method], nodes_to_exclude=list(exclude or []),
                        extra_options=scheme.extra_options() | calibration_options(method),
                        calibration_cache_path=str(cache) if cache else None)
        onnx.checker.check_model(str(tmp))
    out_path.with_suffix(".pre.onnx").unlink(missing_ok=True)


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and compute; inputs and outputs stay fp32 so callers feed and read the same arrays."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with files.atomic_path(out_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        _sort_topologically(model.graph)
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it; ORT's fp16 converter
    appends its input casts at the end)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise StageFailed("the fp16 graph has a cycle or a dangling input")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def top1(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels.numpy()).mean())


def inputs(ctx: RunContext) -> dict:
    return {"quantize": ctx.config.quantize.__dict__, "seed": ctx.config.seed, "data": ctx.data.sha256_16,
            "student": ctx.out / "distill" / "student.pt", "opset": ctx.target.opset,
            "scheme": schemes.for_target(ctx.target).to_dict()}


def run(ctx: RunContext) -> Path:
    conf, target, ds = ctx.config.quantize, ctx.target, ctx.data
    scheme = schemes.for_target(target)
    out_dir = ctx.stage_dir("quantize")
    model, spec = load_student(ctx.out / "distill" / "student.pt", ctx.config.distill.student)
    fp32_path, artifact = out_dir / ARTIFACT_NAMES["fp32"], out_dir / ARTIFACT_NAMES[scheme.precision]
    export_onnx(model, spec, target.opset, fp32_path)
    fp32_top1 = top1(predict(OrtRunner(fp32_path, 2, "onnxruntime-fp32"), ds.x_eval, 1000), ds.y_eval)
    record = {"scheme": scheme.to_dict(), "fp32_eval_top1": fp32_top1, "seed": ctx.config.seed}
    if scheme.precision != "int8":
        if scheme.precision == "fp16":
            convert_fp16(fp32_path, artifact)
        top = top1(predict(OrtRunner(artifact, 2, f"onnxruntime-{scheme.precision}"), ds.x_eval, 1000), ds.y_eval)
        files.write_json(out_dir / "calibration.json", record | {"format": scheme.precision, "samples": 0,
                         "excluded_nodes": [], "tries": [{"excluded_nodes": [], "eval_top1": top,
                                                          "drop_vs_fp32_pt": round((fp32_top1 - top) * 100, 3)}]})
        return artifact

    calib_idx = datasets.stratified_sample(ds.y_train, conf.calibration_size, ctx.config.seed)
    began = time.perf_counter()
    ctx.log(f"[quantize] {scheme.name}: calibrating on {len(calib_idx)} training images ({conf.calibration_method})")
    with ctx.progress(None, "calibration", length=-(-len(calib_idx) // 64)) as bar:
        quantize_qdq(fp32_path, artifact, ds.x_train[calib_idx], conf.calibration_method, scheme,
                     on_batch=lambda: bar.update(1))
    seconds = time.perf_counter() - began
    if target.runtime == "tensorrt":
        violations = check_tensorrt_qdq(artifact)
        if violations:
            raise StageFailed(f"the int8 model breaks TensorRT's Q/DQ rules: {violations[0]}"
                              f"{f' (and {len(violations) - 1} more)' if len(violations) > 1 else ''}")
        record["tensorrt_qdq_check"] = "passed"

    int8_top1 = top1(predict(OrtRunner(artifact, 2, "onnxruntime-int8"), ds.x_eval, 1000), ds.y_eval)
    counts = np.bincount(ds.y_train[calib_idx].numpy(), minlength=ds.num_classes).tolist()
    files.write_json(out_dir / "calibration.json", record | {
        "format": "QDQ", "method": conf.calibration_method, "samples": len(calib_idx),
        "samples_per_class": dict(zip(ds.classes, counts)),
        "activations": scheme.activation_type, "weights": scheme.weight_type, "per_channel": scheme.per_channel,
        "excluded_nodes": [],
        "tries": [{"excluded_nodes": [], "eval_top1": int8_top1, "drop_vs_fp32_pt": round((fp32_top1 - int8_top1) * 100, 3),
                   "seconds": round(seconds, 2)}]})
    ctx.log(f"[quantize] eval top-1: fp32 {fp32_top1:.4f}, int8 {int8_top1:.4f}")
    return artifact


STAGE = Stage("quantize", run, inputs)
