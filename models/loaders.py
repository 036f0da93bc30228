"""Loading users' models and checkpoints without running code they did not name.

Checkpoints go through torch.load(weights_only=True): a pickle that needs anything beyond tensors and
plain containers is refused. Python code runs only from a `file.py:factory` the user named; TorchScript
only from a file the user named.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from edgecompress.errors import BadInput

from . import ZOO, Normalized, create, libraries
from .checkpoints import check_loadable, read_checkpoint

WEIGHTS_DIR = Path(__file__).parent / "weights"


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"shape mismatch in {shapes[0]}: {tuple(state[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}")
        raise BadInput(f"weights {source} do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def import_callable(spec: str):
    """The function `name` of `path/to/file.py:name`: the one place where user Python code is imported."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise BadInput(f"model file not found: {file} (from {spec})")
    module_name = f"edgecompress_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ beside user files
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # user code: any failure, sys.exit() included, is the user's input error
        raise BadInput(f"importing {file} failed: {_user_failure(exc)}") from None
    finally:
        sys.dont_write_bytecode = write_bytecode
    found = getattr(module, name, None)
    if not callable(found):
        raise BadInput(f"{file} has no callable {name!r}")
    return found


def _user_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def load_factory(spec: str) -> nn.Module:
    """Build a model from `path/to/file.py:factory` (the user named the file, so its code may run)."""
    factory = import_callable(spec)
    try:
        model = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # as in import_callable
        raise BadInput(f"{spec}() failed: {_user_failure(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def is_factory_spec(spec: str) -> bool:
    file, sep, name = spec.rpartition(":")
    return bool(sep) and file.endswith(".py") and name.isidentifier()


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def build_model(spec: str, weights: str, in_channels: int, num_classes: int,
                mean: list[float], std: list[float], role: str) -> tuple[nn.Module, dict]:
    """A model taking [0, 1] pixels, from a zoo name, a TorchScript file or `file.py:factory` (+ weights).

    Returns the model in eval mode and a description of where it came from.
    """
    info = {"spec": spec, "weights": weights, "mean": mean, "std": std}
    if spec in ZOO:
        net = create(spec, in_channels, num_classes)
        info["kind"] = "zoo"
    elif libraries.is_library_spec(spec):
        net = libraries.create(spec, in_channels, num_classes)
        info["kind"] = spec.partition(":")[0]
    elif is_factory_spec(spec):
        net = load_factory(spec)
        info["kind"] = "factory"
    else:
        path = Path(spec)
        if not path.exists():
            raise BadInput(f"--{role} {spec!r} is neither a zoo model ({', '.join(sorted(ZOO))}), nor "
                           "torchvision:NAME or timm:NAME, nor an existing file, nor path/to/file.py:factory")
        if path.suffix == ".onnx":
            if role != "teacher":
                raise BadInput(f"an ONNX {role} cannot be trained: give a zoo name or file.py:factory")
            if weights:
                raise BadInput("--teacher-weights is for zoo and factory models; an ONNX file carries its weights")
            info["kind"] = "onnx"
            return OnnxTeacher(path, mean, std).eval(), info
        if not is_torchscript(path):
            raise BadInput(f"--{role} {spec} is not a TorchScript file; if it is a state dict, give the "
                           f"architecture as --{role} (zoo name or file.py:factory) and this file as --{role}-weights")
        if weights:
            raise BadInput(f"--{role}-weights is for zoo and factory models; a TorchScript file carries its weights")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch 2.14 deprecates TorchScript; the user's file is one
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a damaged TorchScript archive raises many kinds of error
            raise BadInput(f"cannot load TorchScript {path}: {str(exc).splitlines()[0][:160]}") from None
        info["kind"] = "torchscript"
        return Normalized(net, mean, std).eval(), info
    if weights:
        state, meta = read_checkpoint(weights)
        apply_state_dict(net, state, weights)
        if "checkpoint_key" in meta:
            info["checkpoint_key"] = meta["checkpoint_key"]
        if "mean" in meta and "std" in meta:  # weights trained by edgecompress know their normalisation
            info.update(mean=meta["mean"], std=meta["std"], trained_with=meta.get("command", ""))
            mean, std = meta["mean"], meta["std"]
    return Normalized(net, mean, std).eval(), info


MAX_ONNX_BYTES = 2 << 30  # protobuf's limit for a single-file model


class OnnxTeacher(nn.Module):
    """A teacher run by ONNX Runtime: logits only, so it serves logit-based distillation and verification.

    Its weights are kept as frozen parameters so that parameter counts and sizes report the real model.
    One ORT session per thread count, matching torch.get_num_threads() at call time, so timing runners that
    set torch's threads time ORT with the same count.
    """

    runtime = "onnxruntime-fp32"

    def __init__(self, path: Path, mean: list[float], std: list[float]):
        super().__init__()
        proto = check_onnx(path)
        from onnx import numpy_helper

        self.path = path
        self.weights = nn.ParameterList(
            nn.Parameter(torch.from_numpy(numpy_helper.to_array(t).copy()), requires_grad=False)
            for t in proto.graph.initializer if t.data_type == 1)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.sessions: dict[int, object] = {}
        self._session(torch.get_num_threads())

    def _session(self, threads: int):
        if threads not in self.sessions:
            from edgecompress.backends.onnxruntime import session

            try:
                self.sessions[threads] = session(self.path, threads)
            except Exception as exc:  # ORT raises its own exception types for unsupported graphs
                raise BadInput(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0][:200]}") from None
        return self.sessions[threads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self._session(torch.get_num_threads())
        feed = ((x.float() - self.mean) / self.std).contiguous().numpy()
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: feed})[0])


def check_onnx(path: Path):
    """Parse and check an ONNX file before anything runs it; BadInput with the reason otherwise."""
    import onnx

    size = path.stat().st_size
    if size == 0 or size > MAX_ONNX_BYTES:
        raise BadInput(f"{path}: an ONNX file of {size} bytes is not plausible (empty, or over 2 GiB)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        check_loadable(path, size + _external_bytes(proto, path.parent), "ONNX model with its external data")
        onnx.load_external_data_for_model(proto, str(path.parent))  # refuses locations outside the folder
        onnx.checker.check_model(proto)
    except BadInput:
        raise
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: the file is the problem
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path} is not a valid ONNX model ({first})") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not 7 <= opset <= 23:
        raise BadInput(f"{path}: ONNX opset {opset} is outside the supported range 7-23")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) < 1:
        raise BadInput(f"{path}: expected one image input and a logits output, found {len(inputs)} inputs")
    return proto


def _external_bytes(proto, folder: Path) -> int:
    """Bytes the initializers stored outside the file will take (each one's `length`, else its declared shape
    times its element size); BadInput for an external file that is mostly holes (a sparse file posing as GBs
    of weights)."""
    import numpy as np
    from onnx import helper

    total, files = 0, set()
    for tensor in proto.graph.initializer:
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        files.add(entries.get("location", ""))
        length = entries.get("length", "")
        total += int(length) if length.isdigit() else int(
            np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    for name in filter(None, files):
        file = folder / name
        stat = file.stat() if file.is_file() else None  # a missing file: onnx's loader names it
        if stat and stat.st_size > (1 << 20) and stat.st_blocks * 512 < stat.st_size // 2:
            raise BadInput(f"{file}: the external data file is mostly holes ({stat.st_blocks * 512:,} of "
                           f"{stat.st_size:,} bytes stored), not weights an exporter wrote")
    return total


def shipped_weights(name: str, data: str) -> Path | None:
    path = WEIGHTS_DIR / f"{name}-{data}.pt"
    return path if path.is_file() else None


def load_teacher(spec: str, weights: str, data_name: str, in_channels: int, num_classes: int,
                 mean: list[float], std: list[float]) -> tuple[nn.Module, dict]:
    """The teacher, with the shipped zoo weights when no weights are given and some exist for this data."""
    if spec in ZOO and not weights:
        shipped = shipped_weights(spec, data_name)
        if shipped is None:
            raise BadInput(f"zoo teacher {spec} has no shipped weights for data {data_name!r}: pass --teacher-weights "
                           f"CKPT, or train one with `python -m edgecompress.models.train_teacher {spec} --data ...`")
        return build_model(spec, str(shipped), in_channels, num_classes, mean, std, "teacher")
    if libraries.is_library_spec(spec) and not weights:
        raise BadInput(f"teacher {spec} needs its trained weights: pass --teacher-weights CKPT (edgecompress never "
                       "downloads pretrained weights)")
    return build_model(spec, weights, in_channels, num_classes, mean, std, "teacher")


def teacher_preprocess(spec: str, weights: str, data_name: str) -> tuple[dict, str]:
    """The preprocessing fields the teacher carries, read without building it, and where they came from:
    an edgecompress checkpoint's meta (input_size, in_channels, mean, std and an optional `preprocess` dict
    with resize/interpolation), or an ONNX teacher's metadata_props `preprocess` (JSON with the same keys as
    the [preprocess] table) and its input's static shape. Empty when the teacher says nothing."""
    found: dict = {}
    path = Path(weights) if weights else (shipped_weights(spec, data_name) if spec in ZOO else None)
    library_source = ""
    if libraries.is_library_spec(spec):  # the library's record for the architecture; a checkpoint's meta wins
        found, library_source = libraries.preprocess(spec), f"{spec.partition(':')[0]}'s recipe for {spec}"
    if path is not None and path.is_file():
        _, meta = read_checkpoint(path)
        if not {"input_size", "in_channels", "mean", "std", "preprocess"} & set(meta) and library_source:
            return _checked_contract(found, library_source), library_source
        source = f"the teacher checkpoint's meta ({path.name})"
        if isinstance(meta.get("input_size"), list):
            found["size"] = meta["input_size"]
        if meta.get("in_channels") in (1, 3):
            found["channels"] = "rgb" if meta["in_channels"] == 3 else "grey"
        for key in ("mean", "std"):
            if isinstance(meta.get(key), list):
                found[key] = meta[key]
        if isinstance(meta.get("preprocess"), dict):
            found.update({k: v for k, v in meta["preprocess"].items()
                          if k in ("size", "resize", "interpolation", "mean", "std", "channels")})
        return _checked_contract(found, source), source
    if spec.endswith(".onnx") and Path(spec).is_file():
        import json

        proto = check_onnx(Path(spec))
        source = f"the ONNX teacher's metadata ({Path(spec).name})"
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        static = [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims[1:]) else []
        if len(static) == 4 and static[1] in (1, 3):
            found.update(size=static[2:], channels="rgb" if static[1] == 3 else "grey")
        props = {p.key: p.value for p in proto.metadata_props}
        if "preprocess" in props:
            try:
                declared = json.loads(props["preprocess"])
            except ValueError:
                raise BadInput(f"{spec}: metadata_props `preprocess` is not JSON") from None
            if not isinstance(declared, dict):
                raise BadInput(f"{spec}: metadata_props `preprocess` must be a JSON object")
            found.update({k: v for k, v in declared.items()
                          if k in ("size", "resize", "interpolation", "mean", "std", "channels")})
        return _checked_contract(found, source), source
    if found:
        return _checked_contract(found, library_source), library_source
    return {}, ""


def _checked_contract(found: dict, source: str) -> dict:
    """The fields as the [preprocess] table would hold them, refused with one line when malformed."""
    from edgecompress.config import PreprocessConfig, RunConfig

    try:
        conf = RunConfig(preprocess=PreprocessConfig(**found))
        conf._validate_preprocess()
    except (TypeError, BadInput) as exc:
        raise BadInput(f"the preprocessing recorded in {source} is malformed: {exc}") from None
    return {k: getattr(conf.preprocess, k) for k in found}
