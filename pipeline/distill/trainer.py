"""The one training loop of the distill stage, for every method, data-free included.

A run is a `fit` of a distiller over batches from a source (the training images, or images synthesised from the
teacher) with the teacher's answers from a `Teacher` (cached logits, the FKD cache, the teacher online, or none):
SGD with Nesterov momentum and a OneCycle schedule, the gradient's norm clipped (distill.max_grad_norm), a guard
that stops on a NaN or Inf loss or gradient, a checkpoint after
every epoch from which a killed run resumes, and one history row per epoch. The stages differ only in what they
hand to it.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from .. import config as cfg
from .. import data as datasets
from .. import files
from ..errors import StageFailed


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


@contextlib.contextmanager
def lent(models: list[nn.Module]) -> Iterator[None]:
    """The run context's teachers are shared by every stage of a `compress`: the distill stage moves them to its
    device in channels_last, and hands them back on the CPU in the standard layout when it ends, since quantize
    and verify run them there (a teacher left on the GPU failed `compress` at quantize with mixed devices)."""
    try:
        yield
    finally:
        for model in models:
            model.to("cpu", memory_format=torch.contiguous_format)


def build_student(ctx) -> nn.Module:
    """The run's student, untrained, taking the data's images with the run's normalisation inside."""
    from edgecompress.models.loaders import build_model

    ds = ctx.data
    model, _ = build_model(ctx.config.distill.student, "", ds.input_shape[0], ds.num_classes, *ctx.data_stats,
                           role="student")
    return model


class Batches(Protocol):
    """Where the inputs come from: `steps_per_epoch` batches of (images, labels or None, their indices)."""

    steps_per_epoch: int
    has_labels: bool

    def epoch(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]: ...


class Teacher(Protocol):
    """The teacher's side of each step: the student's view of the batch and the teacher's logits and features."""

    def begin(self, epoch: int) -> str: ...  # how the teacher answers this epoch, for the history

    def answer(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, object]: ...

    def end(self) -> None: ...


@dataclass
class Schedule:
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    max_grad_norm: float = 0.0  # 0: no clipping


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, epoch: int, schedule: Schedule,
                   checkpoint: Path) -> torch.Tensor:
    """One step with the gradient's global L2 norm clipped to schedule.max_grad_norm (when > 0; Pascanu, Mikolov,
    Bengio, "On the difficulty of training recurrent neural networks", ICML 2013: g <- g * min(1, c / ||g||)).
    Returns the norm before clipping. A NaN or Inf loss or gradient stops the stage, naming the last good
    checkpoint and the setting to lower."""
    if not torch.isfinite(loss):
        raise StageFailed(f"the distillation loss became {loss.item()} in epoch {epoch + 1}: lower the learning "
                          f"rate (distill.lr = {schedule.lr}); the last good checkpoint is {checkpoint}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm or float("inf"))
    if not torch.isfinite(norm):
        raise StageFailed(f"the distillation gradient became {norm.item()} in epoch {epoch + 1}: lower the learning "
                          f"rate (distill.lr = {schedule.lr}) or clip it (distill.max_grad_norm); the last good "
                          f"checkpoint is {checkpoint}")
    opt.step()
    sched.step()
    return norm.detach()


def grad_norm_summary(norms: list[torch.Tensor], max_grad_norm: float) -> dict:
    """The epoch's gradient norms before clipping: median, largest, and the fraction of steps clipped."""
    values = torch.stack(norms).float().cpu()
    row = {"grad_norm_p50": round(values.median().item(), 4), "grad_norm_max": round(values.max().item(), 4)}
    if max_grad_norm:
        row["clipped_steps"] = round((values > max_grad_norm).float().mean().item(), 4)
    return row


def computed_once(path: Path, key: str, compute: Callable[[], dict], dist: Distributed) -> dict:
    """The tensors saved at `path` under `key`, read through mmap (they can be large: the writer too reads them
    back rather than keep its computed copy in memory for the whole run), after `compute()` and an atomic save
    when the file is missing or stale. Rank 0 computes and writes them while the other ranks wait."""

    def cached() -> dict | None:
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") == key:
                return saved
        return None

    if not dist.writer:
        dist.barrier()
        return cached()
    found = cached()
    if found is None:
        with files.atomic_path(path) as tmp:
            torch.save({"key": key, **compute()}, tmp)
        found = cached()
    dist.barrier()
    return found


def restore_checkpoint(path: Path, key: str, states: dict) -> dict | None:
    """Load each object in `states` (anything with load_state_dict, or a torch.Generator) from the checkpoint at
    `path` when it was written under `key` and holds them all; None otherwise, so the trainer starts over."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("key") != key or not set(states) <= set(ckpt):
        return None
    for name, state in states.items():
        if isinstance(state, torch.Generator):
            state.set_state(ckpt[name])
        else:
            state.load_state_dict(ckpt[name])
    return ckpt


def fit(distiller: nn.Module, batches: Batches, teacher: Teacher, schedule: Schedule, ckpt_path: Path, key: str,
        ctx, device: torch.device, autocast: torch.dtype | None, dist: Distributed = Distributed(),
        model: nn.Module | None = None, needs_index: bool = False) -> list[dict]:
    """Train `distiller` (through `model`, its DDP wrapper under torchrun) for `schedule.epochs`; returns the
    history. Resumes after the last epoch checkpointed under `key` unless ctx.force (a run from scratch)."""
    model = model or distiller
    opt = torch.optim.SGD(distiller.parameters(), lr=schedule.lr, momentum=0.9, nesterov=True,
                          weight_decay=schedule.weight_decay)
    total_steps = schedule.epochs * batches.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=schedule.lr, total_steps=total_steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(schedule.seed)
    history, start = [], 0
    ckpt = None if ctx.force else restore_checkpoint(
        ckpt_path, key, {"distiller": distiller, "optimizer": opt, "scheduler": sched, "generator": gen})
    if ckpt:
        torch.set_rng_state(ckpt["torch_rng"])
        history, start = ckpt["history"], ckpt["epoch"]
        ctx.log(f"[distill] resuming after epoch {start}/{schedule.epochs}")
    dist.barrier()  # no rank may overwrite the checkpoint before every rank has read it

    def amp():
        return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)

    for epoch in range(start, schedule.epochs):
        model.train()
        how = teacher.begin(epoch)
        began, sums, names, norms = time.perf_counter(), None, [], []
        counts = torch.zeros(3, device=device)  # images, right labels, agreement with the teacher
        with ctx.progress(enumerate(batches.epoch(gen)), f"epoch {epoch + 1}/{schedule.epochs}",
                          length=batches.steps_per_epoch) as bar:
            for step, (x, y, idx) in bar:
                distiller.progress = (epoch * batches.steps_per_epoch + step) / total_steps
                x_student, t_logits, t_feats = teacher.answer(x, idx)
                with amp():
                    logits, losses = model(x_student, y, t_logits, t_feats, idx.to(device) if needs_index else None)
                norms.append(optimizer_step(sum(losses.values()), opt, sched, epoch, schedule, ckpt_path))
                values = torch.stack([v.detach().float() for v in losses.values()]) * len(x)
                sums, names = (values if sums is None else sums + values), list(losses)
                top = logits.detach().argmax(1)
                counts[0] += len(x)
                if y is not None:
                    counts[1] += (top == y).sum()
                if t_logits is not None and t_logits.dim() == 2:
                    counts[2] += (top == t_logits.argmax(1)).sum()
        teacher.end()
        seconds = time.perf_counter() - began
        totals = dist.sum(torch.cat([sums, counts])).tolist()
        seen, right, agree = totals[-3:]
        row = {"epoch": epoch + 1, **{k: round(v / seen, 5) for k, v in zip(names, totals)}}
        if batches.has_labels:
            row["train_top1"] = round(right / seen, 5)
        if agree:
            row["teacher_agreement"] = round(agree / seen, 5)
        row.update(grad_norm_summary(norms, schedule.max_grad_norm))
        history.append({**row, "seconds": round(seconds, 2), "images_per_s": round(seen / seconds, 1),
                        "teacher": how})
        ctx.log(f"[distill] epoch {epoch + 1}/{schedule.epochs} " +
                " ".join(f"{k}={v}" for k, v in history[-1].items() if k != "epoch"))
        if dist.writer:
            with files.atomic_path(ckpt_path) as tmp:
                torch.save({"key": key, "epoch": epoch + 1, "distiller": distiller.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                            "history": history}, tmp)
    return history


BN_ADAPTATION_IMAGES = 2000  # NNCF's default number of BatchNorm adaptation samples


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device,
                    view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance for the final weights, as an equal-weight
    average over `images` in fp32 with the rest of the network in eval mode (NNCF's BatchNorm adaptation;
    torch.optim.swa_utils.update_bn). Why: the exported model normalises with the running statistics, and
    after a short distillation they trail the weights when the BN momentum is small (torchvision's MobileNetV3
    uses 0.01: 60 steps leave them half-way from their initial values). Returns the images used (0: no BN)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(images):
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for i in range(0, len(images), batch):
            x = datasets.to_float(images[i:i + batch]).to(device)
            model((view(x) if view else x).contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(images)
