"""Runners behind one interface (Polygraphy-style): `runner(x: float32 NCHW array) -> logits array`.

Each runner owns its session and thread settings, so the comparator can feed every runtime the same data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgecompress.targets import OnnxRuntimeOptions

from . import data as datasets


class TorchRunner:
    """PyTorch eager, fp32, with `threads` intra-op threads while it runs (an ONNX teacher names its own runtime)."""

    def __init__(self, model: torch.nn.Module, threads: int, runtime: str = ""):
        self.model, self.threads = model.eval(), threads
        self.runtime = runtime or getattr(model, "runtime", "torch-eager-fp32")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).float().numpy()
        finally:
            torch.set_num_threads(before)

    def settings(self) -> dict:
        return {"runtime": self.runtime, "intra_op_threads": self.threads, "torch": torch.__version__}


ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def ort_session_options(threads: int, settings=None):
    """Session options with `threads` intra-op threads and a target's [onnxruntime] settings (defaults: every
    graph optimisation, spinning allowed: ONNX Runtime's own defaults)."""
    import onnxruntime as ort

    settings = settings or OnnxRuntimeOptions()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[settings.graph_optimization_level])
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    opts.log_severity_level = 3
    return opts


def ort_settings_record(threads: int, providers: list[str], settings=None) -> dict:
    """What a session made by ort_session_options runs with, for reports."""
    import onnxruntime as ort

    settings = settings or OnnxRuntimeOptions()
    return {"onnxruntime": ort.__version__, "providers": list(providers), "intra_op_num_threads": threads,
            "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": ORT_LEVELS[settings.graph_optimization_level],
            "allow_spinning": settings.allow_spinning}


class OrtRunner:
    """ONNX Runtime with the target's execution providers, thread count and [onnxruntime] settings."""

    def __init__(self, path: Path, threads: int, runtime: str, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 settings=None):
        import onnxruntime as ort

        self.path, self.threads, self.runtime, self.providers = path, threads, runtime, list(providers)
        self.ort_settings = settings
        self.session = ort.InferenceSession(str(path), ort_session_options(threads, settings), providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def settings(self) -> dict:
        return {"runtime": self.runtime} | ort_settings_record(self.threads, self.providers, self.ort_settings)


def predict(runner, x: torch.Tensor, batch: int, progress=None) -> np.ndarray:
    """Logits of `runner` over all images of `x` (uint8 or float NCHW), in batches."""
    out = []
    batch = datasets.inference_batch(x, batch)
    starts = range(0, len(x), batch)
    for i in (progress(starts) if progress else starts):
        out.append(runner(datasets.to_float(x[i:i + batch]).numpy()))
    return np.concatenate(out)
