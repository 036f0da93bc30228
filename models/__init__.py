"""Model zoo: a plain registry of factories, timm-style, with metadata that travels with each model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[..., nn.Module]
    family: str
    description: str
    defaults: dict = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {}


def register(name: str, family: str, description: str, **defaults):
    """Decorator adding a factory `f(in_channels, num_classes, **kw) -> nn.Module` to the zoo."""

    def add(factory):
        if name in ZOO:
            raise ValueError(f"model {name!r} is already registered")
        ZOO[name] = ZooEntry(name, factory, family, description, dict(defaults))
        return factory

    return add


def create(name: str, in_channels: int, num_classes: int) -> nn.Module:
    entry = ZOO[name]
    return entry.factory(in_channels=in_channels, num_classes=num_classes, **entry.defaults)


class Normalized(nn.Module):
    """Wraps a network so it takes pixels in [0, 1]: normalisation travels inside the model and its ONNX file."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.mean_values = [float(m) for m in mean]
        self.std_values = [float(s) for s in std]
        self.register_buffer("mean", torch.tensor(self.mean_values).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(self.std_values).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.inv_std)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from . import mobilenet, resnet  # noqa: E402,F401  (fill the registry)
