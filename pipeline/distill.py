"""Distill stage: train the student with a registered method (distillers.py); a checkpoint each epoch makes it
resumable. Runs as one process, or under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on
CPU, nccl on CUDA): each rank takes its slice of every global batch, and only rank 0 writes files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from edgecompress.models import count_params
from edgecompress.models.loaders import build_model, import_callable, load_teacher

from . import config as cfg
from . import data as datasets
from . import datafree, distillers, files
from .data import augment, softlabels
from .distillers import FeatureTap, Setup
from .errors import BadInput, StageFailed
from .modelcheck import check_classifier
from .runner import RunContext, Stage, digest


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Distributed()
        return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values


def device_and_precision(setting: str, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """CUDA when present; bf16 autocast on CUDA, and on CPUs with AVX-512 BF16 or AMX unless fp32 is asked."""
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if setting == "fp32":
        return device, None
    if setting == "bf16" or device.type == "cuda" or cfg.cpu_has_bf16():
        return device, torch.bfloat16
    return device, None


def build_student(ctx: RunContext) -> nn.Module:
    ds = ctx.data
    model, _ = build_model(ctx.config.distill.student, "", ds.input_shape[0], ds.num_classes, *ctx.data_stats,
                           role="student")
    return model


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


def method_options(conf: cfg.DistillConfig) -> dict:
    """The options given to the method: distill.temperature/alpha for the methods that take them (Hinton-style
    KD terms), then distill.method_opts, which win."""
    cls = distillers.METHODS[conf.method]
    given = {k: v for k, v in (("temperature", conf.temperature), ("alpha", conf.alpha)) if cls.kd_config}
    return distillers.resolve_options(conf.method, {**given, **conf.method_opts})


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

    def cached() -> torch.Tensor | None:
        if cache.is_file():
            saved = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)  # large for many classes
            if saved.get("key") == key:
                return saved["logits"]
        return None

    if not dist.writer:
        dist.barrier()  # rank 0 computes and writes them meanwhile
        return cached()
    logits = cached()
    if logits is None:
        model = model.to(device).to(memory_format=torch.channels_last)
        x_all, out = ctx.data.x_train, []
        batch = datasets.inference_batch(x_all, 500)
        with ctx.progress(range(0, len(x_all), batch), f"teacher {which} logits") as bar:
            for i in bar:
                x = datasets.to_float(x_all[i:i + batch]).to(device).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    out.append(model(x).float().cpu())
        logits = torch.cat(out)
        if not torch.isfinite(logits).all():
            raise StageFailed("the teacher gives NaN or Inf logits on the training data: check its weights")
        with files.atomic_path(cache) as tmp:
            torch.save({"key": key, "logits": logits}, tmp)
    dist.barrier()
    return logits


def soft_label_key(ctx: RunContext) -> str:
    """What an epoch of FKD soft labels depends on: the teachers, the data, the seed and the augmentation (not the
    student or the method, so another student's run in the same directory replays them)."""
    conf, deps = ctx.config.distill, inputs(ctx)
    return digest({"seed": ctx.config.seed, "data": ctx.data.sha256_16, "augment": conf.augment,
                   "scale": list(conf.augment_scale), "topk": conf.soft_label_topk,
                   **{k: v for k, v in deps.items() if k.startswith("teacher")}})


def unwrap(model: nn.Module) -> nn.Module:
    return model.net if hasattr(model, "net") and hasattr(model, "mean_values") else model


def _resolve(model: nn.Module, path: str) -> str:
    """A user's module path, accepting it with or without the normalisation wrapper's `net.` prefix."""
    names = dict(model.named_modules())
    return path if path in names or f"net.{path}" not in names else f"net.{path}"


@torch.no_grad()
def stage_ends(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """The end of each stage: for every spatial size the network computes, the last module inside a
    Sequential that outputs a 4-D map of that size (a ResNet stage, a MobileNet block), in execution order."""
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
            num_train: int, new_student: Callable[[], nn.Module], probe: torch.Tensor) -> Prepared:
    """The method around `student`, with its layers paired and hooked and its extra modules sized by a probe
    forward of both models on a couple of real images."""
    cls = distillers.METHODS[method]
    setup = Setup(num_classes=num_classes, num_train=num_train, new_student=new_student)
    s_layers, t_layers, s_embed, t_embed = [], [], "", ""
    if cls.feature_maps:
        s_layers, t_layers = pair_layers(student, teacher if cls.teacher_features else None, opts, probe)
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


class DatasetBatches:
    """The training images in a seeded random order; each global batch split evenly between the ranks, so a
    torchrun job sees exactly the batches a single process would (what a DistributedSampler does, in the
    single-process order)."""

    def __init__(self, ds: datasets.Dataset, batch: int, dist: Distributed, device: torch.device):
        if batch % dist.world:
            raise BadInput(f"distill.batch {batch} must be divisible by the {dist.world} processes")
        self.x, self.y, self.batch, self.dist, self.device = ds.x_train, ds.y_train, batch, dist, device
        self.steps_per_epoch = len(self.y) // batch
        if self.steps_per_epoch == 0:
            raise BadInput(f"distill.batch {batch} is larger than the {len(self.y)} training images")
        if device.type == "cuda":  # page-locked host memory lets the copies overlap the compute
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y), generator=gen)
        share = self.batch // self.dist.world
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch][self.dist.rank * share:(self.dist.rank + 1) * share]
            x = datasets.to_float(self.x[idx].to(self.device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last), self.y[idx].to(self.device, non_blocking=True), idx


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
        except Exception as exc:  # user code
            raise BadInput(f"{view} failed on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from None
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
            raise BadInput(f"{view} must return (student_view, teacher_view) tensors, got {type(out).__name__}")
        return out

    return checked


def run(ctx: RunContext) -> Path:
    conf, ds, seed = ctx.config.distill, ctx.data, ctx.config.seed
    cls = distillers.METHODS[conf.method]
    if cls.supplies_inputs:  # data-free: synthesises its own inputs and never reads the training split
        return datafree.run(ctx)
    dist = Distributed.from_env()
    device, autocast = device_and_precision(conf.precision, dist.local_rank)
    dist.start(device)
    out_dir = ctx.stage_dir("distill")
    opts = method_options(conf)
    teachers = load_teachers(ctx) if cls.uses_teacher else []
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
                       len(ds.y_train), lambda: build_student(ctx), datasets.to_float(ds.x_eval[:2]))
    distiller = prepared.distiller.to(device).to(memory_format=torch.channels_last)
    views = pair_transform(distiller)
    teacher_online = cls.teacher_features or (views is not None and not distiller.teacher_view_is_input)
    augmenting = conf.augment != "none"
    if augmenting and teachers and conf.soft_labels == "online":
        teacher_online = True
    source = DatasetBatches(ds, conf.batch, dist, device)
    cached, soft_labels = None, None
    if teachers and not teacher_online and not augmenting:
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
    opt = torch.optim.SGD(distiller.parameters(), lr=conf.lr, momentum=0.9, nesterov=True,
                          weight_decay=conf.weight_decay)
    total_steps = conf.epochs * source.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=conf.lr, total_steps=total_steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    history, start_epoch = [], 0
    ckpt_path, key = out_dir / "last.ckpt", digest(inputs(ctx))
    ckpt = None if ctx.force else distillers.restore_checkpoint(  # --force means from scratch
        ckpt_path, key, {"distiller": distiller, "optimizer": opt, "scheduler": sched, "generator": gen})
    if ckpt:
        torch.set_rng_state(ckpt["torch_rng"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        ctx.log(f"[distill] resuming after epoch {start_epoch}/{conf.epochs}")
    dist.barrier()  # no rank may overwrite last.ckpt before every rank has read it

    def amp():
        return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)

    height, width = ds.input_shape[1:]
    for epoch in range(start_epoch, conf.epochs):
        model.train()
        began, sums, names = time.perf_counter(), None, []
        correct = torch.zeros((), device=device)
        views_of_epoch = augment.crop_params(len(ds.y_train), height, width, conf.augment, tuple(conf.augment_scale),
                                             seed, epoch) if augmenting else None
        replay = record = None
        if soft_labels is not None and soft_labels.ready(epoch):
            replay = soft_labels.open(epoch)
            views_of_epoch = torch.from_numpy(np.array(replay.params))
        elif soft_labels is not None and dist.world == 1:  # under torchrun each rank sees a slice: not recorded
            record = soft_labels.create(epoch)
        run_teacher = teacher_online or (soft_labels is not None and replay is None)
        with ctx.progress(enumerate(source.epoch(gen)), f"epoch {epoch + 1}/{conf.epochs}",
                          length=source.steps_per_epoch) as bar:
            for step, (x, y, idx) in bar:
                distiller.progress = (epoch * source.steps_per_epoch + step) / total_steps
                if views_of_epoch is not None:
                    x = augment.apply(x, views_of_epoch[idx])
                x_student, x_teacher = views(x) if views is not None else (x, x)
                t_logits, t_feats = (cached[:, idx].to(device, non_blocking=True) if cached is not None else None), None
                if replay is not None:
                    t_logits = replay.logits(idx).to(device, non_blocking=True)
                if run_teacher:
                    with torch.no_grad(), amp():
                        t_logits = torch.stack([m(x_teacher).float() for m, _ in teachers])
                    t_feats = teacher_taps[0].take() if teacher_taps else None
                    if record is not None:
                        record.record(idx, views_of_epoch[idx], t_logits)
                if t_logits is not None and not cls.many_teachers:
                    t_logits = t_logits[0]
                with amp():
                    logits, losses = model(x_student, y, t_logits, t_feats, idx.to(device) if cls.needs_index else None)
                distillers.optimizer_step(sum(losses.values()), opt, sched, epoch, conf.lr, ckpt_path)
                values = torch.stack([v.detach().float() for v in losses.values()]) * len(y)
                sums, names = (values if sums is None else sums + values), list(losses)
                correct += (logits.argmax(1) == y).sum()
        if record is not None:
            with torch.no_grad(), amp():  # the images this epoch's last partial batch left out, for other batch sizes
                for idx in record.missing().split(conf.batch):
                    x = augment.apply(datasets.to_float(ds.x_train[idx]).to(device), views_of_epoch[idx])
                    record.record(idx, views_of_epoch[idx], torch.stack([m(x).float() for m, _ in teachers]))
            record.finish()
        seconds = time.perf_counter() - began
        totals = dist.sum(torch.cat([sums, correct[None]])).tolist()
        seen = source.steps_per_epoch * conf.batch
        history.append({"epoch": epoch + 1, **{k: round(v / seen, 5) for k, v in zip(names, totals)},
                        "train_top1": round(totals[-1] / seen, 5), "seconds": round(seconds, 2),
                        "teacher": ("online" if run_teacher else "fkd cache" if replay is not None
                                    else "cached logits" if cached is not None else "none"),
                        "images_per_s": round(seen / seconds, 1)})
        ctx.log(f"[distill] epoch {epoch + 1}/{conf.epochs} " +
                " ".join(f"{k}={v}" for k, v in history[-1].items() if k != "epoch"))
        if dist.writer:
            with files.atomic_path(ckpt_path) as tmp:
                torch.save({"key": key, "epoch": epoch + 1, "distiller": distiller.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "history": history}, tmp)

    for tap in teacher_taps:
        tap.remove()
    if distiller.tap:
        distiller.tap.remove()
    artifact = out_dir / "student.pt"
    if dist.writer:
        student = distiller.student.cpu().to(memory_format=torch.contiguous_format).eval()
        files.write_json(out_dir / "history.json", {
            "method": conf.method, "options": opts, "teachers": [spec for spec, _ in teacher_specs(ctx)] if teachers else [],
            "student_layers": prepared.student_layers, "teacher_layers": prepared.teacher_layers,
            "device": str(device), "processes": dist.world,
            "autocast": str(autocast) if autocast else "fp32", "epochs": history})
        spec = {"student": conf.student, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                "classes": ds.classes, "mean": ctx.data_stats[0], "std": ctx.data_stats[1],
                "preprocess": ctx.preprocess.describe(),
                "params": count_params(student)}
        with files.atomic_path(artifact) as tmp:
            torch.save({"state_dict": student.state_dict(), "spec": spec}, tmp)
    dist.barrier()
    return artifact


STAGE = Stage("distill", run, inputs)
