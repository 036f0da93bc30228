"""Distill stage: train the student from the teacher's soft targets; a checkpoint each epoch makes it resumable."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from edgecompress.models import count_params
from edgecompress.models.loaders import build_model

from . import config as cfg
from . import data as datasets
from . import distillers, files
from .errors import BadInput, StageFailed
from .runner import RunContext, Stage, digest


def device_and_precision(setting: str) -> tuple[torch.device, torch.dtype | None]:
    """CUDA when present; bf16 autocast on CUDA, and on CPUs with AVX-512 BF16 or AMX unless fp32 is asked."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "fp32":
        return device, None
    if setting == "bf16" or device.type == "cuda" or cfg.cpu_has_bf16():
        return device, torch.bfloat16
    return device, None


def build_student(ctx: RunContext) -> torch.nn.Module:
    ds = ctx.data
    model, _ = build_model(ctx.config.distill.student, "", ds.input_shape[0], ds.num_classes, *ctx.data_stats,
                           role="student")
    return model


def inputs(ctx: RunContext) -> dict:
    return {"distill": ctx.config.distill.__dict__, "seed": ctx.config.seed, "data": ctx.data.sha256_16,
            **ctx.teacher_inputs}


@torch.inference_mode()
def teacher_logits(ctx: RunContext, device: torch.device, autocast: torch.dtype | None) -> torch.Tensor:
    """Teacher logits for every training image, computed once: the data is not augmented, so they never change."""
    cache = ctx.stage_dir("distill") / "teacher_logits.pt"
    key = digest({k: v for k, v in inputs(ctx).items() if k != "distill"})
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return saved["logits"]
    model = ctx.teacher[0].to(device).to(memory_format=torch.channels_last)
    x_all, batch, out = ctx.data.x_train, 500, []
    with ctx.progress(range(0, len(x_all), batch), "teacher logits") as bar:
        for i in bar:
            x = datasets.to_float(x_all[i:i + batch]).to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out.append(model(x).float().cpu())
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise StageFailed("the teacher gives NaN or Inf logits on the training data: check its weights")
    with files.atomic_path(cache) as tmp:
        torch.save({"key": key, "logits": logits}, tmp)
    return logits


def run(ctx: RunContext) -> Path:
    conf, ds, seed = ctx.config.distill, ctx.data, ctx.config.seed
    out_dir = ctx.stage_dir("distill")
    device, autocast = device_and_precision(conf.precision)
    torch.manual_seed(seed)
    student = build_student(ctx)
    targets_all = teacher_logits(ctx, device, autocast)
    distiller = distillers.build(conf.method, student, temperature=conf.temperature, alpha=conf.alpha)
    distiller = distiller.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(distiller.parameters(), lr=conf.lr, momentum=0.9, nesterov=True,
                          weight_decay=conf.weight_decay)
    steps_per_epoch = len(ds.y_train) // conf.batch
    if steps_per_epoch == 0:
        raise BadInput(f"distill.batch {conf.batch} is larger than the {len(ds.y_train)} training images")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=conf.lr, total_steps=conf.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    history, start_epoch = [], 0
    ckpt_path, key = out_dir / "last.ckpt", digest(inputs(ctx))
    if ckpt_path.is_file() and not ctx.force:  # --force means from scratch
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("key") == key:
            distiller.load_state_dict(ckpt["distiller"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["generator"])
            history, start_epoch = ckpt["history"], ckpt["epoch"]
            ctx.log(f"[distill] resuming after epoch {start_epoch}/{conf.epochs}")

    for epoch in range(start_epoch, conf.epochs):
        distiller.train()
        order = torch.randperm(len(ds.y_train), generator=gen)
        began, sums, correct, seen = time.perf_counter(), {}, 0, 0
        with ctx.progress(range(steps_per_epoch), f"epoch {epoch + 1}/{conf.epochs}") as bar:
            for step in bar:
                idx = order[step * conf.batch:(step + 1) * conf.batch]
                x = datasets.to_float(ds.x_train[idx]).to(device).contiguous(memory_format=torch.channels_last)
                y, t = ds.y_train[idx].to(device), targets_all[idx].to(device)
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    logits, losses = distiller.forward_train(x, y, t)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise StageFailed(f"the distillation loss became {loss.item()} in epoch {epoch + 1}: "
                                      f"lower the learning rate (distill.lr = {conf.lr}); the last good "
                                      f"checkpoint is {ckpt_path}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * len(idx)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(idx)
        seconds = time.perf_counter() - began
        history.append({"epoch": epoch + 1, **{k: round(v / seen, 5) for k, v in sums.items()},
                        "train_top1": round(correct / seen, 5), "seconds": round(seconds, 2),
                        "images_per_s": round(seen / seconds, 1)})
        ctx.log(f"[distill] epoch {epoch + 1}/{conf.epochs} " +
                " ".join(f"{k}={v}" for k, v in history[-1].items() if k != "epoch"))
        with files.atomic_path(ckpt_path) as tmp:
            torch.save({"key": key, "epoch": epoch + 1, "distiller": distiller.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generator": gen.get_state(), "history": history}, tmp)

    student = distiller.student.cpu().to(memory_format=torch.contiguous_format).eval()
    files.write_json(out_dir / "history.json", {"method": conf.method, "device": str(device),
                                                "autocast": str(autocast) if autocast else "fp32",
                                                "epochs": history})
    spec = {"student": conf.student, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
            "classes": ds.classes, "mean": ctx.data_stats[0], "std": ctx.data_stats[1],
            "params": count_params(student)}
    artifact = out_dir / "student.pt"
    with files.atomic_path(artifact) as tmp:
        torch.save({"state_dict": student.state_dict(), "spec": spec}, tmp)
    return artifact


STAGE = Stage("distill", run, inputs)
