"""The backend interface and its registries (the package's __init__ explains the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import schemes
from ..errors import BadInput


@dataclass
class ArtifactRunner:
    """What verify times and scores as the artifact: `make(threads)` gives a fresh runner (x -> logits) of the file
    at `path`. `on_target` is False when it stands in for the target's runtime (`note` says how; latency budgets
    cannot be judged then). `reference`, when given, makes a runner of the graph the artifact was built from, for
    a Polygraphy-style comparison on the eval images; `extra` goes into the report as it is."""

    make: Callable[[int], Callable]
    runtime: str
    path: Path
    file_format: str = ""  # "" when verify reads it from the ONNX file itself
    on_target: bool = True
    note: str = ""
    reference: Callable[[int], Callable] | None = None
    extra: dict = field(default_factory=dict)


class Backend:
    """One runtime; each module subclasses it and overrides what it has (the defaults: no check, no environment,
    no docker flags)."""

    name = ""
    precisions: tuple[str, ...] = ("int8", "fp32")
    options_table = ""  # the target profile's table of this runtime's own options ([tensorrt]), "" for none
    # --student auto and `edgecompress models` time candidates as this runtime's artifact on this host
    times_on_host = True

    def int8_scheme(self, target):
        raise NotImplementedError

    def check_quantized(self, path: Path) -> list[str]:
        return []

    def export(self, ctx, source: Path, out_dir: Path) -> dict:
        raise NotImplementedError

    def environment(self) -> dict:
        return {}

    def artifact_runner(self, ctx, build: dict) -> ArtifactRunner:
        raise NotImplementedError

    def docker_run_flags(self, target) -> list[str]:
        return []

    def keep_on_rebuild(self, target, out_dir: Path) -> set[str]:
        """Files of export/<target>/ a new export must not delete (besides done.json)."""
        return set()


BACKENDS: dict[str, Backend] = {}
# Edits of a quantized graph that a runtime's Q/DQ placement needs and ONNX Runtime's quantizer does not make,
# by the name a Scheme's graph_edit gives: edit(model) changes the ModelProto in place, returns what it changed.
QDQ_EDITS: dict[str, Callable] = {}


def register(backend: Backend) -> Backend:
    if not backend.name or backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is unnamed or registered twice")
    BACKENDS[backend.name] = backend
    return backend


def register_qdq_edit(name: str, edit: Callable) -> None:
    if name in QDQ_EDITS:
        raise ValueError(f"Q/DQ edit {name!r} registered twice")
    QDQ_EDITS[name] = edit


def get(runtime: str) -> Backend:
    if runtime not in BACKENDS:
        raise BadInput(f"no backend for runtime {runtime!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[runtime]


def for_target(target) -> Backend:
    return get(target.runtime)


def scheme_for(target):
    """The quantization scheme of a target profile: by precision first, then (for int8) its runtime's."""
    if target.precision == "fp16":
        return schemes.float16(target)
    if target.precision == "fp32":
        return schemes.float32(target)
    return for_target(target).int8_scheme(target)
