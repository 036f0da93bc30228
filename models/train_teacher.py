"""Train a zoo model from scratch as a teacher and save its weights with their metadata.

The shipped Fashion-MNIST teacher was made with:
    python -m edgecompress.models.train_teacher resnet18_half --data fashion-mnist --epochs 12 --seed 0
It writes models/weights/<model>-<data>.pt: {"state_dict" (fp16 to keep the file small), "meta"}.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecompress import data as datasets
from edgecompress.models import Normalized, create

WEIGHTS_DIR = Path(__file__).parent / "weights"


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel translation and horizontal flip, on a float batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(datasets.to_float(x[i:i + batch]).contiguous(memory_format=torch.channels_last))
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(y)


def train(model_name: str, data_spec: str, epochs: int, seed: int, batch: int, lr: float) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ds = datasets.load(data_spec, seed)
    mean, std = datasets.channel_stats(ds.x_train)
    model = Normalized(create(model_name, ds.input_shape[0], ds.num_classes), mean, std)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(ds.y_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ds.y_train), generator=gen)
        start, seen, loss_sum = time.time(), 0, 0.0
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x = augment(datasets.to_float(ds.x_train[idx]), gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), ds.y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(idx), loss_sum + loss.item() * len(idx)
        acc = evaluate(model, ds.x_eval, ds.y_eval)
        print(f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} eval top-1 {acc:.4f} "
              f"({seen / (time.time() - start):.0f} img/s)", flush=True)

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.net.state_dict().items()}
    check = Normalized(create(model_name, ds.input_shape[0], ds.num_classes), mean, std)
    check.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    acc = evaluate(check.to(memory_format=torch.channels_last), ds.x_eval, ds.y_eval)
    meta = {"model": model_name, "data": data_spec, "data_sha256_16": ds.sha256_16,
            "in_channels": ds.input_shape[0], "num_classes": ds.num_classes, "input_size": list(ds.input_shape[1:]),
            "mean": mean, "std": std, "eval_top1": acc, "epochs": epochs, "seed": seed, "batch": batch, "lr": lr,
            "torch": str(torch.__version__),
            "command": f"python -m edgecompress.models.train_teacher {model_name} --data {data_spec} "
                       f"--epochs {epochs} --seed {seed} --batch {batch} --lr {lr}"}
    WEIGHTS_DIR.mkdir(exist_ok=True)
    out = WEIGHTS_DIR / f"{model_name}-{data_spec}.pt"
    tmp = out.with_suffix(".tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, out)
    print(f"saved {out} (fp16 weights, eval top-1 after fp16 round trip {acc:.4f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    train(args.model, args.data, args.epochs, args.seed, args.batch, args.lr)


if __name__ == "__main__":
    main()
