"""OpenVINO on x86 CPUs (target runtime `openvino`): the quantize stage's calibrated Q/DQ model converted to
OpenVINO IR (model.xml + model.bin), run by OpenVINO's CPU plugin with the target's threads and performance hint.

OpenVINO reads the Q/DQ pairs as FakeQuantize operations and runs the quantized layers with its int8 kernels, so
the artifact keeps the calibration, the accuracy-aware fallback and the QAT of the pipeline (the alternative, NNCF's
own post-training quantization of the fp32 model, is measured beside it in benchmarks/peers.py). The package is
the optional extra `openvino`; without it this backend says so in one line.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .. import files, schemes
from ..errors import BadInput, StageFailed
from ..schemes import Scheme
from .base import ArtifactRunner, Backend, register
from .common import check_images, io_description, onnx_format
from .onnxruntime import ort_outputs


def contradictions(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> int:
    """Images whose top-1 differs although the reference's top two logits are more than twice `tolerance` apart:
    a flip that rounding within the tolerance cannot explain."""
    top2 = np.sort(reference, axis=1)[:, -2:]
    return int(((reference.argmax(1) != candidate.argmax(1)) & (top2[:, 1] - top2[:, 0] > 2 * tolerance)).sum())


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BadInput("target runtime openvino needs the openvino package: pip install 'edgecompress[openvino]'") \
            from None
    return openvino


def compile_options(threads: int, settings) -> dict:
    """OpenVINO CPU properties of a target: intra-op threads, the performance hint and the inference precision
    (fp32 by default: on CPUs with BF16 OpenVINO may otherwise pick bf16 for the float layers)."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": settings.performance_hint,
            "NUM_STREAMS": settings.num_streams, "INFERENCE_PRECISION_HINT": settings.inference_precision}


class OpenVINORunner:
    """An IR compiled for the CPU with the target's properties: x (float32 NCHW) -> logits."""

    def __init__(self, path: Path, threads: int, settings, runtime: str):
        ov = _openvino()
        self.path, self.threads, self.runtime, self.ov_settings = path, threads, runtime, settings
        self.compiled = ov.Core().compile_model(str(path), "CPU", compile_options(threads, settings))
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x}, share_inputs=True)[0].copy()

    def settings(self) -> dict:
        ov = _openvino()
        return {"runtime": self.runtime, "openvino": ov.__version__, "device": "CPU",
                **compile_options(self.threads, self.ov_settings)}


def openvino_scheme(target) -> Scheme:
    """The same QDQ as ONNX Runtime on x86 (uint8 activations, int8 per-channel weights): OpenVINO's CPU plugin
    runs u8 x i8 convolutions with VNNI, and reads the pairs as FakeQuantize."""
    return schemes.from_profile(target, "openvino-qdq",
                                "Q/DQ ONNX that OpenVINO converts to FakeQuantize and runs with its int8 CPU kernels")


def export(ctx, source: Path, out_dir: Path) -> dict:
    ov = _openvino()
    target = ctx.target
    try:
        model = ov.convert_model(str(source))
    except Exception as exc:  # OpenVINO's frontend raises its own exception types
        raise StageFailed(f"OpenVINO could not convert {source.name}: {str(exc).splitlines()[0]}") from None
    artifact = out_dir / "model.xml"
    # save_model writes NAME.xml and NAME.bin together: both are made in a scratch folder and moved in, the
    # weights first, so model.xml never names weights that are not there
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ir-") as scratch:
        ov.save_model(model, str(Path(scratch) / "model.xml"), compress_to_fp16=False)  # int8 weights stay as they are
        os.replace(Path(scratch) / "model.bin", out_dir / "model.bin")
        os.replace(Path(scratch) / "model.xml", artifact)
    # OpenVINO's CPU kernels and ONNX Runtime's round int8 arithmetic differently (requantization, accumulation
    # order): the IR must stay as close to the Q/DQ model as that model is to the fp32 student it quantizes
    x = check_images(ctx)
    reference = ort_outputs(source, x, ["CPUExecutionProvider"])
    tolerance = float(np.abs(reference - ort_outputs(ctx.out / "quantize" / "student.fp32.onnx", x,
                                                     ["CPUExecutionProvider"])).max())
    runner = OpenVINORunner(artifact, target.threads, target.openvino, "openvino")
    got = np.concatenate([runner(x[i:i + 64]) for i in range(0, len(x), 64)])
    agreement = float((reference.argmax(1) == got.argmax(1)).mean())
    diff = float(np.abs(reference - got).max())
    flips = contradictions(reference, got, tolerance)
    if diff > tolerance or flips:
        raise StageFailed(f"the OpenVINO IR's logits differ from the Q/DQ model's by up to {diff:.3g}, more than int8 "
                          f"differs from fp32 ({tolerance:.3g}), or change {flips} clear top-1 answers of {len(x)} "
                          "eval images")
    return {
        "format": f"openvino-ir-{target.precision}", "artifact": artifact.name, "weights": "model.bin",
        "sha256": files.sha256(artifact), "weights_sha256": files.sha256(out_dir / "model.bin"),
        **io_description(onnx.load(str(source))),
        "converted": {"from": str(source.relative_to(ctx.out)), "source_format": onnx_format(source),
                      "openvino": ov.__version__, "compress_to_fp16": False,
                      "matches_source": {"images": len(x), "top1_agreement": agreement, "max_abs_diff": diff,
                                         "tolerance": tolerance, "tolerance_is": "max |int8 - fp32| of the logits",
                                         "reference": "ONNX Runtime on the Q/DQ model"}},
        "compile_options": compile_options(target.threads, target.openvino),
        "python": ("import openvino as ov; m = ov.Core().compile_model('model.xml', 'CPU', "
                   f"{compile_options(target.threads, target.openvino)!r}); "
                   "logits = m.create_infer_request().infer({0: x})[0]"),
        "verify_with": {"file": artifact.name, "runtime": f"openvino-{target.precision}", "providers": []},
        "unverified": [],
    }


class OpenVINOBackend(Backend):
    name = "openvino"
    options_table = "openvino"

    def int8_scheme(self, target) -> Scheme:
        return openvino_scheme(target)

    def export(self, ctx, source: Path, out_dir: Path) -> dict:
        return export(ctx, source, out_dir)

    def environment(self) -> dict:
        try:
            import openvino
        except ImportError:
            return {"openvino": None}
        return {"openvino": openvino.__version__}

    def artifact_runner(self, ctx, build: dict) -> ArtifactRunner:
        path = ctx.out / "export" / ctx.target.name / build["artifact"]
        runtime = build["verify_with"]["runtime"]
        return ArtifactRunner(lambda threads: OpenVINORunner(path, threads, ctx.target.openvino, runtime), runtime,
                              path, file_format=build["format"])


BACKEND = register(OpenVINOBackend())
