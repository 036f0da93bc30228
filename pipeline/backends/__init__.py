"""Runtimes behind one interface: a target profile's `runtime` names a Backend, and the pipeline asks it instead of
comparing runtime names. A new runtime is one module here (a Backend registered under its name) plus a target TOML.

A backend gives:
- `precisions` it builds, and `int8_scheme(target)`: how the quantize stage calls ONNX Runtime's quantizer;
- `check_quantized(path)`: its rules on the quantize stage's int8 model (violations, empty when none);
- `export(ctx, source, out_dir)`: its artifact in out_dir and the build record (build.json's runtime part);
- `environment()`: what on this host decides what export builds (versions, device), part of export's fingerprint;
- `artifact_runner(ctx, build)`: what verify runs for the artifact, and whether its latency is the target's;
- `docker_run_flags(target)`: what `docker run` needs for the device (GPU access, groups).
"""
from __future__ import annotations

from . import onnxruntime, openvino, ortmobile, tensorrt  # noqa: F401  (each registers its backend)
from .base import (BACKENDS, QDQ_EDITS, ArtifactRunner, Backend, for_target, get, register, register_qdq_edit,
                   scheme_for)

__all__ = ["ArtifactRunner", "Backend", "BACKENDS", "QDQ_EDITS", "register", "register_qdq_edit", "get",
           "for_target", "scheme_for"]
