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
from . import files
from .errors import BadInput
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


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: torch.Tensor, method: str, activation_type: str,
                 weight_type: str, per_channel: bool, exclude: list[str] | None = None, on_batch=None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if len(calibration) == 0:
        raise BadInput("the calibration set is empty: raise quantize.calibration_size or give more training images")
    with files.atomic_path(out_path.with_suffix(".pre.onnx")) as pre, files.atomic_path(out_path) as tmp:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), CalibrationReader(calibration, on_batch=on_batch), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=types[activation_type],
                        weight_type=types[weight_type], calibrate_method=methods[method],
                        nodes_to_exclude=exclude or [],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": activation_type == "int8"})
        onnx.checker.check_model(str(tmp))
    out_path.with_suffix(".pre.onnx").unlink(missing_ok=True)


def top1(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels.numpy()).mean())


def inputs(ctx: RunContext) -> dict:
    target = ctx.target
    return {"quantize": ctx.config.quantize.__dict__, "seed": ctx.config.seed, "data": ctx.data.sha256_16,
            "student": ctx.out / "distill" / "student.pt", "opset": target.opset,
            "scheme": [target.activation_type, target.weight_type, target.per_channel]}


def run(ctx: RunContext) -> Path:
    conf, target, ds = ctx.config.quantize, ctx.target, ctx.data
    out_dir = ctx.stage_dir("quantize")
    model, spec = load_student(ctx.out / "distill" / "student.pt", ctx.config.distill.student)
    fp32_path, int8_path = out_dir / "student.fp32.onnx", out_dir / "student.int8.onnx"
    export_onnx(model, spec, target.opset, fp32_path)

    calib_idx = datasets.stratified_sample(ds.y_train, conf.calibration_size, ctx.config.seed)
    began = time.perf_counter()
    ctx.log(f"[quantize] calibrating on {len(calib_idx)} training images ({conf.calibration_method})")
    with ctx.progress(None, "calibration", length=-(-len(calib_idx) // 64)) as bar:
        quantize_qdq(fp32_path, int8_path, ds.x_train[calib_idx], conf.calibration_method, target.activation_type,
                     target.weight_type, target.per_channel, on_batch=lambda: bar.update(1))
    seconds = time.perf_counter() - began

    fp32_top1 = top1(predict(OrtRunner(fp32_path, 2, "onnxruntime-fp32"), ds.x_eval, 1000), ds.y_eval)
    int8_top1 = top1(predict(OrtRunner(int8_path, 2, "onnxruntime-int8"), ds.x_eval, 1000), ds.y_eval)
    counts = np.bincount(ds.y_train[calib_idx].numpy(), minlength=ds.num_classes).tolist()
    files.write_json(out_dir / "calibration.json", {
        "format": "QDQ", "method": conf.calibration_method, "samples": len(calib_idx),
        "samples_per_class": dict(zip(ds.classes, counts)), "seed": ctx.config.seed,
        "activations": target.activation_type, "weights": target.weight_type, "per_channel": target.per_channel,
        "excluded_nodes": [], "fp32_eval_top1": fp32_top1,
        "tries": [{"excluded_nodes": [], "eval_top1": int8_top1, "drop_vs_fp32_pt": round((fp32_top1 - int8_top1) * 100, 3),
                   "seconds": round(seconds, 2)}]})
    ctx.log(f"[quantize] eval top-1: fp32 {fp32_top1:.4f}, int8 {int8_top1:.4f}")
    return int8_path


STAGE = Stage("quantize", run, inputs)
