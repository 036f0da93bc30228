"""The preprocessing contract: how a stored image becomes the float tensor a model takes, defined once.

Teacher, student, calibration, verify, `--student auto` and the deployed artifact all see images prepared by
the same steps: decode (EXIF orientation applied), convert to the model's channels, resize (the shorter side to
`resize`, then a center crop to `size`, as torchvision's Resize + CenterCrop do; or straight to `size` when
`resize` is 0), scale to [0, 1]. The normalisation (mean, std per channel) is not applied to the stored images:
it travels inside each model (models.Normalized) and its ONNX graph, where the int8 input fold can absorb it.

Each field is resolved in this order: what the user declared ([preprocess] or the flags), what the teacher
carries (an edgecompress checkpoint's meta, an ONNX teacher's metadata_props), else the data (its first image's
size and channels, its measured per-channel statistics). `sources` says where each field came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CHANNELS = {"rgb": 3, "grey": 1}


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]          # (height, width) the model takes
    resize: int                    # shorter side before the center crop; 0: resize straight to `size`
    interpolation: str
    channels: str                  # rgb | grey
    mean: tuple[float, ...] = ()   # per channel, on [0, 1] pixels; applied inside the model
    std: tuple[float, ...] = ()
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def num_channels(self) -> int:
        return CHANNELS[self.channels]

    def with_stats(self, mean, std, source: str) -> "Preprocess":
        return Preprocess(self.size, self.resize, self.interpolation, self.channels, tuple(map(float, mean)),
                          tuple(map(float, std)), {**self.sources, "mean": source, "std": source})

    def steps(self) -> list[str]:
        """What a deployed app does to an image before calling the artifact, in order."""
        h, w = self.size
        steps = ["decode the image and apply its EXIF orientation",
                 "convert to RGB as PIL's Image.convert('RGB') does (alpha dropped, not blended; CMYK and palette "
                 "converted; 16-bit scaled by 255/65535)" if self.channels == "rgb"
                 else "convert to greyscale (ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B)"]
        if self.resize:
            steps += [f"resize so the shorter side is {self.resize} px ({self.interpolation}, longer side "
                      "int(resize * long / short))", f"center crop to {h}x{w} (height x width)"]
        else:
            steps.append(f"resize to {h}x{w} (height x width, {self.interpolation})")
        steps += ["scale pixels to float32 in [0, 1] (x / 255)", f"lay out as NCHW, shape (N, {self.num_channels}, "
                  f"{h}, {w})", f"do not normalise: the artifact subtracts mean {list(self.mean)} and divides by std "
                  f"{list(self.std)} itself"]
        return steps

    def describe(self) -> dict:
        return {"size": list(self.size), "resize": self.resize, "interpolation": self.interpolation,
                "channels": self.channels, "mean": list(self.mean), "std": list(self.std), "sources": self.sources}

    def summary(self) -> str:
        h, w = self.size
        crop = f"resize {self.resize} + center crop {h}x{w}" if self.resize else f"{h}x{w}"
        where = ", ".join(f"{k} from {v}" for k, v in self.sources.items())
        return (f"{crop} {self.interpolation}, {self.channels}, mean {[round(m, 4) for m in self.mean]} "
                f"std {[round(s, 4) for s in self.std]} ({where})")


@dataclass(frozen=True)
class Geometry:
    """The part of the contract that decides the stored pixels (everything but the normalisation); fields left
    None are taken from the data."""

    size: tuple[int, int] | None = None
    resize: int = 0
    interpolation: str = "bilinear"
    channels: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a stored image, once size and channels are settled."""
        return (CHANNELS[self.channels], *self.size)

    def key(self) -> dict:
        return {"size": list(self.size) if self.size else None, "resize": self.resize,
                "interpolation": self.interpolation, "channels": self.channels}


def output_size(width: int, height: int, geometry: Geometry) -> tuple[int, int]:
    """(width, height) after the resize step, before the crop: torchvision's Resize(int) arithmetic."""
    if not geometry.resize:
        h, w = geometry.size
        return w, h
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(geometry.resize * long / short)
    return (geometry.resize, new_long) if width <= height else (new_long, geometry.resize)


def scaled_resize(resize: int, recipe_size, size) -> int:
    """A recipe's resize kept in proportion at another size: 256 for a 224 crop is 73 at 64 px (timm's crop_pct
    arithmetic; the resize goes with the crop it was chosen for)."""
    return round(resize / max(recipe_size) * max(size))


def crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the center crop to `size` = (height, width): torchvision's CenterCrop."""
    ch, cw = size
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    return left, top, left + cw, top + ch


def parse_size(value) -> tuple[int, int] | None:
    """`224`, `[224]`, `[224, 160]`, `"224"` or `"224x160"` (height x width) as (height, width); empty: None."""
    if value in (None, "", [], ()):
        return None
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        dims = [int(p) for p in parts]
    except (TypeError, ValueError):
        dims = []
    if len(dims) not in (1, 2) or min(dims) <= 0 or max(dims) > 8192:
        raise ValueError(f"an input size is 224 or 224x160 (height x width, 1-8192 px), got {value!r}")
    return (dims[0], dims[-1])
