"""Train a model from scratch as a teacher and save its weights with their metadata.

The model is any spec compress takes (a zoo name, torchvision:NAME, timm:NAME); the data any data spec (an
image folder is decoded once into a packed file, as compress does). The shipped Fashion-MNIST teacher was made with:
    python -m edgecompress.models.train_teacher resnet18_half --data fashion-mnist --epochs 12 --seed 0
It writes models/weights/<model>-<data>.pt, or --out PATH: {"state_dict" (fp16 to keep the file small), "meta"},
the meta recording the preprocessing (size, resize, interpolation, mean, std) that compress then reads.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecompress import data as datasets
from edgecompress.models import libraries
from edgecompress.models.loaders import build_model

WEIGHTS_DIR = Path(__file__).parent / "weights"


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/14 of the side (2 px at 28) and horizontal flip, on a float batch."""
    n, _, h, w = x.shape
    pad = max(2, round(max(h, w) / 14))
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500,
             device: torch.device = torch.device("cpu")) -> float:
    model.eval()
    correct = 0
    batch = datasets.inference_batch(x, batch)
    for i in range(0, len(y), batch):
        logits = model(datasets.to_float(x[i:i + batch]).to(device).contiguous(memory_format=torch.channels_last))
        correct += (logits.argmax(1).cpu() == y[i:i + batch]).sum().item()
    return correct / len(y)


def contract(model_name: str, size: tuple[int, int] | None) -> tuple[datasets.Geometry, list[float], list[float]]:
    """The preprocessing to train with: `size` (None: the data's), and for a torchvision/timm architecture
    its library's resize ratio, interpolation, mean and std (else bilinear, measured stats)."""
    recipe = libraries.preprocess(model_name) if libraries.is_library_spec(model_name) else {}
    resize = 0
    if size and recipe.get("resize") and recipe.get("size"):
        resize = datasets.scaled_resize(recipe["resize"], recipe["size"], size)
    geometry = datasets.Geometry(size, resize, recipe.get("interpolation", "bilinear"), None)
    return geometry, recipe.get("mean", []), recipe.get("std", [])


def train(model_name: str, data_spec: str, epochs: int, seed: int, batch: int, lr: float,
          input_size=None, out: Path | None = None) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    geometry, mean, std = contract(model_name, datasets.parse_size(input_size))
    ds = datasets.load(data_spec, seed, geometry=geometry)
    if len(mean) != ds.input_shape[0]:  # no recipe, or an RGB recipe for grey images
        mean, std = datasets.channel_stats(ds.x_train)
    model, _ = build_model(model_name, "", ds.input_shape[0], ds.num_classes, mean, std, "teacher")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(ds.y_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ds.y_train), generator=gen)
        start, seen, loss_sum = time.time(), 0, 0.0
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x = augment(datasets.to_float(ds.x_train[idx]), gen)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), ds.y_train[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(idx), loss_sum + loss.item() * len(idx)
        acc = evaluate(model, ds.x_eval, ds.y_eval, device=device)
        print(f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} eval top-1 {acc:.4f} "
              f"({seen / (time.time() - start):.0f} img/s)", flush=True)

    state = {k: (v.cpu().half() if v.is_floating_point() else v.cpu()) for k, v in model.net.state_dict().items()}
    check, _ = build_model(model_name, "", ds.input_shape[0], ds.num_classes, mean, std, "teacher")
    check.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    acc = evaluate(check.to(memory_format=torch.channels_last), ds.x_eval, ds.y_eval)
    size = list(ds.input_shape[1:])
    command = (f"python -m edgecompress.models.train_teacher {model_name} --data {data_spec} --epochs {epochs} "
               f"--seed {seed} --batch {batch} --lr {lr}" + (f" --input-size {'x'.join(map(str, size))}"
                                                              if input_size else ""))
    meta = {"model": model_name, "data": data_spec, "data_sha256_16": ds.sha256_16,
            "in_channels": ds.input_shape[0], "num_classes": ds.num_classes, "input_size": size,
            "mean": mean, "std": std, "eval_top1": acc, "epochs": epochs, "seed": seed, "batch": batch, "lr": lr,
            "torch": str(torch.__version__), "command": command,
            "preprocess": {"size": size, "resize": geometry.resize, "interpolation": geometry.interpolation}}
    if out is None:
        WEIGHTS_DIR.mkdir(exist_ok=True)
        out = WEIGHTS_DIR / f"{model_name.replace(':', '-')}-{Path(data_spec).name}.pt"
    tmp = out.with_name(out.name + ".tmp")
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
    parser.add_argument("--input-size", type=datasets.parse_size, default=None,
                        help="train at this size (224 or HxW); default: the data's")
    parser.add_argument("--out", type=Path, default=None, help="where to save; default models/weights/")
    args = parser.parse_args()
    train(args.model, args.data, args.epochs, args.seed, args.batch, args.lr, args.input_size, args.out)


if __name__ == "__main__":
    main()
