"""Image folders and CSV/TSV lists: indexed, not decoded, at load; decoded once into a packed file.

Indexing lists every file with its label, byte size and modification time: the data fingerprint is their
hash, so no run decodes an image to know whether the data changed, and any edited, added or removed file or
changed label changes it. A fingerprint and geometry seen before find their packed file in the cache folder
(the run directory's `data/`); otherwise every header is checked, then the images are decoded, fixed, resized
and cropped by a torch DataLoader with worker processes and written in order into the packed file, which is
renamed into place only when complete. Memory stays that of one batch whatever the number of images.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..errors import BadInput
from . import images
from .packed import PackedImages
from .preprocess import Geometry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DECODE_BATCH = 32
MAX_UNDECLARED_SIDE = 1024  # the data's own size serves as the input size only up to this many pixels a side


@dataclass
class Entry:
    path: Path
    label: int
    split: str  # train | eval


def default_workers() -> int:
    """Decoding workers: one per core, at most 8 (the main process only writes what they decode)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if found:
            try:
                sub.name.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8, kept by Python as lone surrogates
                raise BadInput(f"class folder {str(sub).encode('utf-8', 'backslashreplace').decode()} is not named in "
                               "UTF-8: the name goes into run.toml and the reports; rename the folder") from None
            classes[sub.name] = found
    return classes


def index_folder(folder: Path) -> tuple[list[Entry], list[str], bool]:
    """Entries of an image folder (one sub-folder per class, or train/ and test|val/ laid out that way),
    the class names, and whether the folder has its own eval split. Non-regular files are not listed."""
    eval_dir = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    train_dir = folder / "train" if eval_dir is not None and (folder / "train").is_dir() else folder
    train = _scan_classes(train_dir)
    if not train:
        raise BadInput(f"no images in {folder}: expected one sub-folder per class holding "
                       f"{'/'.join(sorted(IMAGE_SUFFIXES))} files")
    classes = sorted(train)
    entries = [Entry(f, i, "train") for i, c in enumerate(classes) for f in train[c]]
    if eval_dir is not None:
        held = _scan_classes(eval_dir)
        unknown = sorted(set(held) - set(classes))
        if unknown:
            raise BadInput(f"{eval_dir} has classes the train folder lacks: {', '.join(unknown[:5])}")
        entries += [Entry(f, classes.index(c), "eval") for c in classes for f in held.get(c, [])]
    return entries, classes, eval_dir is not None


def index_list(path: Path) -> tuple[list[Entry], list[str], bool]:
    """Entries of a CSV (or, by suffix, TSV) of `path,label` lines, paths relative to the list's folder; an
    optional third column `split` (train | test | val) gives the eval split. A first line whose label column
    reads `label` is a header."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"cannot read the image list {path}: {exc}") from None
    if rows and len(rows[0]) >= 2 and rows[0][1].strip().lower() == "label":
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) not in (2, 3)]
    if not rows or bad:
        raise BadInput(f"{path}: expected `path{delimiter}label[{delimiter}split]` lines"
                       + (f"; line {bad[0]} has {len(rows[bad[0] - 1])} fields" if bad else ", found none"))
    labels = [r[1].strip() for r in rows]
    numeric = all(v.isdigit() for v in labels)
    classes = sorted(set(labels), key=int if numeric else str)
    lookup = {c: i for i, c in enumerate(classes)}
    entries, missing = [], []
    for r in rows:
        file = (path.parent / r[0].strip()) if not os.path.isabs(r[0].strip()) else Path(r[0].strip())
        split = r[2].strip().lower() if len(r) == 3 else "train"
        if split not in ("train", "test", "val"):
            raise BadInput(f"{path}: split must be train, test or val, got {r[2]!r} for {r[0]}")
        if not file.is_file():
            missing.append(r[0].strip())
        entries.append(Entry(file, lookup[r[1].strip()], "train" if split == "train" else "eval"))
    if missing:
        raise BadInput(f"{path}: {len(missing)} listed images do not exist (paths are relative to the list's folder), "
                       f"e.g. {', '.join(missing[:3])}")
    return entries, classes, any(e.split == "eval" for e in entries)


def fingerprint(entries: list[Entry]) -> str:
    """Hash of every file's path, size, modification time, label and split; no pixel is read."""
    listing = []
    for e in entries:
        st = e.path.stat()
        listing.append((str(e.path), st.st_size, st.st_mtime_ns, e.label, e.split))
    return files.sha256_json(listing)[:16]


class _Decoder(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], geometry: Geometry):
        self.paths, self.geometry = paths, geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, images.decode(self.paths[i], self.geometry), ""
        except images.BadImage as exc:
            return i, None, str(exc)


def _unbatched(items):
    return items


def _unreadable(path, why: str) -> BadInput:
    return BadInput(f"cannot read image {path}: {why} (--skip-bad-images leaves such files out)")


def _probe_geometry(entries: list[Entry], geometry: Geometry, skip_bad: bool, bad: dict) -> Geometry:
    """Fill size and channels the contract leaves open from the first readable image (today's rule)."""
    if geometry.size and geometry.channels:
        return geometry
    for e in entries:
        try:
            width, height, grey = images.header(e.path)
        except images.BadImage as exc:
            if not skip_bad:
                raise _unreadable(e.path, str(exc)) from None
            bad[str(e.path)] = str(exc)
            continue
        if not geometry.size and max(width, height) > MAX_UNDECLARED_SIDE:
            raise BadInput(f"the first image, {e.path}, is {width}x{height}, and with no input size declared every "
                           "image would be stored at that size: declare the size the teacher takes, e.g. "
                           "--input-size 224 --resize 256")
        return Geometry(geometry.size or (height, width), geometry.resize, geometry.interpolation,
                        geometry.channels or ("grey" if grey else "rgb"))
    raise BadInput(f"no readable image among the {len(entries)} files listed")


def _check_headers(entries: list[Entry], skip_bad: bool, bad: dict, progress) -> None:
    with progress(entries, "checking image headers") as bar:
        for e in bar:
            if str(e.path) in bad:
                continue
            try:
                images.header(e.path)
            except images.BadImage as exc:
                if not skip_bad:
                    raise _unreadable(e.path, str(exc)) from None
                bad[str(e.path)] = str(exc)


def pack(entries: list[Entry], geometry: Geometry, cache_dir: Path, skip_bad: bool, workers: int,
         progress, listing: str | None = None) -> tuple[PackedImages, list[Entry], dict, Geometry]:
    """The images of `entries`, decoded with `geometry` into `cache_dir`, reused when already there; `listing` is
    their fingerprint when the caller has it (it stats every file).

    Returns the packed images, the entries kept (in pack order), the files left out with their reasons, and the
    geometry with size and channels settled."""
    key = files.sha256_json({"files": listing or fingerprint(entries), "geometry": geometry.key()})[:16]
    data_path, meta_path = cache_dir / f"images-{key}.u8", cache_dir / f"images-{key}.json"
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["bad"] and not skip_bad:  # packed by a run that skipped them; this one did not ask to
            raise _unreadable(*next(iter(meta["bad"].items())))
        kept = [entries[i] for i in meta["kept"]]
        settled = Geometry(tuple(meta["size"]), geometry.resize, geometry.interpolation, meta["channels"])
        return PackedImages(data_path, len(kept), settled.image_shape), kept, meta["bad"], settled
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(".images-*.tmp"):  # left by a run killed while packing
        stale.unlink(missing_ok=True)
    bad: dict[str, str] = {}
    settled = _probe_geometry(entries, geometry, skip_bad, bad)
    _check_headers(entries, skip_bad, bad, progress)
    todo = [i for i, e in enumerate(entries) if str(e.path) not in bad]
    needed = len(todo) * int(np.prod(settled.image_shape))
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise BadInput(f"{len(todo)} images at {settled.size[0]}x{settled.size[1]} need {needed / 2**30:.1f} GiB in "
                       f"{cache_dir}, which has {free / 2**30:.1f} GiB free: free space, or choose a smaller "
                       "--input-size or another --out")
    loader = torch.utils.data.DataLoader(_Decoder([entries[i].path for i in todo], settled), batch_size=DECODE_BATCH,
                                         num_workers=workers if workers > 1 else 0, collate_fn=_unbatched)
    kept_positions, failure = [], ""
    batches = iter(loader)
    try:
        with files.atomic_path(data_path) as tmp, open(tmp, "wb") as out:
            with progress(batches, f"decoding {len(todo)} images", length=len(loader)) as bar:
                for batch in bar:
                    for i, pixels, error in batch:
                        entry = entries[todo[i]]
                        if pixels is None and not skip_bad:
                            failure = error
                            raise _unreadable(entry.path, error)
                        if pixels is None:
                            bad[str(entry.path)] = error
                            continue
                        out.write(pixels.tobytes())
                        kept_positions.append(todo[i])
            out.flush()
    finally:
        if failure:  # stop the decoding workers before the error line, or they print tracebacks as they die
            getattr(batches, "_shutdown_workers", lambda: None)()
    files.write_json(meta_path, {"kept": kept_positions, "bad": bad, "size": list(settled.size),
                                 "channels": settled.channels, "geometry": geometry.key()})
    return (PackedImages(data_path, len(kept_positions), settled.image_shape), [entries[i] for i in kept_positions],
            bad, settled)
