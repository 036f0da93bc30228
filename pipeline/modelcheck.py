"""Checks that a model fits the data before any long work starts."""
from __future__ import annotations

import torch
from torch import nn

from . import data as datasets
from .errors import BadInput


def check_classifier(model: nn.Module, ds: datasets.Dataset, role: str) -> None:
    """The model must take the data's images and give one logit per class."""
    x = datasets.to_float(ds.x_eval[:2])
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:  # shape errors surface as RuntimeError, ValueError, TorchScript errors...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"the {role} cannot take the data's images of shape {tuple(x.shape[1:])}: {first}"
                       f"{_hint(first, x.shape[1])}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"the {role} must return logits of shape (batch, classes), got {shape}")
    if out.shape[1] != ds.num_classes:
        raise BadInput(f"the {role} outputs {out.shape[1]} classes but data {ds.name} has {ds.num_classes}: "
                       f"use a {role} trained on this data, or data with {out.shape[1]} classes")


def _hint(message: str, channels: int) -> str:
    """What to declare when a forward failed on the input's channels or size."""
    import re

    wanted = re.search(r"to have (\d+) channels", message)
    if wanted and int(wanted.group(1)) != channels:
        channels = "rgb" if wanted.group(1) == "3" else "grey"
        return f"; it takes {wanted.group(1)}-channel images: declare --channels {channels}"
    if "channels" in message:
        return "; declare the channels it takes with --channels rgb|grey"
    if re.search(r"size|shape|mat1 and mat2", message):
        return "; declare the input size it was trained at with --input-size (e.g. 224) and --resize"
    return ""
