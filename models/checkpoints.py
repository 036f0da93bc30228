"""Reading checkpoints without running anything in them, in the layouts training scripts write.

torch.load(weights_only=True): a pickle that needs anything beyond tensors and plain containers (and argparse's
Namespace, which torchvision's and timm's scripts save) is refused. Sizes are checked before loading: a
checkpoint is a zip of stored entries, so one that expands far beyond its file, or beyond the memory this
machine has available, is refused before a byte is unpacked.
"""
from __future__ import annotations

import argparse
import math
import warnings
import zipfile
from pathlib import Path

import torch

from edgecompress.errors import BadInput


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_loadable(path: Path, unpacked: int, what: str) -> None:
    """BadInput when loading `unpacked` bytes would take more than half the memory available."""
    free = available_memory()
    if free is not None and unpacked > free // 2:
        raise BadInput(f"{path}: loading this {what} takes {unpacked / 2**30:.1f} GiB, more than half the "
                       f"{free / 2**30:.1f} GiB of memory available here")


def _check_archive(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInput(f"{path} is not a readable PyTorch checkpoint ({exc}); "
                       "save one with torch.save(model.state_dict(), path)") from None
    unpacked, size = sum(e.file_size for e in entries), path.stat().st_size
    if unpacked > 2 * size + (64 << 20):  # torch.save stores its entries uncompressed
        raise BadInput(f"{path} expands to {unpacked / 2**20:,.0f} MiB from a {size / 2**20:,.1f} MiB file: "
                       "torch.save writes uncompressed entries, so this is not a checkpoint it wrote")
    check_loadable(path, unpacked, "checkpoint")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict from a checkpoint file, and the `meta` dict beside it (the shipped zoo weights carry one).

    Accepted: a bare state dict; a dict holding one under a key of STATE_KEYS (the training scripts' layouts,
    `meta["checkpoint_key"]` says which was read); names with a DDP `module.` or torch.compile prefix."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; older torch a pickle stream starting with the PROTO opcode 0x80.
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise BadInput(f"{path} is not a PyTorch checkpoint; save one with torch.save(model.state_dict(), path)")
    if head[:2] == b"PK":
        _check_archive(path)
    else:
        check_loadable(path, path.stat().st_size, "checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols on stderr
            # torchvision's and timm's training scripts store their argparse.Namespace beside the weights: a
            # bag of attributes, safe to rebuild; everything else must still be tensors and plain containers.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # untrusted bytes: whatever the unpickler raises, the file is the problem
        # Keep torch's specific line, not its generic advice to retry with weights_only=False.
        text = str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and not line.startswith(("Weights only load failed", "Check the documentation", "Please file"))]
        if "weightsunpickler error" in text.lower() or "unsupported global" in text.lower():
            detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
            raise BadInput(f"{path} was refused: it holds more than tensors and plain containers "
                           f"({detail[:160] or 'unsupported content'}), and loading it would need "
                           "arbitrary unpickling; save a plain state dict with torch.save(model.state_dict(), path)") from None
        reason = lines[0][:160] if lines else type(exc).__name__
        raise BadInput(f"{path} is not a readable PyTorch checkpoint ({reason}); "
                       "save one with torch.save(model.state_dict(), path)") from None
    meta = {}
    if isinstance(obj, dict) and not _is_state_dict(obj):
        meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
        key = next((k for k in STATE_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise BadInput(f"{path} is not a state dict (a mapping of names to tensors), nor holds one under "
                           f"{' / '.join(STATE_KEYS)} (found keys {', '.join(map(str, list(obj)[:6])) or 'none'}); "
                           "save one with torch.save(model.state_dict(), path)")
        obj, meta["checkpoint_key"] = obj[key], key
    if not _is_state_dict(obj):
        raise BadInput(f"{path} is not a state dict (a mapping of names to tensors); "
                       "save one with torch.save(model.state_dict(), path)")
    hollow = next((k for k, v in obj.items() if v.is_meta), None)
    if hollow is not None:  # saved from a model built on the meta device: shapes without values
        raise BadInput(f"{path}: tensor {hollow} has no data (it lives on the meta device); save the trained "
                       "model's state_dict()")
    _check_meta(meta, path)
    return {k: v.float() if v.is_floating_point() else v for k, v in _strip_wrappers(obj).items()}, meta


# Where training scripts keep the weights: edgecompress and timm (`state_dict`, `state_dict_ema`), torchvision's
# reference scripts (`model`, `model_ema`). The plain weights win over the EMA ones when both are present.
STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes wrappers add to every name: DistributedDataParallel / EMA wrappers, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as the bare model's state_dict() gives them: wrapper prefixes removed, and the averaging
    counter torch.optim.swa_utils.AveragedModel keeps (torchvision's EMA) dropped."""
    state = {k: v for k, v in state.items() if k != "n_averaged"}
    for prefix in WRAPPER_PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state



def _check_meta(meta: dict, path: Path) -> None:
    """The normalisation a checkpoint's meta records, refused with one line when it is not one."""
    for key in ("mean", "std"):
        if key in meta:
            values = meta[key]
            if not (isinstance(values, list) and values and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise BadInput(f"{path}: meta.{key} must be a list of numbers, got {values!r:.80}")
            if key == "std" and any(v <= 0 for v in values):
                raise BadInput(f"{path}: meta.std must be > 0, got {values}")
