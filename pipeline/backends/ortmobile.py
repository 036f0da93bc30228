"""ONNX Runtime mobile export: an .ort file (ORT's flatbuffer format, what reduced builds load) and the
required-operators config that `build.sh --minimal_build --include_ops_by_config` takes to build only those kernels.

onnxruntime's own converter (onnxruntime.tools.convert_onnx_models_to_ort) does the work, with the "Fixed"
optimisation style (optimisations baked in; the style ORT recommends unless a compiling EP such as NNAPI or
CoreML takes part of the graph) and target platform "arm", which leaves out x86-only layout rewrites.
A full ONNX Runtime build loads .ort files too, so the file is checked here against the ONNX model it came from.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

from .. import files, schemes
from ..errors import StageFailed
from ..schemes import Scheme
from .base import register
from .common import check_images, compare_outputs, io_description
from .onnxruntime import OnnxRuntimeBackend, available_providers, load_session, ort_outputs, ort_settings_record

CONFIG_NAME = "required_operators.config"


def convert(source: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/model.ort and out_dir/required_operators.config from an ONNX file, atomically."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    # the converter logs an INFO line per config it writes and prints its progress: keep the CLI's output ours
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as work:
        work_dir = Path(work)
        shutil.copyfile(source, work_dir / "model.onnx")
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                convert_onnx_models_to_ort(work_dir / "model.onnx", output_dir=work_dir / "out",
                                           optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
        except Exception as exc:  # the converter re-raises whatever ONNX Runtime raised
            raise StageFailed(f"ONNX Runtime could not convert {source.name} to .ort: "
                              f"{str(exc).splitlines()[0]}") from None
        ort_file, config = work_dir / "out" / "model.ort", work_dir / "out" / f"model.{CONFIG_NAME}"
        # the config's header names the temporary folder: name the shipped file instead
        lines = [line for line in config.read_text().splitlines() if not line.startswith("# - ")]
        lines.insert(1, "# - model.ort")
        with files.atomic_path(out_dir / "model.ort") as tmp:
            shutil.copyfile(ort_file, tmp)
        files.write_text(out_dir / CONFIG_NAME, "\n".join(lines) + "\n")
    return out_dir / "model.ort", out_dir / CONFIG_NAME


def required_operators(config: Path) -> dict[str, list[str]]:
    """{"domain;opset": [ops]} from a required-operators config."""
    table = {}
    for line in config.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, opset, ops = line.split(";")
            table[f"{domain};{opset}"] = ops.split(",")
    return table


def export(ctx, source: Path, out_dir: Path) -> dict:
    import onnx
    import onnxruntime as ort

    target = ctx.target
    providers, missing = available_providers(target.execution_providers)
    ort_file, config = convert(source, out_dir)
    load_session(ort_file, target.threads, providers, target.name, target.onnxruntime)
    x = check_images(ctx)
    # The .ort graph holds ORT's fused int8 kernels (QLinearConv...), the ONNX file the Q/DQ pairs the session fuses
    # on load: the same arithmetic, so outputs must agree to float rounding.
    check = compare_outputs(ort_outputs(source, x, providers), ort_outputs(ort_file, x, providers),
                            f"the {target.name} .ort file")
    unverified = [f"execution provider {p}: not in this onnxruntime build ({ort.__version__}; ONNX Runtime's "
                  f"Android/iOS packages have it); verified with {', '.join(providers)}" for p in missing]
    unverified.append(f"on-phone latency: the .ort file is timed on this host's CPU ({ort.__version__}, "
                      f"{target.threads} threads), not on an ARM64 phone")
    unverified.append("reduced-size build: the required-operators config was written, a minimal ONNX Runtime "
                      "was not built from it here")
    return {
        "format": "ort-int8" if target.precision == "int8" else f"ort-{target.precision}",
        "artifact": ort_file.name, "sha256": files.sha256(ort_file),
        "ort_format": {"converter": "onnxruntime.tools.convert_onnx_models_to_ort", "onnxruntime": ort.__version__,
                       "optimization_style": "Fixed", "target_platform": "arm", "from": str(source.relative_to(ctx.out)),
                       "matches_source": check},
        "required_operators": {"file": config.name, "sha256": files.sha256(config), "ops": required_operators(config),
                               # extended: the minimal build that can register a compiling EP (XNNPACK)
                               "reduced_build": "./build.sh --config MinSizeRel --android --android_abi arm64-v8a "
                                                "--android_sdk_path SDK --android_ndk_path NDK --minimal_build extended "
                                                f"--use_xnnpack --include_ops_by_config {config.name}"},
        **io_description(onnx.load(str(source))),
        "session_options": ort_settings_record(target.threads, providers, target.onnxruntime),
        # XNNPACK has its own thread pool; ONNX Runtime's XNNPACK page recommends giving it the threads and
        # keeping ORT's intra-op pool at 1 without spinning, so the two pools do not contend.
        "device_session": {"providers": list(target.execution_providers),
                           "provider_options": {"XnnpackExecutionProvider": {"intra_op_num_threads": target.threads}},
                           "intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0",
                           "xnnpack_present_here": "XnnpackExecutionProvider" in ort.get_available_providers()},
        "verify_with": {"file": ort_file.name, "runtime": f"onnxruntime-{target.precision}", "providers": providers},
        "unverified": unverified,
    }


def arm_scheme(target) -> Scheme:
    """ONNX Runtime mobile on ARM64: QDQ with the profile's activation type (uint8 asymmetric or int8
    symmetric, both run by ORT's ARM kernels) and int8 per-channel weights."""
    return schemes.from_profile(target, "onnxruntime-mobile-qdq",
                                "QDQ operators that the ORT mobile (ORT format) build runs on ARM64")


class OrtMobileBackend(OnnxRuntimeBackend):
    """ONNX Runtime's own backend with the ARM scheme and the .ort export; its environment (the ONNX Runtime version)
    and its artifact runner (the .ort file in a full ONNX Runtime on this host's CPU) are ONNX Runtime's."""

    name = "onnxruntime-mobile"

    def int8_scheme(self, target) -> Scheme:
        return arm_scheme(target)

    def export(self, ctx, source: Path, out_dir: Path) -> dict:
        return export(ctx, source, out_dir)


BACKEND = register(OrtMobileBackend())
