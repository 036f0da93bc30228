"""Which layers feature- and relation-based methods compare, and the method built around the student with its
hooks: the user's module paths, or by default the stage ends of student and teacher matched by spatial size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from edgecompress.models import libraries

from . import methods as distillers
from .methods import FeatureTap, Setup
from ..errors import BadInput


def unwrap(model: nn.Module) -> nn.Module:
    return model.net if hasattr(model, "net") and hasattr(model, "mean_values") else model


def _resolve(model: nn.Module, path: str) -> str:
    """A user's module path, accepting it with or without the normalisation wrapper's `net.` prefix."""
    names = dict(model.named_modules())
    return path if path in names or f"net.{path}" not in names else f"net.{path}"


@torch.no_grad()
def stage_ends(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """The end of each stage: the modules a timm model lists in its feature_info, else, for every spatial size
    the network computes, the last module inside a Sequential that outputs a 4-D map of that size (a ResNet
    stage of the zoo or torchvision, a MobileNet or EfficientNet block), in execution order."""
    recorded = libraries.feature_modules(unwrap(model))
    if recorded:
        prefix = "net." if unwrap(model) is not model else ""
        paths = [prefix + p for p in recorded]
        return list(zip(paths, shapes_of(model, paths, x)))
    parents = {f"{path}.{child}" if path else child: module for path, module in model.named_modules()
               for child, _ in module.named_children()}
    last: dict[tuple[int, int], tuple[int, str, tuple[int, ...]]] = {}
    order, handles = [0], []

    def hook(path):
        def record(_m, _i, out):
            order[0] += 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                last[tuple(out.shape[2:])] = (order[0], path, tuple(out.shape[1:]))
        return record

    for path, module in model.named_modules():
        if isinstance(parents.get(path), nn.Sequential):
            handles.append(module.register_forward_hook(hook(path)))
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return [(path, shape) for _, path, shape in sorted(last.values())]


@torch.no_grad()
def embedding_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, int]:
    """The last linear layer run (the classifier) and its input width: its input is the embedding."""
    names = {m: p for p, m in model.named_modules()}
    seen: list[nn.Linear] = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for m in names if isinstance(m, nn.Linear)]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise BadInput(f"{type(unwrap(model)).__name__} has no linear classifier whose input could serve as the "
                       "embedding for this method")
    return names[seen[-1]], seen[-1].in_features


@torch.no_grad()
def shapes_of(model: nn.Module, layers: list[str], x: torch.Tensor) -> list[tuple[int, ...]]:
    tap = FeatureTap(model, layers)
    try:
        model.eval()(x)
        maps = tap.take().maps
    finally:
        tap.remove()
    for path, m in zip(layers, maps):
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            raise BadInput(f"layer {path} gives {tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}"
                           ", not a (batch, channels, height, width) feature map")
    return [tuple(m.shape[1:]) for m in maps]


def pair_layers(student: nn.Module, teacher: nn.Module | None, opts: dict, x: torch.Tensor
                ) -> tuple[list[str], list[str]]:
    """Student and teacher layers to compare, in pairs: the user's paths (student_layers / teacher_layers, by
    position), or by default the stage ends of both matched by spatial size."""
    s_given, t_given = opts.get("student_layers", []), opts.get("teacher_layers", [])
    if teacher is None:  # self-distillation: the student's own stages
        return [_resolve(student, p) for p in s_given] or [p for p, _ in stage_ends(student, x)], []
    if s_given or t_given:
        if len(s_given) != len(t_given):
            raise BadInput(f"student_layers names {len(s_given)} layers but teacher_layers {len(t_given)}: "
                           "give both, paired by position")
        return [_resolve(student, p) for p in s_given], [_resolve(teacher, p) for p in t_given]
    s_ends, t_ends = stage_ends(student, x), dict((shape[1:], p) for p, shape in stage_ends(teacher, x))
    pairs = [(p, t_ends[shape[1:]]) for p, shape in s_ends if shape[1:] in t_ends]
    if not pairs:
        raise BadInput("no student and teacher stage ends share a spatial size: name the layers with "
                       "--method-opt student_layers=a,b --method-opt teacher_layers=c,d")
    return [p for p, _ in pairs], [t for _, t in pairs]


@dataclass
class Prepared:
    distiller: distillers.Distiller
    teacher_tap: FeatureTap | None  # hooks on the teacher, for methods that compare features
    student_layers: list[str]
    teacher_layers: list[str]


def prepare(method: str, opts: dict, student: nn.Module, teacher: nn.Module | None, num_classes: int,
            train_labels: torch.Tensor, new_student: Callable[[], nn.Module], probe: torch.Tensor) -> Prepared:
    """The method around `student`, with its layers paired and hooked and its extra modules sized by a probe
    forward of both models on a couple of real images."""
    cls = distillers.METHODS[method]
    setup = Setup(num_classes=num_classes, train_labels=train_labels, new_student=new_student)
    s_layers, t_layers, s_embed, t_embed = [], [], "", ""
    if cls.feature_maps:
        s_layers, t_layers = pair_layers(student, teacher if cls.teacher_features else None, opts, probe)
        if cls.last_pair_only:
            s_layers, t_layers = s_layers[-1:], t_layers[-1:]
        setup.student_shapes = setup.student_stage_shapes = shapes_of(student, s_layers, probe)
        setup.teacher_shapes = shapes_of(teacher, t_layers, probe) if t_layers else []
    if cls.embeddings:
        s_embed, setup.student_embedding_dim = embedding_layer(student, probe)
        t_embed, setup.teacher_embedding_dim = embedding_layer(teacher, probe)
    distiller = distillers.build(method, student, setup, **opts)
    if cls.student_features:
        distiller.attach(s_layers, s_embed)
    tap = FeatureTap(teacher, t_layers, t_embed) if cls.teacher_features else None
    return Prepared(distiller, tap, s_layers, t_layers)
