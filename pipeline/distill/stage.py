"""Distill stage: train the student with a registered method (methods/); a checkpoint each epoch makes it
resumable. Runs as one process, or under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on
CPU, nccl on CUDA): each rank takes its slice of every global batch, and only rank 0 writes files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from edgecompress.models import count_params
from edgecompress.models.loaders import import_callable, load_teacher

from .. import data as datasets
from .. import files
from . import methods as distillers
from ..data import augment, softlabels
from .methods import method_options
from ..errors import BadInput, StageFailed
from ..modelcheck import check_classifier
from ..runner import RunContext, Stage, digest
from . import datafree, feature_cache, trainer
from .layers import prepare
from .trainer import Distributed, build_student, device_and_precision


def teacher_specs(ctx: RunContext) -> list[tuple[str, str]]:
    """(spec, weights) of every teacher, the first being `teacher.spec` (the one verify compares against)."""
    t = ctx.config.teacher
    extra_weights = t.extra_weights or [""] * len(t.extra)
    return [(t.spec, t.weights), *zip(t.extra, extra_weights)]


def load_teachers(ctx: RunContext) -> list[tuple[nn.Module, dict]]:
    ds, loaded = ctx.data, [ctx.teacher]
    for spec, weights in teacher_specs(ctx)[1:]:
        model, info = load_teacher(spec, weights, ds.name, ds.input_shape[0], ds.num_classes, *ctx.data_stats)
        check_classifier(model, ds, f"teacher {spec}")
        loaded.append((model, info))
    return loaded


def inputs(ctx: RunContext) -> dict:
    if distillers.METHODS[ctx.config.distill.method].supplies_inputs:
        return datafree.inputs(ctx)
    deps = {"distill": ctx.config.distill.__dict__, "seed": ctx.config.seed, "data": ctx.data.sha256_16,
            **ctx.teacher_inputs}
    for i, (spec, weights) in enumerate(teacher_specs(ctx)[1:], 1):
        deps[f"teacher{i}"] = Path(spec) if Path(spec).is_file() else spec
        deps[f"teacher{i}_weights"] = Path(weights) if weights else ""
    view = ctx.config.distill.method_opts.get("view", "")
    if isinstance(view, str) and ".py:" in view:  # a user pair transform: its code is an input too
        deps["view_file"] = Path(view.rpartition(":")[0])
    return deps


@torch.inference_mode()
def teacher_logits(ctx: RunContext, which: int, model: nn.Module, device: torch.device,
                   autocast: torch.dtype | None, dist: Distributed) -> torch.Tensor:
    """Teacher `which`'s logits for every training image, computed once (by rank 0): the data is not augmented,
    so they never change."""
    name = "teacher_logits.pt" if which == 0 else f"teacher_logits.{which}.pt"
    cache = ctx.stage_dir("distill") / name
    if which == 0:
        key = digest({"seed": ctx.config.seed, "data": ctx.data.sha256_16, **ctx.teacher_inputs})
    else:
        deps = inputs(ctx)
        key = digest({"seed": ctx.config.seed, "data": ctx.data.sha256_16, "teacher": deps[f"teacher{which}"],
                      "teacher_weights": deps[f"teacher{which}_weights"]})

    def compute() -> dict:
        teacher = model.to(device).to(memory_format=torch.channels_last)
        x_all, out = ctx.data.x_train, []
        batch = datasets.inference_batch(x_all, 500)
        with ctx.progress(range(0, len(x_all), batch), f"teacher {which} logits") as bar:
            for i in bar:
                x = datasets.to_float(x_all[i:i + batch]).to(device).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    out.append(teacher(x).float().cpu())
        logits = torch.cat(out)
        if not torch.isfinite(logits).all():
            raise StageFailed("the teacher gives NaN or Inf logits on the training data: check its weights")
        return {"logits": logits}

    return trainer.computed_once(cache, key, compute, dist)["logits"]


def soft_label_key(ctx: RunContext) -> str:
    """What an epoch of FKD soft labels depends on: the teachers, the data, the seed, the augmentation and the
    precision the teacher runs in (not the student or the method, so another student's run in the same directory
    replays them)."""
    conf, deps = ctx.config.distill, inputs(ctx)
    return digest({"seed": ctx.config.seed, "data": ctx.data.sha256_16, "augment": conf.augment,
                   "scale": list(conf.augment_scale), "topk": conf.soft_label_topk, "precision": conf.precision,
                   **{k: v for k, v in deps.items() if k.startswith("teacher")}})


class DatasetBatches:
    """The training images in a seeded random order; each global batch split evenly between the ranks, so a
    torchrun job sees exactly the batches a single process would (what a DistributedSampler does, in the
    single-process order). With `views` set (TeacherAnswers sets each epoch's), each image is cropped, resized
    and flipped as uint8 on the CPU before it becomes float: half the cost of the same on float pixels."""

    has_labels = True
    views: torch.Tensor | None = None

    def __init__(self, ds: datasets.Dataset, batch: int, dist: Distributed, device: torch.device):
        if batch % dist.world:
            raise BadInput(f"distill.batch {batch} must be divisible by the {dist.world} processes")
        self.x, self.y, self.batch, self.dist, self.device = ds.x_train, ds.y_train, batch, dist, device
        self.steps_per_epoch = len(self.y) // batch
        if self.steps_per_epoch == 0:
            raise BadInput(f"distill.batch {batch} is larger than the {len(self.y)} training images")
        self.pin = device.type == "cuda"  # page-locked host memory lets the copies overlap the compute

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y), generator=gen)
        share = self.batch // self.dist.world
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch][self.dist.rank * share:(self.dist.rank + 1) * share]
            x, y = self.x[idx], self.y[idx]
            if self.views is not None:
                x = augment.apply(x, self.views[idx])
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = datasets.to_float(x.to(self.device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last), y.to(self.device, non_blocking=True), idx


def pair_transform(distiller: distillers.Distiller) -> Callable | None:
    """The method's (student view, teacher view) transform: built in, or the user's `file.py:function`."""
    view = distiller.hp.get("view") if isinstance(distiller, distillers.CrossModal) else None
    if view is None:
        return None
    if distiller.pair_transform is not None:
        return distiller.pair_transform
    if ".py:" not in view:
        raise BadInput(f"cross-modal: view must be one of {', '.join(distillers.VIEWS)} or path/to/file.py:function, "
                       f"got {view!r}")
    user = import_callable(view)

    def checked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            out = user(x)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # user code, sys.exit() included
            raise BadInput(f"{view} failed on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from None
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
            raise BadInput(f"{view} must return (student_view, teacher_view) tensors, got {type(out).__name__}")
        return out

    return checked


class TeacherAnswers:
    """The teacher's side of each distill step (trainer.Teacher): the epoch's augmented views (drawn here, applied
    by the batch source), the student's and teacher's views of a cross-modal method, and the teachers' logits
    (and features) from the un-augmented logit cache, the FKD cache (replayed, or recorded as the teacher runs),
    the teacher online, or nothing for methods without a teacher."""

    def __init__(self, ctx: RunContext, source: DatasetBatches, teachers: list, taps: list, views: Callable | None,
                 online: bool, cached: torch.Tensor | None, soft_labels: softlabels.SoftLabelCache | None, many: bool,
                 device: torch.device, amp: Callable, dist: Distributed,
                 cached_features: feature_cache.CachedFeatures | None = None):
        self.ctx, self.source, self.teachers, self.taps = ctx, source, teachers, taps
        self.cached_features = cached_features
        self.views, self.online = views, online
        self.cached, self.soft_labels, self.many, self.device, self.amp, self.dist = (cached, soft_labels, many,
                                                                                      device, amp, dist)
        conf = ctx.config.distill
        self.augment, self.scale, self.seed = conf.augment, tuple(conf.augment_scale), ctx.config.seed
        self.count, (self.height, self.width) = len(ctx.data.y_train), ctx.data.input_shape[1:]

    def begin(self, epoch: int) -> str:
        self.epoch_views = augment.crop_params(self.count, self.height, self.width, self.augment, self.scale,
                                               self.seed, epoch) if self.augment != "none" else None
        self.replay = self.record = None
        if self.soft_labels is not None and self.soft_labels.ready(epoch):
            self.replay = self.soft_labels.open(epoch)
            self.epoch_views = torch.from_numpy(np.array(self.replay.params))
        elif self.soft_labels is not None and self.dist.world == 1:  # under torchrun a rank sees a slice: not recorded
            self.record = self.soft_labels.create(epoch)
        self.source.views = self.epoch_views  # the batches come augmented
        self.run_teacher = self.online or (self.soft_labels is not None and self.replay is None)
        return ("online" if self.run_teacher else "fkd cache" if self.replay is not None
                else "cached features" if self.cached_features is not None
                else "cached logits" if self.cached is not None else "none")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.amp():
            return torch.stack([m(x).float() for m, _ in self.teachers])

    def answer(self, x: torch.Tensor, idx: torch.Tensor):
        x_student, x_teacher = self.views(x) if self.views is not None else (x, x)
        logits, features = None, None
        if self.cached is not None:
            logits = self.cached[:, idx].to(self.device, non_blocking=True)
            if self.cached_features is not None:
                features = self.cached_features.take(idx, self.device)
        elif self.replay is not None:
            logits = self.replay.logits(idx).to(self.device, non_blocking=True)
        elif self.run_teacher:
            logits = self._forward(x_teacher)
            features = self.taps[0].take() if self.taps else None
            if self.record is not None:
                self.record.record(idx, self.epoch_views[idx], logits)
        if logits is not None and not self.many:
            logits = logits[0]
        return x_student, logits, features

    def end(self) -> None:
        if self.record is None:
            return
        data = self.ctx.data
        for idx in self.record.missing().split(self.ctx.config.distill.batch):  # those the last partial batch left out
            x = datasets.to_float(augment.apply(data.x_train[idx], self.epoch_views[idx])).to(self.device)
            self.record.record(idx, self.epoch_views[idx], self._forward(x))
        self.record.finish()


def run(ctx: RunContext) -> Path:
    cls = distillers.METHODS[ctx.config.distill.method]
    if cls.supplies_inputs:  # data-free: synthesises its own inputs and never reads the training split
        return datafree.run(ctx)
    teachers = load_teachers(ctx) if cls.uses_teacher else []
    with trainer.lent([m for m, _ in teachers]):
        return train(ctx, cls, teachers)


def train(ctx: RunContext, cls: type, teachers: list[tuple[nn.Module, dict]]) -> Path:
    conf, ds, seed = ctx.config.distill, ctx.data, ctx.config.seed
    dist = Distributed.from_env()
    device, autocast = device_and_precision(conf.precision, dist.local_rank)
    dist.start(device)
    out_dir = ctx.stage_dir("distill")
    opts = method_options(conf)
    if len(teachers) > 1 and not cls.many_teachers:
        raise BadInput(f"method {conf.method} uses one teacher but {len(teachers)} were given: "
                       "use --method multi-teacher, or give one --teacher")
    if cls.teacher_features:
        for _, info in teachers:
            if info.get("kind") in ("onnx", "torchscript"):
                raise BadInput(f"method {conf.method} needs the teacher's intermediate features, which a "
                               f"{info['kind']} teacher cannot show: give a zoo name or file.py:factory teacher, "
                               "or use a logit-based method (hinton, dkd, multi-teacher, adversarial, cross-modal)")

    torch.manual_seed(seed)
    student = build_student(ctx)
    prepared = prepare(conf.method, opts, student, teachers[0][0] if teachers else None, ds.num_classes,
                       ds.y_train, lambda: build_student(ctx), datasets.to_float(ds.x_eval[:2]))
    distiller = prepared.distiller.to(device).to(memory_format=torch.channels_last)
    views = pair_transform(distiller)
    augmenting = conf.augment != "none"
    cached_features = None
    if cls.teacher_features and not augmenting and views is None and conf.feature_cache_gb > 0:
        cached_features = feature_cache.build(ctx, teachers[0][0], prepared.teacher_tap, device, autocast, dist,
                                              conf.feature_cache_gb)
    teacher_online = ((cls.teacher_features and cached_features is None)
                      or (views is not None and not distiller.teacher_view_is_input))
    if augmenting and teachers and conf.soft_labels == "online":
        teacher_online = True
    source = DatasetBatches(ds, conf.batch, dist, device)
    cached, soft_labels = None, None
    if cached_features is not None:
        cached = cached_features.logits[None]
    elif teachers and not teacher_online and not augmenting:
        cached = torch.stack([teacher_logits(ctx, i, m, device, autocast, dist) for i, (m, _) in enumerate(teachers)])
    elif teachers and not teacher_online:  # augmented views: the FKD cache replays or records each epoch
        soft_labels = softlabels.SoftLabelCache(out_dir / "soft_labels", soft_label_key(ctx), len(ds.y_train),
                                                ds.num_classes, len(teachers), conf.soft_label_topk)
    teacher_taps = [prepared.teacher_tap] if prepared.teacher_tap else []
    if teacher_online or soft_labels is not None:
        for m, _ in teachers:
            m.to(device).to(memory_format=torch.channels_last).eval()

    model = distiller
    if dist.world > 1:
        # broadcast_buffers off: CRD's memory bank is a buffer, far too big to broadcast every step; BN running
        # statistics then stay per rank, and rank 0's are saved
        model = nn.parallel.DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)

    def amp():
        return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)

    answers = TeacherAnswers(ctx, source, teachers, teacher_taps, views, teacher_online, cached, soft_labels,
                             cls.many_teachers, device, amp, dist, cached_features)
    schedule = trainer.Schedule(conf.epochs, conf.lr, conf.weight_decay, seed, conf.max_grad_norm)
    history = trainer.fit(distiller, source, answers, schedule, out_dir / "last.ckpt", digest(inputs(ctx)), ctx,
                          device, autocast, dist, model, cls.needs_index)

    for tap in teacher_taps:
        tap.remove()
    if distiller.tap:
        distiller.tap.remove()
    artifact = out_dir / "student.pt"
    if dist.writer:
        sample = ds.x_train[datasets.stratified_sample(ds.y_train, trainer.BN_ADAPTATION_IMAGES, seed)]
        adapted = trainer.adapt_batchnorm(distiller.student, sample, conf.batch, device,
                                          (lambda x: views(x)[0]) if views is not None else None)
        student = distiller.student.cpu().to(memory_format=torch.contiguous_format).eval()
        files.write_json(out_dir / "history.json", {
            "method": conf.method, "options": opts, "teachers": [spec for spec, _ in teacher_specs(ctx)] if teachers else [],
            "student_layers": prepared.student_layers, "teacher_layers": prepared.teacher_layers,
            "device": str(device), "processes": dist.world,
            "autocast": str(autocast) if autocast else "fp32", "epochs": history,
            "batchnorm_adapted_on_images": adapted})
        spec = {"student": conf.student, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                "classes": ds.classes, "mean": ctx.data_stats[0], "std": ctx.data_stats[1],
                "preprocess": ctx.preprocess.describe(),
                "params": count_params(student)}
        with files.atomic_path(artifact) as tmp:
            torch.save({"state_dict": student.state_dict(), "spec": spec}, tmp)
    dist.barrier()
    return artifact


STAGE = Stage("distill", run, inputs)
