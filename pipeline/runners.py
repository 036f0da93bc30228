"""Runners behind one interface (Polygraphy-style): `runner(x: float32 NCHW array) -> logits array`.

Each runner owns its session and thread settings, so the comparator can feed every runtime the same data. The
PyTorch runner is here; each runtime's runner lives in its backend (backends/onnxruntime.py: OrtRunner).
"""
from __future__ import annotations

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


def predict(runner, x: torch.Tensor, batch: int, progress=None) -> np.ndarray:
    """Logits of `runner` over all images of `x` (uint8 or float NCHW), in batches."""
    out = []
    batch = datasets.inference_batch(x, batch)
    starts = range(0, len(x), batch)
    for i in (progress(starts) if progress else starts):
        out.append(runner(datasets.to_float(x[i:i + batch]).numpy()))
    return np.concatenate(out)
