"""Quantize stage: fp32 ONNX of the student, then ONNX Runtime static int8 QDQ with real calibration images."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgecompress.models.loaders import build_model

from . import data as datasets
from . import backends, distill, files, inputfold, schemes, sensitivity
from .errors import BadInput, StageFailed
from .runner import RunContext, Stage
from .backends.onnxruntime import OrtRunner
from .runners import TorchRunner, predict


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
        # equal batches: ORT's histogram calibrators (Entropy, Percentile) stack every batch of a tensor
        batch = max(d for d in range(1, batch + 1) if len(images) % d == 0) if len(images) else batch
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


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops whose quantized output ORT gives their input's scale and zero point (its QDQDirect8BitOp family)
SHARED_QUANTIZATION_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "AveragePool", "MaxPool",
                           "Slice", "TopK")
ARTIFACT_NAMES = {"int8": "student.int8.onnx", "fp16": "student.fp16.onnx", "fp32": "student.fp32.onnx"}


def artifact_path(out: Path, target) -> Path:
    """Where the quantize stage leaves the model the export stage reads, for a target's precision."""
    return out / "quantize" / ARTIFACT_NAMES[backends.scheme_for(target).precision]


def quantizable_nodes(model_path: Path) -> list[str]:
    """Names of the nodes int8 quantization acts on first: the weighted ones (Conv, Gemm, MatMul)."""
    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in WEIGHTED_OPS]


def float_groups(model_path: Path, scheme: schemes.Scheme) -> dict[str, list[str]]:
    """For each weighted node, the nodes to exclude so that it runs in float on a float input: itself, the Relu /
    Clip chain feeding it (ONNX Runtime quantizes their outputs), and the weighted node behind that chain when
    the scheme quantizes weighted nodes' outputs (x86: Conv -> Q/DQ -> Conv, the Relu folded away)."""
    graph = onnx.load(str(model_path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    groups = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        group, feeding = [node.name], producer.get(node.input[0])
        while feeding is not None and feeding.op_type in ("Relu", "Clip"):
            group.append(feeding.name)
            feeding = producer.get(feeding.input[0])
        if feeding is not None and feeding.op_type in WEIGHTED_OPS and feeding.op_type not in scheme.float_outputs:
            group.append(feeding.name)
        groups[node.name] = group
    return groups


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


def quant_types():
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


def calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibration_options(method: str) -> dict:
    """extra_options that configure ORT's calibrator itself (percentile: 99.999th, ORT's default)."""
    return {"CalibPercentile": 99.999} if method == "percentile" else {}


BIAS_CORRECTED_OPS = ("Conv", "Gemm")


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{node: its weights as the QDQ `model` computes with them}: for each Conv / Gemm whose weight input is a
    DequantizeLinear of initializers, (q - zero_point) * scale, per tensor or along the DequantizeLinear's axis."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found = {}
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type in BIAS_CORRECTED_OPS and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input):
            continue
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        zero = inits[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(scale)
        if scale.ndim == 1 and q.ndim > 1:  # per channel: broadcast along the axis
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        found[node.name] = (q - zero) * scale
    return found


def linear_part(node: onnx.NodeProto, x: np.ndarray, weight: np.ndarray) -> torch.Tensor | None:
    """What a Conv or Gemm computes from input `x` with `weight`, without bias and without Gemm's beta (float64);
    None for what it does not model (Conv with auto_pad, Gemm with transA)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x, w = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(weight)
    if node.op_type == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or x.dim() not in (3, 4, 5):
            return None
        spatial = x.dim() - 2
        pads = attrs.get("pads", [0] * 2 * spatial)
        # ONNX pads are (begin of each axis..., end of each axis...); F.pad wants (begin, end) from the last axis
        x = torch.nn.functional.pad(x, [p for axis in reversed(range(spatial)) for p in (pads[axis],
                                                                                       pads[axis + spatial])])
        conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[spatial - 1]
        return conv(x, w, None, attrs.get("strides", 1), 0, attrs.get("dilations", 1), attrs.get("group", 1))
    if attrs.get("transA", 0):
        return None
    return attrs.get("alpha", 1.0) * x @ (w.T if attrs.get("transB", 0) else w)


def bias_corrections(prepared: Path, quantized: Path, calibration: torch.Tensor,
                     workdir: Path) -> dict[str, np.ndarray]:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
    Bias Correction", sec. 4.2; Banner et al. 2019): int8 rounding of a layer's weights shifts the mean of its
    outputs, E[W_q x] - E[W x] = E[(W_q - W) x], and the next layers see that shift as a bias. Returns, for each
    Conv / Gemm with a bias, the change that cancels it per output channel, -E_x[((W_q - W) x)_c], with x the
    layer's input in the fp32 model over the calibration images and W_q the weights exactly as ORT rounded them in
    `quantized` (a QDQ model of `prepared`)."""
    model = onnx.load(str(prepared))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rounded = dequantized_weights(onnx.load(str(quantized)))
    nodes = [n for n in graph.node if n.name in rounded and len(n.input) > 2 and n.input[2] in inits
             and n.input[1] in inits]
    if not nodes:
        return {}
    known = {o.name for o in graph.output}
    for name in dict.fromkeys(n.input[0] for n in nodes):
        if name not in known:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = workdir / "bias-correction-inputs.onnx"
    onnx.save(model, str(probe))
    runner = OrtRunner(probe, 1, "onnxruntime")
    outputs = [o.name for o in runner.session.get_outputs()]
    error = {n.name: rounded[n.name] - numpy_helper.to_array(inits[n.input[1]]).astype(np.float64) for n in nodes}
    batches = CalibrationReader(calibration).batches  # equal sizes: the mean of batch means is the mean
    means: dict[str, np.ndarray] = {}
    for batch in batches:
        values = dict(zip(outputs, runner.session.run(None, {runner.input_name: batch})))
        for node in nodes:
            shift = linear_part(node, values[node.input[0]], error[node.name])
            if shift is not None:
                per_channel = shift.mean(dim=[d for d in range(shift.dim()) if d != 1]).numpy()
                means[node.name] = means.get(node.name, 0) + per_channel / len(batches)
    del runner
    probe.unlink()
    # only biases with one value per output channel (a broadcast scalar bias cannot take a per-channel shift)
    return {name: -mean for name, mean in means.items()
            if numpy_helper.to_array(inits[next(n for n in nodes if n.name == name).input[2]]).size == mean.size}


def with_bias_corrections(prepared: Path, corrections: dict[str, np.ndarray], out_path: Path) -> None:
    """`prepared` with each named node's bias changed by its correction (divided by Gemm's beta), at `out_path`."""
    model = onnx.load(str(prepared))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in corrections:
            continue
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
        bias = inits[node.input[2]]
        value = numpy_helper.to_array(bias)
        changed = value.astype(np.float64) + corrections[node.name].reshape(value.shape) / beta
        bias.CopyFrom(numpy_helper.from_array(changed.astype(value.dtype), bias.name))
    onnx.save(model, str(out_path))


def float_outputs(model: onnx.ModelProto) -> None:
    """Drop the QuantizeLinear -> DequantizeLinear pair between a Gemm and a graph output, in place (the outputs
    so kept in float are read back from the file by float_output_names). quantize_static quantizes the logits
    too; that only adds rounding: at 8 bits two top logits can become equal (18 of the 10,000 Fashion-MNIST test
    images with the default student) and argmax then picks the lower class. ONNX Runtime still runs the Gemm as
    an int8 QGemm, with float output, one operator fewer. Only Gemm: a Conv feeding an output has no int8 kernel
    with float output in ORT's CPU provider, so it would fall back to float."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for node in graph.node for name in node.input)
    kept = []
    for output in graph.output:
        dq = producer.get(output.name)
        q = dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0])
        gemm = q and q.op_type == "QuantizeLinear" and readers.get(q.output[0]) == 1 and producer.get(q.input[0])
        if not gemm or gemm.op_type != "Gemm" or readers.get(gemm.output[0]) != 1:
            continue
        gemm.output[0] = output.name
        graph.node.remove(q)
        graph.node.remove(dq)
        kept.append(output.name)
    if kept:
        inputfold.drop_unused(graph)


def float_output_names(model_path: Path) -> list[str]:
    """The graph outputs of a QDQ model that no DequantizeLinear produces (computed in float)."""
    graph = onnx.load(str(model_path)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return [o.name for o in graph.output if producer.get(o.name) != "DequantizeLinear"]


class Quantizer:
    """One fp32 model prepared for ONNX Runtime once (quant_pre_process) and calibrated once per method; each
    `quantize` after that reuses the ranges (ORT's calibration_cache_path), so the fallback's tries cost one
    quantization each, not one calibration each. Files live in `workdir`, which the caller owns."""

    def __init__(self, fp32_path: Path, workdir: Path, calibration: torch.Tensor, scheme: schemes.Scheme,
                 on_batch=None, bias_correction: bool = False):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        check_calibration(calibration, fp32_path)
        if not quantizable_nodes(fp32_path):
            raise BadInput(f"{fp32_path.name} has no quantizable nodes (Conv, Gemm or MatMul): int8 cannot speed it "
                           "up; use a target with precision = \"fp32\" or \"fp16\"")
        self.workdir, self.calibration, self.scheme, self.on_batch = workdir, calibration, scheme, on_batch
        self.prepared = workdir / "prepared.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(self.prepared), skip_symbolic_shape=True)
        self.candidates = float_groups(self.prepared, scheme)
        self.bias_correction = bias_correction
        self.corrections: dict[str, dict[str, np.ndarray]] = {}  # per calibration method (see corrections_for)

    def quantize(self, out_path: Path, method: str, exclude: list[str] | tuple[str, ...] = (),
                 fixed: dict[str, tuple[float, int]] | None = None) -> dict | None:
        """Static int8 QDQ of the prepared model under the scheme, keeping the `exclude` nodes in float, with the
        input normalisation folded into the input's quantization where the scheme allows it (inputfold) and the
        logits of a final Gemm left in float (float_outputs); the activations named in `fixed` ({tensor: (scale,
        zero point)}) take those parameters instead of calibrated ones (ORT's TensorQuantOverrides). With
        bias_correction, the int8 nodes' biases are corrected first (see corrections_for; the float nodes keep
        theirs). Returns what was folded, or None."""
        source = self.prepared
        if self.bias_correction:
            corrections = {node: shift for node, shift in self.corrections_for(method).items() if node not in exclude}
            source = self.workdir / "bias-corrected.onnx"
            with_bias_corrections(self.prepared, corrections, source)
        return self._quantize(source, out_path, method, exclude, fixed)

    def corrections_for(self, method: str) -> dict[str, np.ndarray]:
        """{node: bias change} of empirical bias correction (bias_corrections) for the weights ORT rounds when it
        quantizes the prepared model calibrated with `method` (computed once per method; the calibrated ranges
        stay those of the uncorrected model, so every try of a method shares them)."""
        if method not in self.corrections:
            with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".bias-") as tmp:
                plain = Path(tmp) / "int8.onnx"
                self._quantize(self.prepared, plain, method, (), None)
                self.corrections[method] = bias_corrections(self.prepared, plain, self.calibration, Path(tmp))
        return self.corrections[method]

    def _quantize(self, source: Path, out_path: Path, method: str, exclude: list[str] | tuple[str, ...],
                  fixed: dict[str, tuple[float, int]] | None) -> dict | None:
        from onnxruntime.quantization import QuantFormat, quantize_static

        reader = None if self._cache(method).is_file() else CalibrationReader(self.calibration, on_batch=self.on_batch)
        scheme = self.scheme
        activation = quant_types()[scheme.activation_type]
        zero_type = np.int8 if scheme.activation_type == "int8" else np.uint8
        overrides = {name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, zero_type)}]
                     for name, (scale, zero) in (fixed or {}).items()}
        with files.atomic_path(out_path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(source), str(tmp), reader, quant_format=QuantFormat.QDQ,
                            per_channel=scheme.per_channel, activation_type=activation,
                            weight_type=quant_types()[scheme.weight_type], calibrate_method=calibration_method(method),
                            nodes_to_exclude=list(exclude), calibration_cache_path=str(self._cache(method)),
                            extra_options=scheme.extra_options() | calibration_options(method)
                            | ({"TensorQuantOverrides": overrides} if overrides else {}))
            proto = onnx.load(str(tmp))
            folded = inputfold.fold_input_normalization(proto)
            float_outputs(proto)
            if scheme.graph_edit:  # the runtime's own Q/DQ placement (e.g. TensorRT's residual Adds)
                backends.QDQ_EDITS[scheme.graph_edit](proto)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
        return folded

    def _cache(self, method: str) -> Path:
        return self.workdir / f"ranges-{method}.json"

    def input_fold(self, method: str) -> dict | None:
        """What `quantize` folds of the input normalisation (see inputfold), or None."""
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".calibrate-") as tmp:
            return self.quantize(Path(tmp) / "int8.onnx", method)

    def ranges(self, method: str) -> dict[str, tuple[float, float]]:
        """{tensor: (low, high)}: the real ranges `method` calibrates for the prepared model's activations."""
        from onnxruntime.quantization.calibrate import load_tensors_data

        if not self._cache(method).is_file():
            self.input_fold(method)  # calibrates, filling the cache
        data = load_tensors_data(self._cache(method)).data
        return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1]))) for name, t in data.items()}

    def layer_inputs(self, weights: dict[str, np.ndarray]) -> dict[str, str]:
        """{layer: the activation tensor whose quantization parameters its input gets in the prepared model} for
        layers given by their weights ({layer: weight array}), found by the weighted node whose weight initializer
        equals it: matching by value holds whatever names the exporter gave (the weights are the layers' own,
        exported unchanged). From that node's input it walks back through the ops ORT quantizes with their input's
        parameters (Flatten, Reshape, pooling, ...), since an override only counts on the tensor they come from."""
        graph = onnx.load(str(self.prepared)).graph
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        found = {}
        for node in graph.node:
            weight = initializers.get(node.input[1]) if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else None
            if weight is None:
                continue
            candidates = [name for name, w in weights.items() if w.shape == weight.shape and np.array_equal(w, weight)
                          or w.T.shape == weight.shape and np.array_equal(w.T, weight)]
            if len(candidates) == 1:
                tensor = node.input[0]
                while tensor in producer and producer[tensor].op_type in SHARED_QUANTIZATION_OPS:
                    tensor = producer[tensor].input[0]
                found[candidates[0]] = tensor
        missing = sorted(set(weights) - set(found))
        if missing:
            raise StageFailed(f"{self.prepared.name}: no weighted node with the weights of {', '.join(missing[:3])}")
        return found


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: torch.Tensor, method: str, scheme: schemes.Scheme,
                 exclude: list[str] | None = None, on_batch=None) -> None:
    """One static int8 QDQ quantization of `fp32_path` (see Quantizer), leaving no temporary files."""
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as work:
        Quantizer(fp32_path, Path(work), calibration, scheme, on_batch).quantize(out_path, method, exclude or [])


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
            "scheme": backends.scheme_for(ctx.target).to_dict(), "budgets": ctx.target.budgets.__dict__,
            "threads": ctx.target.threads, **ctx.teacher_inputs}


@dataclass
class Budget:
    """When an int8 model is good enough: within `max_drop_vs_fp32` points of the fp32 student and, where the
    fp32 student itself is within the target's budget of the teacher, within that budget too.

    A drop counts against the fp32 student only when it is also beyond noise: the images the int8 model gets
    wrong and fp32 right (b) outnumber the reverse (c) by more than 1.96 sqrt(b + c), the two-sided 95% sign
    (McNemar) test; on a small selection split a few flipped images do not start the fallback."""

    fp32_correct: np.ndarray
    teacher_top1: float
    max_drop_vs_fp32: float
    max_drop_vs_teacher: float

    @property
    def fp32_top1(self) -> float:
        return float(self.fp32_correct.mean())

    @property
    def teacher_reachable(self) -> bool:
        return (self.teacher_top1 - self.fp32_top1) * 100 <= self.max_drop_vs_teacher

    def misses(self, correct: np.ndarray) -> list[str]:
        failed = []
        top1 = float(correct.mean())
        drop = (self.fp32_top1 - top1) * 100
        lost, gained = int((self.fp32_correct & ~correct).sum()), int((~self.fp32_correct & correct).sum())
        if drop > self.max_drop_vs_fp32 + 1e-9 and lost - gained > 1.96 * np.sqrt(lost + gained):
            failed.append(f"{drop:.2f} pt below the fp32 student > quantize.max_drop_vs_fp32 {self.max_drop_vs_fp32}")
        drop = (self.teacher_top1 - top1) * 100
        if self.teacher_reachable and drop > self.max_drop_vs_teacher + 1e-9:
            failed.append(f"{drop:.2f} pt below the teacher > max_accuracy_drop {self.max_drop_vs_teacher}")
        return failed


class Search:
    """The tries of one quantize run, each judged and recorded (calibration.json's "tries")."""

    def __init__(self, judge: sensitivity.Judge, budget: Budget, workdir: Path, log):
        self.judge, self.budget, self.workdir, self.log = judge, budget, workdir, log
        self.tries: list[dict] = []
        self.ranking: list[dict] = []
        self.qat_note = "not needed"
        self.quantizer: Quantizer | None = None  # the PTQ tries' (search_int8 sets it)
        self.fp32_latency = judge.latency(judge.fp32_path)

    def judge_try(self, path: Path, kind: str, method: str, excluded: list[str], **extra) -> dict:
        correct = self.judge.correct(path)
        top = float(correct.mean())
        entry = {"try": len(self.tries), "kind": kind, "calibration": method, "excluded_nodes": list(excluded),
                 "selection_top1": top, "drop_vs_fp32_pt": round((self.budget.fp32_top1 - top) * 100, 3),
                 "drop_vs_teacher_pt": round((self.budget.teacher_top1 - top) * 100, 3),
                 "probe_sqnr_db": round(self.judge.probe_sqnr(path), 3),
                 "latency_bs1_ms": round(self.judge.latency(path), 4), **extra,
                 "missed": self.budget.misses(correct), "path": path}
        self.tries.append(entry)
        self.log(f"[quantize] try {entry['try']} ({kind}, {method}, {len(excluded)} float nodes): top-1 {top:.4f}, "
                 f"{entry['drop_vs_fp32_pt']:+.2f} pt vs fp32, {entry['latency_bs1_ms']:.3f} ms"
                 f"{'' if entry['missed'] else ', meets the budget'}")
        return entry

    def gave_back_half_the_speed(self, entry: dict) -> bool:
        """The float nodes cost more than half of what int8 gained over fp32 (vs the first int8 try)."""
        fastest = self.tries[0]["latency_bs1_ms"]
        return entry["latency_bs1_ms"] - fastest > (self.fp32_latency - fastest) / 2 > 0

    def chosen(self) -> dict:
        """The first try that meets the budget, else the most accurate; among equals the one with fewest nodes in
        float, then the earliest (not the quick latency: a timing would make the same seed choose differently)."""
        meeting = [t for t in self.tries if not t["missed"]]
        return meeting[0] if meeting else max(self.tries, key=lambda t: (t["selection_top1"],
                                                                         -len(t["excluded_nodes"]), -t["try"]))


def split_training_images(labels: torch.Tensor, conf, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, str]:
    """Calibration, selection and probe images, disjoint and drawn from the training split (stratified), and a
    note of which split chooses and which reports. The tries are chosen on the selection images, never on the
    eval images verify reports: a choice among tries made on the reported images biases what is reported, more
    with every try. The selection takes at most a fifth of the training images, so that QAT keeps most of them.
    With too few training images the probe reuses the calibration images (it needs no labels), and the selection
    falls back to the calibration images only when nothing else is left."""
    calib_idx = datasets.stratified_sample(labels, conf.calibration_size, seed)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[calib_idx] = False
    pool = rest.nonzero().flatten()
    if not len(pool):
        return calib_idx, calib_idx, calib_idx, ("tries chosen on the calibration images (no other training "
                                                 "images); the eval split only reports")
    wanted = min(conf.selection_size, max(1, len(labels) // 5))
    select_idx = pool[datasets.stratified_sample(labels[pool], wanted, seed)]
    rest[select_idx] = False
    pool = rest.nonzero().flatten()
    probe_idx = pool[datasets.stratified_sample(labels[pool], conf.probe_size, seed)] if len(pool) else calib_idx
    return calib_idx, select_idx, probe_idx, ("tries chosen on selection images drawn from the training split, "
                                              "apart from calibration and probe images; the eval split only reports")


def run(ctx: RunContext) -> Path:
    conf, target, ds = ctx.config.quantize, ctx.target, ctx.data
    scheme = backends.scheme_for(target)
    out_dir = ctx.stage_dir("quantize")
    model, spec = load_student(ctx.out / "distill" / "student.pt", ctx.config.distill.student)
    fp32_path, artifact = out_dir / ARTIFACT_NAMES["fp32"], out_dir / ARTIFACT_NAMES[scheme.precision]
    export_onnx(model, spec, target.opset, fp32_path)
    if scheme.precision != "int8":
        fp32_top1 = top1(predict(OrtRunner(fp32_path, 2, "onnxruntime-fp32"), ds.x_eval, 1000), ds.y_eval)
        if scheme.precision == "fp16":
            convert_fp16(fp32_path, artifact)
        top = top1(predict(OrtRunner(artifact, 2, f"onnxruntime-{scheme.precision}"), ds.x_eval, 1000), ds.y_eval)
        files.write_json(out_dir / "calibration.json", {
            "scheme": scheme.to_dict(), "format": scheme.precision, "fp32_eval_top1": fp32_top1, "samples": 0,
            "excluded_nodes": [], "seed": ctx.config.seed,
            "tries": [{"try": 0, "kind": scheme.precision, "excluded_nodes": [], "eval_top1": top,
                       "drop_vs_fp32_pt": round((fp32_top1 - top) * 100, 3)}]})
        return artifact

    seed = ctx.config.seed
    calib_idx, select_idx, probe_idx, selection_note = split_training_images(ds.y_train, conf, seed)
    # the teacher on the selection images (on every core): the budget's drop against the teacher is judged there
    teacher_top1 = top1(predict(TorchRunner(ctx.teacher[0], os.cpu_count() or 1), ds.x_train[select_idx],
                                ctx.config.verify.eval_batch), ds.y_train[select_idx])
    # QAT distils from the (first) teacher's logits, cached by the distill stage
    not_selection = torch.ones(len(ds.y_train), dtype=torch.bool)
    not_selection[select_idx] = False
    qat_inputs = QatInputs(ds.x_train, ds.y_train, lambda: distill.teacher_logits(
        ctx, 0, ctx.teacher[0], torch.device("cpu"), None, distill.Distributed()),
        ctx.config.distill.temperature, ctx.config.distill.alpha, seed, not_selection.nonzero().flatten())
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work-") as work_dir:
        work = Path(work_dir)
        judge = sensitivity.Judge(fp32_path, ds.x_train[select_idx], ds.y_train[select_idx], ds.x_train[probe_idx],
                                  target.threads, target.execution_providers, target.onnxruntime)
        budget = Budget(judge.correct(fp32_path), teacher_top1, conf.max_drop_vs_fp32,
                        target.budgets.max_accuracy_drop)
        ctx.log(f"[quantize] {scheme.name}: teacher {teacher_top1:.4f}, fp32 student {budget.fp32_top1:.4f} top-1 on "
                f"{len(select_idx)} selection images; calibrating on {len(calib_idx)} training images")
        search = search_int8(model, spec, fp32_path, scheme, conf, ds.x_train[calib_idx], judge, budget, target.opset,
                             qat_inputs, work, ctx.log, ctx.progress)
        final = search.chosen()
        with files.atomic_path(artifact) as tmp:
            shutil.copyfile(final["path"], tmp)
        violations = backends.for_target(target).check_quantized(artifact)  # the runtime's own rules, if any
        if violations:
            raise StageFailed(f"the int8 model breaks {target.runtime}'s rules: {violations[0]}"
                              f"{f' (and {len(violations) - 1} more)' if len(violations) > 1 else ''}")
        for entry in search.tries:
            del entry["path"]
    counts = np.bincount(ds.y_train[calib_idx].numpy(), minlength=ds.num_classes).tolist()
    files.write_json(out_dir / "calibration.json", {
        "scheme": scheme.to_dict(), "format": "QDQ", "method": final["calibration"], "samples": len(calib_idx),
        "samples_per_class": dict(zip(ds.classes, counts)), "seed": seed,
        "activations": scheme.activation_type, "weights": scheme.weight_type, "per_channel": scheme.per_channel,
        "runtime_check": {"runtime": target.runtime, "violations": []},
        "teacher_selection_top1": teacher_top1, "fp32_selection_top1": budget.fp32_top1,
        "fp32_latency_bs1_ms": round(search.fp32_latency, 4),
        "budget": {"max_drop_vs_fp32_pt": conf.max_drop_vs_fp32, "max_drop_vs_teacher_pt": budget.max_drop_vs_teacher,
                   "teacher_reachable": budget.teacher_reachable, "met": not final["missed"]},
        "probe_images": len(probe_idx), "selection_images": len(select_idx),
        "selection": selection_note,
        "bias_correction": bias_correction_record(search.quantizer, final["calibration"]),
        "sensitivity": search.ranking, "qat": search.qat_note, "chosen_try": final["try"],
        "excluded_nodes": final["excluded_nodes"], "float_outputs": float_output_names(artifact),
        "tries": search.tries})
    ctx.log(f"[quantize] chose try {final['try']} ({final['kind']}): selection top-1 {final['selection_top1']:.4f} "
            f"({final['drop_vs_fp32_pt']:+.2f} pt vs fp32), {len(final['excluded_nodes'])} nodes in float"
            f"{'' if not final['missed'] else '; budget missed: ' + final['missed'][0]}")
    return artifact


@dataclass
class QatInputs:
    """What quantization-aware training needs beyond the model: training data and the teacher's logits on it
    (a callable: computed only if QAT runs), and `pool`, the training images it may train on: not the selection
    images, so that the QAT try is not judged on images it was just fitted to."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    teacher_logits: Callable[[], torch.Tensor]
    temperature: float
    alpha: float
    seed: int
    pool: torch.Tensor | None = None  # None: every training image


def search_int8(model: torch.nn.Module, spec: dict, fp32_path: Path, scheme: schemes.Scheme, conf, calibration:
                torch.Tensor, judge: sensitivity.Judge, budget: Budget, opset: int, qat_inputs: QatInputs | None,
                work: Path, log, progress) -> Search:
    """PTQ with each calibration method asked for, then (while the budget is missed) the sensitivity fallback,
    then QAT; every try judged and kept in the returned Search (its models under `work`)."""
    search = Search(judge, budget, work, log)
    with progress(None, "calibration", length=-(-len(calibration) // 64)) as bar:
        quantizer = Quantizer(fp32_path, work, calibration, scheme, on_batch=lambda: bar.update(1),
                              bias_correction=conf.bias_correction)
        methods = CALIBRATION_METHODS if conf.calibration_method == "auto" else (conf.calibration_method,)
        folds = {method: quantizer.quantize(work / f"ptq-{method}.onnx", method) for method in methods}
    search.quantizer = quantizer
    for method in methods:
        search.judge_try(work / f"ptq-{method}.onnx", "ptq", method, [], input_fold=folds[method],
                         bias_corrected_nodes=corrected_nodes(quantizer, method, []))
    # with "auto", the calibration whose logits come closest to fp32 on the probe images wins
    method = max(search.tries, key=lambda t: t["probe_sqnr_db"])["calibration"]
    best = search.chosen()
    if best["missed"] and conf.fallback and conf.max_float_nodes:
        log(f"[quantize] {best['missed'][0]}: ranking {len(quantizer.candidates)} nodes by sensitivity")
        with progress(None, "sensitivity", length=len(quantizer.candidates)) as bar:
            search.ranking = sensitivity.rank_nodes(lambda path, ex: quantizer.quantize(path, method, ex),
                                                    quantizer.candidates, judge, work, on_each=lambda: bar.update(1))
        for count in range(1, min(conf.max_float_nodes, len(search.ranking)) + 1):
            excluded = [name for r in search.ranking[:count] for name in r["excluded"]]
            path = work / f"fallback-{count}.onnx"
            folded = quantizer.quantize(path, method, excluded)
            entry = search.judge_try(path, "fallback", method, excluded, input_fold=folded,
                                     bias_corrected_nodes=corrected_nodes(quantizer, method, excluded))
            if not entry["missed"] or search.gave_back_half_the_speed(entry):
                break
    if search.chosen()["missed"] and conf.qat_epochs and qat_inputs is not None:
        search_qat(model, spec, scheme, method, conf, calibration, qat_inputs, opset, search, work, progress)
    return search


def corrected_nodes(quantizer: Quantizer, method: str, excluded: list[str]) -> list[str]:
    """The nodes whose bias a try of `method` keeping `excluded` in float had corrected (none when it is off)."""
    if not quantizer.bias_correction:
        return []
    return [node for node in quantizer.corrections_for(method) if node not in excluded]


def bias_correction_record(quantizer: Quantizer, method: str) -> dict:
    """calibration.json's account of bias correction for `method`: on or off, and per node the largest shift."""
    if not quantizer.bias_correction:
        return {"enabled": False}
    return {"enabled": True, "method": "empirical, -E[(W_q - W) x] per output channel over the calibration "
            "images, x the fp32 layer input (Nagel et al. 2019, sec. 4.2)",
            "max_abs_shift": {node: round(float(np.max(np.abs(shift))), 6)
                              for node, shift in quantizer.corrections_for(method).items()}}


def search_qat(model: torch.nn.Module, spec: dict, scheme: schemes.Scheme, method: str, conf, calibration:
               torch.Tensor, inputs: QatInputs, opset: int, search: Search, work: Path, progress) -> None:
    """Quantization-aware fine-tuning with the teacher's KD loss, judged as one more try: the fake quantizers
    start from the PTQ model's quantization (qat_start) and the QDQ model is exported with what they learned
    (qat_export). A student QAT cannot handle (see qat.prepare) is noted, not tried."""
    from . import qat

    images = min(conf.qat_images, len(inputs.y_train))
    search.log(f"[quantize] PTQ and fallback missed the budget: quantization-aware training, {conf.qat_epochs} "
               f"epoch(s) of {images} images")
    began = time.perf_counter()
    try:
        prepared = qat.prepare(model, signed_activations=scheme.activation_symmetric)
        qat_start(prepared, spec, opset, calibration, scheme, method, work / "qat-start")
    except qat.Unsupported as exc:
        search.qat_note = f"skipped: {exc}"
        search.log(f"[quantize] QAT {search.qat_note}")
        return
    pool = len(inputs.y_train) if inputs.pool is None else len(inputs.pool)
    steps = conf.qat_epochs * qat.steps_per_epoch(conf.qat_images, pool)
    with progress(None, "QAT", length=steps) as bar:
        qat.finetune(prepared, inputs.x_train, inputs.y_train, inputs.teacher_logits(), epochs=conf.qat_epochs,
                     images=conf.qat_images, lr=conf.qat_lr, scale_lr=conf.qat_scale_lr,
                     temperature=inputs.temperature, alpha=inputs.alpha, seed=inputs.seed, pool=inputs.pool,
                     on_step=lambda: bar.update(1))
    seconds = time.perf_counter() - began
    folded = qat_export(prepared, spec, opset, calibration, scheme, method, work / "qat", work / "qat.int8.onnx")
    search.judge_try(work / "qat.int8.onnx", "qat", method, [], input_fold=folded, bias_corrected_nodes=[],
                     qat_seconds=round(seconds, 1),
                     qat_epochs=conf.qat_epochs, qat_images=images, qat_lr=conf.qat_lr,
                     qat_scale_lr=conf.qat_scale_lr)
    search.qat_note = "ran"


def qat_start(prepared: torch.nn.Module, spec: dict, opset: int, calibration: torch.Tensor, scheme: schemes.Scheme,
              method: str, workdir: Path) -> Quantizer:
    """Set a QAT-prepared model's input quantizers to what PTQ of it with `method` uses: the calibrated ranges,
    and for the input, where the normalisation gets folded (inputfold), the exact pixel grid, kept fixed.
    Returns the Quantizer of its float model (in `workdir`)."""
    from . import qat

    start = qat_quantizer(prepared, spec, opset, calibration, scheme, workdir)
    folded = start.input_fold(method)  # calibrates, so the ranges below are cached
    ranges = start.ranges(method)
    tensors = qat_layer_inputs(start, prepared)
    qat.set_input_ranges(prepared, {layer: ranges[tensor] for layer, tensor in tensors.items()})
    if folded:
        layer = next(layer for layer, tensor in tensors.items() if tensor == folded["normalized_tensor"])
        qat.freeze_input_quant(prepared, layer, 1 / (folded["std"] * inputfold.PIXEL_LEVELS),
                               folded["normalized_zero_point"])
    return start


def qat_export(prepared: torch.nn.Module, spec: dict, opset: int, calibration: torch.Tensor, scheme: schemes.Scheme,
               method: str, workdir: Path, out_path: Path) -> dict | None:
    """QDQ int8 model of a fine-tuned QAT-prepared one at `out_path`: each fake-quantized tensor with exactly the
    scale and zero point it was trained with, the other activations calibrated with `method`. Returns the
    input fold (see Quantizer.quantize)."""
    from . import qat

    tuned = qat_quantizer(prepared, spec, opset, calibration, scheme, workdir)
    trained = qat.input_quant_params(prepared)
    return tuned.quantize(out_path, method, fixed={tensor: trained[layer]
                                                   for layer, tensor in qat_layer_inputs(tuned, prepared).items()})


def qat_quantizer(prepared: torch.nn.Module, spec: dict, opset: int, calibration: torch.Tensor,
                  scheme: schemes.Scheme, workdir: Path) -> Quantizer:
    """A Quantizer (in `workdir`) of the float model a QAT-prepared one simulates."""
    from . import qat

    workdir.mkdir()
    export_onnx(qat.float_copy(prepared), spec, opset, workdir / "float.onnx")
    # no bias correction: QAT trained its biases against the int8 weights it simulated
    return Quantizer(workdir / "float.onnx", workdir, calibration, scheme)


def qat_layer_inputs(quantizer: Quantizer, prepared: torch.nn.Module) -> dict[str, str]:
    """{QAT layer: the ONNX tensor its fake-quantized input is}."""
    from . import qat

    try:
        return quantizer.layer_inputs({name: layer.layer.weight.detach().numpy()
                                       for name, layer in qat.layers(prepared).items()})
    except StageFailed as exc:  # a layer QAT simulates is not one the exported graph has (BN left unfolded)
        raise qat.Unsupported(f"its layers do not map onto the exported graph ({exc})") from None


STAGE = Stage("quantize", run, inputs)
