"""Data-free distillation: synthesise images from the teacher alone, then distil the student on them.

DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
arXiv:1912.08795) optimises batches of pixels so that the teacher classifies them as sampled target classes while
the statistics of every BatchNorm layer's input match the running statistics the teacher stored in training:

    L(x) = CE(f_t(x~), y)                                        target classes y, sampled evenly
         + bn_weight * sum_l m_l * (||mu_l(x~) - mu_l^BN||_2 + ||sigma^2_l(x~) - sigma^2_l^BN||_2)
         + tv_weight * TV_2(x) + l2_weight * mean(x^2)

where x~ is x randomly flipped (and shifted, if jitter > 0), mu_l / sigma^2_l are the per-channel mean and variance
of layer l's input over the batch, m_l is first_bn_multiplier for the first BatchNorm layer and 1 otherwise, and
TV_2(x) = mean (x[i+1, j] - x[i, j])^2 + mean (x[i, j+1] - x[i, j])^2 (the squared total variation prior).
No training image or label is read: the only information used is in the teacher's weights (and, for the start
and the student's input normalisation, the input mean/std its checkpoint records).

With the paper's start, Gaussian noise with the teacher's input statistics, the few dozen steps a CPU affords end
in frame-filling textures the teacher is sure about but a student learns little from (measured: 24% Fashion-MNIST
test top-1 from 200 images). Starting from a soft centred ellipse on black (`init = "blob"`: one object on a plain
background, as in most scans and photographs) the same budget gives object-like images whose BatchNorm statistics
come close to real data's (BN term 3.8 against 3.1 on a real test batch; 11.7 from noise) and 50% top-1.

The student then learns from the synthetic images by Hinton KD (arXiv:1503.02531) with the teacher's soft targets
recomputed on every augmented (shifted, flipped, mixed-up) batch, so that the few thousand synthetic images a CPU
can afford give many distinct views (the consistent-teacher function matching of Beyer et al., "Knowledge
distillation: A good teacher is patient and consistent", CVPR 2022, arXiv:2106.05237):

    L_student = T^2 * KL(softmax(f_t(x') / T) || softmax(f_s(x') / T)),   x' = augment(x)

Chen et al.'s DAFL ("Data-Free Learning of Student Networks", ICCV 2019, arXiv:1904.01186), a generator trained
with one-hot, activation and information-entropy losses, is not implemented: it trains the generator for many
epochs, far beyond a CPU's budget, where DeepInversion's fixed image set is synthesised once and cached.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.models import count_params

from .. import files
from . import methods as distillers
from .methods import METHOD_DATAFREE as METHOD
from .methods import DataFreeConfig, method_options
from ..errors import BadInput, StageFailed
from ..runner import RunContext, digest
from . import trainer
from .trainer import build_student, device_and_precision



class BatchNormStatistics:
    """Forward hooks on every BatchNorm2d of the teacher: after a forward pass, `loss()` is
    sum_l m_l * (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2) over the inputs of that pass."""

    def __init__(self, model: nn.Module, first_multiplier: float):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise BadInput("data-free distillation matches the teacher's BatchNorm statistics, and this teacher "
                           "has no BatchNorm2d layer: choose a teacher with BatchNorm, or another method")
        self.first_multiplier = first_multiplier
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def loss(self) -> torch.Tensor:
        terms, self.terms = self.terms, []
        return terms[0] * self.first_multiplier + sum(terms[1:])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Squared total variation: mean squared difference of vertically and of horizontally adjacent pixels."""
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()


def jitter_flip(x: torch.Tensor, jitter: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """The same random shift (wrapping around) and, half the time, a horizontal flip, for the whole batch."""
    if jitter:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=gen).item() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


def centred_blobs(count: int, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """`count` soft-edged ellipses of random size, aspect and brightness near the centre of a black image, plus a
    little noise: a start that, like most photographs and scans, has one centred object on a plain background."""
    c, h, w = shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(count, generator=gen)).view(count, 1, 1)

    cy, cx = uniform(0.4, 0.6) * h, uniform(0.4, 0.6) * w
    ry, rx = uniform(0.2, 0.45) * h, uniform(0.15, 0.45) * w
    inside = 1 - (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
    blob = torch.sigmoid(4 * inside) * uniform(0.4, 0.9)
    noise = 0.05 * torch.randn(count, c, h, w, generator=gen)
    return (blob[:, None] + noise).clamp(0, 1)


def synthesize_batch(teacher: nn.Module, labels: torch.Tensor, shape: tuple[int, int, int],
                     normalisation: tuple[list[float], list[float]], conf: DataFreeConfig, gen: torch.Generator,
                     autocast: torch.dtype | None = None, on_step: Callable[[], None] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of DeepInversion images for `labels` (on the teacher's device): (uint8 images (N, C, H, W) on the
    CPU, the last step's loss terms and the fraction the teacher classifies as their targets).

    The pixels start as centred blobs (`init = "blob"`), or as Gaussian noise with the teacher's input mean and std
    per channel (`normalisation`), i.e. the paper's N(0, 1) in the teacher's normalised input space.
    """
    device = next(teacher.parameters()).device
    labels = labels.to(device)
    stats = BatchNormStatistics(teacher, conf.first_bn_multiplier)
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    for p in trainable:  # gradients flow to the pixels only
        p.requires_grad_(False)
    try:
        if conf.init == "blob":
            x = centred_blobs(len(labels), shape, gen)
        else:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalisation)
            x = (mean + std * torch.randn(len(labels), *shape, generator=gen)).clamp(0, 1)
        x = x.to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=conf.lr, betas=(0.5, 0.9))  # the paper's betas for the pixel optimiser
        losses: dict[str, torch.Tensor] = {}
        for step in range(conf.iterations):
            for group in opt.param_groups:  # cosine decay: large early steps, fine ones at the end
                group["lr"] = conf.lr * 0.5 * (1 + math.cos(math.pi * step / conf.iterations))
            # channels-last convolutions are faster on CPU (oneDNN) and on CUDA tensor cores
            view = jitter_flip(x, conf.jitter, conf.flip, gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits = teacher(view)
            losses = {"ce": F.cross_entropy(logits.float(), labels),
                      "bn": conf.bn_weight * stats.loss(),
                      "tv": conf.tv_weight * total_variation(x),
                      "l2": conf.l2_weight * x.pow(2).mean()}
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise StageFailed(f"the DeepInversion loss became {loss.item()}: lower datafree lr ({conf.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)  # keep valid pixels: the teacher takes [0, 1]
            if on_step:
                on_step()
    finally:
        stats.remove()
        for p in trainable:
            p.requires_grad_(True)
    with torch.no_grad():
        images = (x.detach() * 255).round().to(torch.uint8)
        accepted = (teacher(images.float() / 255).argmax(1) == labels).float().mean().item()
        images = images.cpu()
    return images, {**{k: round(v.item(), 5) for k, v in losses.items()}, "teacher_top1_on_targets": accepted}


def batch_sizes(conf: DataFreeConfig) -> list[int]:
    """Sizes of the synthesis batches: `batch` each, the last one smaller when `images` is not a multiple."""
    full, rest = divmod(conf.images, conf.batch)
    return [conf.batch] * full + ([rest] if rest else [])


def save_preview(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path, per_class: int = 10) -> None:
    """A PNG grid of the first synthetic images of each class (one row per class), to see what the teacher dreamt."""
    from PIL import Image

    rows = []
    for c in range(num_classes):
        picked = images[labels == c][:per_class]
        picked = torch.cat([picked, torch.zeros(per_class - len(picked), *images.shape[1:], dtype=torch.uint8)])
        rows.append(torch.cat(list(picked), dim=2))  # (C, H, per_class * W)
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()  # (classes * H, per_class * W, C)
    with files.atomic_path(path) as tmp:
        Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(tmp, format="PNG")


def synthesize(teacher: nn.Module, shape: tuple[int, int, int], num_classes: int,
               normalisation: tuple[list[float], list[float]], conf: DataFreeConfig, seed: int,
               cache_dir: Path, key: str, progress, log: Callable[[str], None],
               autocast: torch.dtype | None = None, reuse: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """All `conf.images` synthetic images and their target classes, batch by batch.

    Each finished batch is saved atomically in `cache_dir` under `key` (the teacher and the settings), so a killed
    run keeps its finished batches, and each batch's random numbers depend only on (seed, batch index), so the
    resumed set equals an uninterrupted one. `reuse=False` remakes every batch.
    """
    batches = len(batch_sizes(conf))
    images, labels, records, todo = [], [], [], []
    for index in range(batches):
        path = cache_dir / f"batch_{index:04d}.pt"
        saved = torch.load(path, map_location="cpu", weights_only=True) if reuse and path.is_file() else {}
        if saved.get("key") == key:
            images.append(saved["images"])
            labels.append(saved["labels"])
            records.append(saved["record"])
        else:
            images.append(None)
            labels.append(None)
            records.append(None)
            todo.append(index)
    if len(todo) < batches:
        log(f"[distill] {batches - len(todo)}/{batches} synthetic batches already made, {len(todo)} to go")
    with progress(None, "synthesis", length=len(todo) * conf.iterations) as bar:
        for index in todo:
            count = batch_sizes(conf)[index]
            # target classes cycle through all classes, continuing across batches, so every class is covered
            y = (torch.arange(count) + index * conf.batch) % num_classes
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
            began = time.perf_counter()
            x, terms = synthesize_batch(teacher, y, shape, normalisation, conf, gen, autocast,
                                        on_step=lambda: bar.update(1))
            record = {"batch": index, **terms, "seconds": round(time.perf_counter() - began, 2)}
            with files.atomic_path(cache_dir / f"batch_{index:04d}.pt") as tmp:
                torch.save({"key": key, "images": x, "labels": y, "record": record}, tmp)
            images[index], labels[index], records[index] = x, y, record
    return torch.cat(images), torch.cat(labels), records


def augment(x: torch.Tensor, shift: int, mixup: bool, gen: torch.Generator) -> torch.Tensor:
    """Views of a batch for the student: a random shift per image (zero padding), a random horizontal flip per
    image, then mixup of random pairs (Zhang et al., 2018, arXiv:1710.09412) with a uniform weight per image."""
    n, c, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n, 1), generator=gen) + torch.arange(h)
        dx = torch.randint(0, 2 * shift + 1, (n, 1), generator=gen) + torch.arange(w)
        x = padded.gather(2, dy[:, None, :, None].expand(n, c, h, w + 2 * shift))
        x = x.gather(3, dx[:, None, None, :].expand(n, c, h, w))
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mixup:
        weight = torch.rand(n, 1, 1, 1, generator=gen)
        x = weight * x + (1 - weight) * x[torch.randperm(n, generator=gen)]
    return x


class SyntheticBatches:
    """The synthetic images as the trainer's input source (trainer.Batches): a seeded order, each batch augmented
    for the student (shift, flip, mixup); there are no labels."""

    has_labels = False

    def __init__(self, images: torch.Tensor, batch: int, conf: DataFreeConfig, device: torch.device):
        self.pixels, self.batch, self.conf, self.device = images.float() / 255, batch, conf, device
        self.steps_per_epoch = len(images) // batch
        if self.steps_per_epoch == 0:
            raise BadInput(f"distill.batch {batch} is larger than the {len(images)} synthetic images: "
                           "raise the datafree option images or lower distill.batch")

    def epoch(self, gen: torch.Generator):
        order = torch.randperm(len(self.pixels), generator=gen)
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            x = augment(self.pixels[idx], self.conf.shift, self.conf.mixup, gen)
            yield x.to(self.device).contiguous(memory_format=torch.channels_last), None, idx


class OnlineTeacher:
    """The teacher's soft targets recomputed on every augmented batch (trainer.Teacher)."""

    def __init__(self, teacher: nn.Module, amp: Callable):
        self.teacher, self.amp = teacher, amp

    def begin(self, epoch: int) -> str:
        return "online"

    def answer(self, x: torch.Tensor, idx: torch.Tensor):
        with torch.no_grad(), self.amp():
            return x, self.teacher(x).float(), None

    def end(self) -> None:
        pass


def inputs(ctx: RunContext) -> dict:
    """What the student depends on: the config, the teacher, and the data's classes and image shape; never the
    training images, which this stage does not read."""
    ds = ctx.data
    return {"distill": ctx.config.distill.__dict__, "seed": ctx.config.seed,
            "data": {"classes": ds.classes, "input_shape": list(ds.input_shape)}, **ctx.teacher_inputs}


def run(ctx: RunContext) -> Path:
    """The distill stage for data-free methods: the teacher checked, then lent to `distil`."""
    opts = method_options(ctx.config.distill)
    conf = DataFreeConfig(**{f.name: opts[f.name] for f in fields(DataFreeConfig)}).check()
    device, autocast = device_and_precision(ctx.config.distill.precision)
    if ctx.config.teacher.extra:
        raise BadInput(f"method {METHOD} uses one teacher but {1 + len(ctx.config.teacher.extra)} were given: "
                       "give one --teacher")
    teacher, info = ctx.teacher
    if info.get("kind") in ("onnx", "torchscript"):
        raise BadInput(f"data-free distillation matches the teacher's BatchNorm statistics, which a {info['kind']} "
                       "teacher cannot show: give a zoo name or file.py:factory teacher with --teacher-weights")
    with trainer.lent([teacher]):
        return distil(ctx, teacher.to(device).to(memory_format=torch.channels_last).eval(), conf, opts, device,
                      autocast)


def distil(ctx: RunContext, teacher: nn.Module, conf: DataFreeConfig, opts: dict, device: torch.device,
           autocast: torch.dtype | None) -> Path:
    """Synthesise the images (cached batch by batch), then distil the student on them."""
    dconf, seed, out_dir = ctx.config.distill, ctx.config.seed, ctx.stage_dir("distill")
    ds = ctx.data  # its classes and image shape only: the training split is never read here
    shape, num_classes = tuple(ds.input_shape), ds.num_classes
    synthesis = {f.name: opts[f.name] for f in fields(DataFreeConfig) if f.name not in ("shift", "mixup")}
    synthesis_key = digest({"synthesis": synthesis, "seed": seed, "shape": list(shape), "classes": num_classes,
                            **ctx.teacher_inputs})
    ctx.log(f"[distill] data-free: synthesising {conf.images} images from the teacher alone "
            f"({conf.iterations} DeepInversion steps per batch of {conf.batch}); no training image or label is read")
    images, labels, records = synthesize(teacher, shape, num_classes, ctx.data_stats, conf, seed,
                                         out_dir / "synthetic", synthesis_key, ctx.progress, ctx.log, autocast,
                                         reuse=not ctx.force)
    accepted = sum(r["teacher_top1_on_targets"] * n for r, n in zip(records, batch_sizes(conf)))
    ctx.log(f"[distill] synthesis done: the teacher classifies {accepted / conf.images:.1%} of the images as "
            "their target classes")
    save_preview(images, labels, num_classes, out_dir / "synthetic.png")

    torch.manual_seed(seed)
    student = build_student(ctx).to(device).to(memory_format=torch.channels_last)
    distiller = distillers.build(METHOD, student, **dconf.method_opts)
    ckpt_path = out_dir / "last.ckpt"
    if ctx.force:  # --force means from scratch, the synthetic images included
        ckpt_path.unlink(missing_ok=True)

    def amp():
        return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)

    history = trainer.fit(distiller, SyntheticBatches(images, dconf.batch, conf, device), OnlineTeacher(teacher, amp),
                          trainer.Schedule(dconf.epochs, dconf.lr, dconf.weight_decay, seed, dconf.max_grad_norm),
                          ckpt_path, digest(inputs(ctx)), ctx, device, autocast)

    student = student.cpu().to(memory_format=torch.contiguous_format).eval()
    mean, std = ctx.data_stats
    files.write_json(out_dir / "history.json", {
        "method": dconf.method, "options": opts, "teachers": [ctx.config.teacher.spec], "device": str(device),
        "autocast": str(autocast) if autocast else "fp32", "training_images_read": 0,
        "normalisation": {"mean": mean, "std": std, "from": "teacher checkpoint"},
        "synthesis": records, "epochs": history})
    spec = {"student": dconf.student, "input_shape": list(shape), "num_classes": num_classes,
            "classes": ds.classes, "mean": mean, "std": std, "params": count_params(student)}
    artifact = out_dir / "student.pt"
    with files.atomic_path(artifact) as tmp:
        torch.save({"state_dict": student.state_dict(), "spec": spec}, tmp)
    return artifact

