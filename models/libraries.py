"""Architectures from torchvision and timm, named `torchvision:NAME` or `timm:NAME` wherever a model is named.

The architecture comes from the library, the weights only from the user's checkpoint: torchvision models are
built with `weights=None` and timm models with `pretrained=False`, and HF_HUB_OFFLINE is set before timm is
imported, so a run never reaches the network. Both libraries are the optional `vision` extra
(`pip install 'edgecompress[vision]'`); without it a `torchvision:`/`timm:` spec is one line saying so.

Metadata travels with the architecture, as in timm: `preprocess(spec)` gives the [preprocess] fields the
library records for it (timm's pretrained_cfg: input size, crop_pct, interpolation, mean, std; torchvision's
ImageNet recipe from the weights enum's transforms, read without downloading anything).
"""
from __future__ import annotations

import difflib
import importlib
import math
import os

from torch import nn

from edgecompress.data.preprocess import parse_size
from edgecompress.errors import BadInput

LIBRARIES = ("torchvision", "timm")
INSTALL_HINT = "install the vision extra: pip install 'edgecompress[vision]' (or bash .ci/install --vision)"


def is_library_spec(spec: str) -> bool:
    library, sep, name = spec.partition(":")
    return bool(sep) and library in LIBRARIES and bool(name)


def available() -> bool:
    """Whether the vision extra is installed (both libraries import)."""
    try:
        _import("torchvision", "")
        _import("timm", "")
        return True
    except BadInput:
        return False


def _import(library: str, spec: str):
    if library == "timm":
        # timm resolves pretrained configs through the Hugging Face hub helpers; never let them reach out.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        module = importlib.import_module(library)
        if library == "torchvision":
            importlib.import_module("torchvision.models")
        return module
    except ImportError as exc:
        raise BadInput(f"{spec or library} needs {library}, which is not installed ({exc}): {INSTALL_HINT}") from None
    except Exception as exc:  # e.g. a torchvision built for another torch fails while registering its ops
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise BadInput(f"{spec or library}: importing {library} failed ({first}); it must match the installed "
                       f"torch: {INSTALL_HINT}") from None


def names(library: str) -> list[str]:
    """The classification architectures the library offers."""
    module = _import(library, library)
    if library == "timm":
        return list(module.list_models())
    return list(module.models.list_models(module=module.models))


def _check_name(library: str, name: str, spec: str) -> None:
    known = names(library)
    if name not in known:
        hint = ", ".join(difflib.get_close_matches(name, known, n=3))
        raise BadInput(f"{spec}: {library} has no classification model {name!r}"
                       + (f" (did you mean {hint}?)" if hint else ""))


def check(spec: str) -> None:
    """BadInput unless the library of `spec` is installed and has the architecture it names."""
    library, _, name = spec.partition(":")
    _import(library, spec)
    _check_name(library, name, spec)


def create(spec: str, in_channels: int, num_classes: int) -> nn.Module:
    """The library's architecture with random weights, `num_classes` outputs and `in_channels` input channels."""
    library, _, name = spec.partition(":")
    module = _import(library, spec)
    _check_name(library, name, spec)
    try:
        if library == "timm":
            return module.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        # Inception-style networks return auxiliary logits in training unless told not to.
        extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        net = module.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{spec}: building it failed: {exc}") from None
    if in_channels != 3:
        _set_input_channels(net, in_channels, spec)
    return net


def _set_input_channels(net: nn.Module, in_channels: int, spec: str) -> None:
    """torchvision has no in_chans: replace the first convolution by one taking `in_channels` channels."""
    path, first = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if first is None or first.groups != 1:
        raise BadInput(f"{spec}: cannot find a first convolution to adapt to {in_channels}-channel images; "
                       "use --channels rgb")
    net.set_submodule(path, nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                      first.padding, first.dilation, 1, first.bias is not None,
                                      first.padding_mode))


def preprocess(spec: str) -> dict:
    """The [preprocess] fields (size, resize, interpolation, mean, std) the library records for `spec`."""
    library, _, name = spec.partition(":")
    module = _import(library, spec)
    _check_name(library, name, spec)
    if library == "timm":
        cfg = module.models.get_pretrained_cfg(name, allow_unregistered=True)
        if cfg is None:
            return {}
        size = list(cfg.input_size[1:])
        # timm's eval transform: resize the shorter side to floor(size / crop_pct), then center crop.
        resize = math.floor(max(size) / cfg.crop_pct) if cfg.crop_pct and cfg.crop_mode == "center" else 0
        interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        return {"size": size, "resize": max(resize, max(size)) if resize else 0, "interpolation": interpolation,
                "mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std]}
    try:
        weights = module.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return {}
    recipe = weights.transforms()
    fields = {"mean": [float(v) for v in recipe.mean], "std": [float(v) for v in recipe.std]}
    crop, resize = getattr(recipe, "crop_size", None), getattr(recipe, "resize_size", None)
    if crop:  # ImageClassification: resize the shorter side, then center crop
        fields |= {"size": list(parse_size(list(crop))), "resize": int(resize[0]) if resize else 0,
                   "interpolation": recipe.interpolation.value}
    return fields


def feature_modules(net: nn.Module) -> list[str]:
    """The stage ends timm records for a model (feature_info), as module paths; [] for other models."""
    info = getattr(net, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(i, dict) and "module" in i for i in info):
        return []
    modules = dict(net.named_modules())
    return [i["module"] for i in info if i["module"] in modules]


# The student zoo for photos at ImageNet-like sizes: the mobile families torchvision and timm maintain.
# efficientnet_lite0 (ReLU6, no squeeze-excite) and mobilenetv4_conv_small (ReLU, no SE) are int8-friendly;
# Hardswish, SiLU and squeeze-excite run in float between int8 kernels in ONNX Runtime (the kernel check names them).
PHOTO_STUDENTS = ("torchvision:mobilenet_v3_small", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
                  "torchvision:regnet_x_400mf", "torchvision:resnet18", "torchvision:shufflenet_v2_x1_0",
                  "torchvision:mnasnet1_0", "timm:mobilenetv4_conv_small", "timm:efficientnet_lite0")
# Below this input side the zoo's stride-32 networks end on maps of one or two pixels: not considered there.
PHOTO_MIN_SIDE = 64
