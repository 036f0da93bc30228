"""Device target profiles: one TOML file per target in this folder; a user's own TOML path works the same."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgecompress.errors import BadInput

PROFILE_DIR = Path(__file__).parent
RUNTIMES = ("onnxruntime", "onnxruntime-mobile", "tensorrt")
PRECISIONS = ("int8", "fp16", "fp32")
QUANT_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class Budgets:
    max_accuracy_drop: float = 2.0
    max_latency_ms: float = 0.0
    min_speedup: float = 0.0


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    precision: str = "int8"
    opset: int = 17
    batch: tuple[int, ...] = (1, 64)
    threads: int = 1
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load(name_or_path: str) -> Target:
    """A shipped target by name, or a TOML file by path."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            hint = difflib.get_close_matches(name_or_path, names(), n=1)
            raise BadInput(f"unknown target {name_or_path!r}"
                           f"{f' (did you mean {hint[0]!r}?)' if hint else ''}: choose one of "
                           f"{', '.join(names())} or give a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"target file {path}: {exc}") from None
    return _build(raw, str(path))


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}


def _unknown(keys, cls, where: str) -> None:
    valid = _fields(cls)
    for key in keys:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            raise BadInput(f"{where}: unknown key {key!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                           f"valid keys: {', '.join(valid)}")


def _typed(value, kind, key: str, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInput(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def _build(raw: dict, where: str) -> Target:
    _unknown(raw, Target, where)
    for required in ("name", "description", "runtime"):
        if required not in raw:
            raise BadInput(f"{where}: missing required key {required!r}")
    budgets = raw.pop("budgets", {})
    if not isinstance(budgets, dict):
        raise BadInput(f"{where}: [budgets] must be a table")
    _unknown(budgets, Budgets, f"{where} [budgets]")
    budget_values = {k: _typed(v, float, k, f"{where} [budgets]") for k, v in budgets.items()}
    for key, value in budget_values.items():
        if not math.isfinite(value) or value < 0:
            raise BadInput(f"{where} [budgets]: {key} must be a finite number >= 0, got {value}")

    values = {}
    for key, value in raw.items():
        if key in ("batch", "execution_providers"):
            item = int if key == "batch" else str
            if not isinstance(value, list) or not value:
                raise BadInput(f"{where}: {key} must be a non-empty list")
            values[key] = tuple(_typed(v, item, key, where) for v in value)
        else:
            kind = {"opset": int, "threads": int, "per_channel": bool}.get(key, str)
            values[key] = _typed(value, kind, key, where)
    choices = {"runtime": RUNTIMES, "precision": PRECISIONS, "activation_type": QUANT_TYPES, "weight_type": QUANT_TYPES}
    for key, valid in choices.items():
        if key in values and values[key] not in valid:
            raise BadInput(f"{where}: {key} = {values[key]!r} is not one of {', '.join(valid)}")
    if any(b < 1 for b in values.get("batch", (1,))) or values.get("threads", 1) < 1:
        raise BadInput(f"{where}: batch sizes and threads must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", values["name"]):
        # the name becomes the folder export/<name>/ inside the run directory
        raise BadInput(f"{where}: name {values['name']!r} must be letters, digits, '.', '_' or '-' "
                       "(at most 64, not starting with '.')")
    if not 13 <= values.get("opset", 17) <= 21:
        raise BadInput(f"{where}: opset must be between 13 and 21")
    return Target(**values, budgets=Budgets(**budget_values), source=where)
