"""Runners behind one interface (Polygraphy-style): `runner(x: float32 NCHW array) -> logits array`.

Each runner owns its session and thread settings, so the comparator can feed every runtime the same data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


def ort_session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class OrtRunner:
    """ONNX Runtime with the target's execution providers and thread count."""

    def __init__(self, path: Path, threads: int, runtime: str, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.path, self.threads, self.runtime, self.providers = path, threads, runtime, list(providers)
        self.session = ort.InferenceSession(str(path), ort_session_options(threads), providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def settings(self) -> dict:
        import onnxruntime as ort

        return {"runtime": self.runtime, "onnxruntime": ort.__version__, "providers": self.providers,
                "intra_op_num_threads": self.threads, "inter_op_num_threads": 1,
                "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": "ORT_ENABLE_ALL"}


def predict(runner, x: torch.Tensor, batch: int, progress=None) -> np.ndarray:
    """Logits of `runner` over all images of `x` (uint8 or float NCHW), in batches."""
    out = []
    starts = range(0, len(x), batch)
    for i in (progress(starts) if progress else starts):
        out.append(runner(datasets.to_float(x[i:i + batch]).numpy()))
    return np.concatenate(out)
