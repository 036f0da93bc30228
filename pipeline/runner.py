"""Runs stages against a run directory, make-style: a stage whose done.json fingerprint matches is skipped.

Each stage is a `Stage(name, run, inputs)`: `run(ctx) -> Path` writes only inside `ctx.stage_dir(name)` and
returns its artifact; `inputs(ctx)` is the part of the config and the upstream artifacts it depends on.
"""
from __future__ import annotations

import dataclasses

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click

from . import config as cfg
from . import data as datasets
from . import files
from .errors import BadInput
from .progress import bar


@dataclass
class RunContext:
    out: Path
    config: cfg.RunConfig
    quiet: bool = False
    force: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @cached_property
    def target(self):
        from edgecompress import targets

        target = targets.load(self.config.target)
        if self.config.max_latency_ms > 0:  # --max-latency-ms overrides the profile's budget
            budgets = dataclasses.replace(target.budgets, max_latency_ms=self.config.max_latency_ms)
            target = dataclasses.replace(target, budgets=budgets)
        return target

    @cached_property
    def teacher_contract(self) -> tuple[dict, str]:
        """The preprocessing fields the teacher carries, and where they came from ({} when it carries none)."""
        from edgecompress.models.loaders import teacher_preprocess

        t = self.config.teacher
        return teacher_preprocess(t.spec, t.weights, self.config.data)

    def _declared(self, name: str, empty) -> tuple[object, str]:
        value = getattr(self.config.preprocess, name)
        if value != empty:
            return value, "the config"
        carried, source = self.teacher_contract
        if name == "resize" and carried.get("resize") and carried.get("size") and self.config.preprocess.size:
            # The teacher's resize goes with its own size (256 for a 224 crop): keep the ratio at the size asked.
            return (datasets.scaled_resize(carried["resize"], carried["size"], self.config.preprocess.size),
                    f"{source}, scaled to the size asked")
        return (carried[name], source) if name in carried else (empty, "")

    @cached_property
    def geometry(self) -> datasets.Geometry:
        """Size, resize, interpolation and channels as declared or carried by the teacher; size and channels
        left None are the data's."""
        size, resize, interpolation, channels = (self._declared("size", []), self._declared("resize", -1),
                                                 self._declared("interpolation", ""), self._declared("channels", ""))
        return datasets.Geometry(tuple(size[0]) if size[0] else None, max(resize[0], 0),
                                 interpolation[0] or "bilinear", channels[0] or None)

    @cached_property
    def data(self) -> datasets.Dataset:
        ds = datasets.load(self.config.data, self.config.seed, self.config.skip_bad_images, self.geometry,
                           self.out / "data", self.config.loader_workers, self.progress)
        if ds.skipped:
            self.log(f"[data] skipped {len(ds.skipped)} unreadable images, e.g. {next(iter(ds.skipped))}")
        return ds

    @cached_property
    def preprocess(self) -> datasets.Preprocess:
        """The one preprocessing contract of this run (data/preprocess.py), each field with its source."""
        from .distill import methods as distillers

        ds, g = self.data, self.geometry
        sources = {}
        for name, empty, fallback in (("size", [], "the data's first image"), ("resize", -1, "the default (0)"),
                                      ("interpolation", "", "the default (bilinear)"),
                                      ("channels", "", "the data's first image")):
            sources[name] = self._declared(name, empty)[1] or fallback
        channels = "rgb" if ds.input_shape[0] == 3 else "grey"
        pre = datasets.Preprocess(tuple(ds.input_shape[1:]), g.resize, g.interpolation, channels, sources=sources)
        (mean, where), (std, _) = self._declared("mean", []), self._declared("std", [])
        if not mean:
            if distillers.METHODS.get(self.config.distill.method, distillers.Distiller).supplies_inputs:
                raise BadInput("data-free distillation takes the input normalisation from the teacher (training "
                               "images are not read), and the teacher records none: give --mean and --std (its "
                               "training per-channel mean/std of [0, 1] pixels), or pass --teacher-weights saved as "
                               '{"state_dict": ..., "meta": {"mean": [...], "std": [...]}}')
            mean, std = datasets.channel_stats(ds.x_train)
            where = "measured on the training images"
        if len(mean) != pre.num_channels and "'s recipe for " in where and pre.num_channels == 1:
            # a torchvision/timm architecture's ImageNet RGB statistics say nothing about grey training images
            mean, std = datasets.channel_stats(ds.x_train)
            where = f"measured on the training images ({where} gives RGB values, the images are grey)"
        if len(mean) != pre.num_channels:
            if len(mean) == 1:  # one value for all channels
                mean, std = list(mean) * pre.num_channels, list(std) * pre.num_channels
            else:
                raise BadInput(f"mean/std from {where} have {len(mean)} values but the models take {channels} "
                               f"images with {pre.num_channels} channels: give one value per channel")
        return pre.with_stats(mean, std, where)

    @property
    def data_stats(self) -> tuple[list[float], list[float]]:
        """The per-channel mean/std every model of the run carries (the contract's)."""
        return list(self.preprocess.mean), list(self.preprocess.std)

    @cached_property
    def teacher(self):
        """(model, info): the teacher in eval mode, taking [0, 1] pixels, checked against the data."""
        from edgecompress.models.loaders import load_teacher

        from .modelcheck import check_classifier

        ds = self.data
        model, info = load_teacher(self.config.teacher.spec, self.config.teacher.weights, ds.name,
                                   ds.input_shape[0], ds.num_classes, *self.data_stats)
        check_classifier(model, ds, "teacher")
        return model, info

    @cached_property
    def teacher_eval_logits(self):
        """The teacher's logits on the eval images (fp32, every core): quantize judges against them and verify
        reports them, so one `compress` runs the teacher over the eval split once."""
        import os

        from .runners import TorchRunner, predict

        return predict(TorchRunner(self.teacher[0], os.cpu_count() or 1), self.data.x_eval,
                       self.config.verify.eval_batch)

    @cached_property
    def teacher_inputs(self) -> dict:
        """What the teacher depends on, for the stages that run it: its spec, and its files by content."""
        spec = self.config.teacher.spec
        file = Path(spec.rpartition(":")[0] if ":" in spec else spec)
        weights = self.teacher[1]["weights"]
        return {"teacher": spec, "teacher_file": file if file.is_file() else spec,
                "teacher_weights": Path(weights) if weights else ""}

    def stage_dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def progress(self, items: Iterable | None, label: str, length: int | None = None):
        """A progress bar on stderr, or the bare iterable when quiet or not on a terminal."""
        return bar(items, label, length, self.quiet)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], Path]
    inputs: Callable[[RunContext], dict]


def digest(deps: dict) -> str:
    """Hash of a stage's inputs: plain values as they are, files (Path values) by their content."""
    return files.sha256_json({k: (files.sha256(v) if isinstance(v, Path) else v) for k, v in deps.items()})


def fingerprint(ctx: RunContext, stage: Stage) -> str:
    return digest({"stage": stage.name, **stage.inputs(ctx)})


def is_done(ctx: RunContext, stage: Stage, expected: str | None = None) -> bool:
    """True when the stage's done.json matches its current fingerprint and its artifact is intact."""
    done = ctx.out / stage.name / "done.json"
    if not done.is_file():
        return False
    try:
        record = json.loads(done.read_text())
        artifact = ctx.out / record["artifact"]
        return (record["fingerprint"] == (expected or fingerprint(ctx, stage)) and artifact.is_file()
                and files.sha256(artifact) == record["sha256"])
    except (ValueError, KeyError, OSError):
        return False


def rank() -> int:
    """This process's rank under torchrun (0 when run alone): only rank 0 writes shared files."""
    return int(os.environ.get("RANK", "0"))


def run_stage(ctx: RunContext, stage: Stage) -> Path:
    expected = fingerprint(ctx, stage)
    if not ctx.force and is_done(ctx, stage, expected):
        record = json.loads((ctx.out / stage.name / "done.json").read_text())
        ctx.log(f"[{stage.name}] up to date, skipped")
        return ctx.out / record["artifact"]
    if rank() == 0:
        (ctx.out / stage.name / "done.json").unlink(missing_ok=True)
    ctx.log(f"[{stage.name}] running")
    start = time.perf_counter()
    artifact = stage.run(ctx)
    seconds = time.perf_counter() - start
    ctx.timings[stage.name] = seconds
    if rank() != 0:
        return artifact
    files.write_json(ctx.out / stage.name / "done.json", {
        "fingerprint": expected, "artifact": str(artifact.relative_to(ctx.out)), "sha256": files.sha256(artifact),
        "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    ctx.log(f"[{stage.name}] done in {seconds:.1f} s -> {artifact.relative_to(ctx.out)}")
    return artifact


def refuse_links(out: Path) -> None:
    """BadInput when a symbolic link lies anywhere inside the run directory: every file a run writes or removes
    is under `out`, and a planted link would carry those writes and removals elsewhere."""
    for folder, dirs, names in os.walk(out):  # os.walk does not descend into linked folders; it lists them
        for name in dirs + names:
            path = Path(folder) / name
            if path.is_symlink():
                raise BadInput(f"the run directory holds a symbolic link, {path} -> {os.readlink(path)}: edgecompress "
                               "never writes through links; remove it, or give another --out")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the run directory for this process. The kernel drops an flock when its process dies, even by
    SIGKILL, so a crashed run never blocks the next one."""
    if rank() != 0:  # the other ranks of a torchrun job work under rank 0's lock
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the run directory {out}: {exc.strerror}; give another --out") from None
    refuse_links(out)
    try:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise BadInput(f"cannot write in the run directory {out}: {exc.strerror}; give another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise BadInput(f"run directory {out} is in use by {holder}: wait for it to finish, "
                           "or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def write_run_toml(ctx: RunContext) -> None:
    resolved = ctx.config.to_dict()
    calibration = datasets.stratified_sample(ctx.data.y_train, ctx.config.quantize.calibration_size, ctx.config.seed)
    resolved["splits"] = {**ctx.data.describe(), "calibration": len(calibration),
                          "calibration_indices_sha256_16": files.sha256_json(calibration.tolist())[:16],
                          "calibration_from": "train", "seed": ctx.config.seed}
    resolved["preprocess_resolved"] = ctx.preprocess.describe()
    ctx.log(f"[data] preprocessing: {ctx.preprocess.summary()}")
    resolved["versions"] = cfg.versions()
    resolved["host"] = cfg.host()
    files.write_text(ctx.out / "run.toml", "# Resolved configuration of this run, written by edgecompress.\n"
                     + cfg.to_toml(resolved))


def open_run(out: Path) -> cfg.RunConfig:
    """The config of an existing run directory, for the one-stage subcommands."""
    if not (out / "run.toml").is_file():
        raise BadInput(f"{out} is not a run directory (no run.toml): make one with `edgecompress compress --out {out}`")
    return cfg.from_dict(cfg.read_toml(out / "run.toml"), str(out / "run.toml"))
