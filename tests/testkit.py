"""Helpers several test modules share: small real data sets, lenient targets, one small finished run and one
briefly trained student."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from edgecompress import data
from edgecompress.cli import main
from edgecompress.models import Normalized, create

FAST_VERIFY = "[verify]\nlatency_runs_bs1 = 30\nlatency_runs_batch = 3\nwarmup_runs = 3\n"
SMALL_RUN_CONFIG = ("[distill]\nepochs = 1\n"
                    "[verify]\nlatency_runs_bs1 = 60\nlatency_runs_batch = 8\nwarmup_runs = 5\n")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def subset_npz(fashion, path: Path, train: int, eval_: int) -> Path:
    i = data.stratified_sample(fashion.y_train, train, 0)
    j = data.stratified_sample(fashion.y_eval, eval_, 0)
    np.savez(path, x=fashion.x_train[i, 0].numpy(), y=fashion.y_train[i].numpy(),
             x_test=fashion.x_eval[j, 0].numpy(), y_test=fashion.y_eval[j].numpy())
    return path


def lenient_target(path: Path) -> Path:
    """x86-cpu with no budgets: these runs train for seconds, so they test the plumbing, not the quality."""
    text = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text()
    text = text.replace('name = "x86-cpu"', 'name = "test-cpu"')
    text = text.split("[budgets]")[0] + "[budgets]\nmax_accuracy_drop = 100.0\nmin_speedup = 0.0\n"
    path.write_text(text)
    return path


def config_file(path: Path, epochs: int) -> Path:
    path.write_text(FAST_VERIFY + f"[distill]\nepochs = {epochs}\n")
    return path


_small_runs: dict[Path, Path] = {}  # one run per test session (its base temp folder), for every test module


def write_small_data(base: Path, fashion_raw) -> Path:
    """base/fmnist.npz with 600 training and 200 test images of Fashion-MNIST (60 and 20 per class), and
    base/config.toml with the small runs' short settings."""

    def take(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = fashion_raw[f"x_{split}"], fashion_raw[f"y_{split}"]
        idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        return x[idx], y[idx].astype(np.int64)

    (x, y), (x_test, y_test) = take("train", 60), take("test", 20)
    np.savez(base / "fmnist.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    (base / "config.toml").write_text(SMALL_RUN_CONFIG)
    return base / "fmnist.npz"


def small_run_dir(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    """One `edgecompress compress` per test session on 600 training and 200 test images of Fashion-MNIST
    (60 and 20 per class), a tiny factory teacher, resnet_slim_050 for 1 epoch and short latency runs."""
    root = tmp_path_factory.getbasetemp()
    if root not in _small_runs:
        base = tmp_path_factory.mktemp("small-run")
        write_small_data(base, fashion_raw)
        args = ["compress", "--teacher", teacher_spec, "--data", str(base / "fmnist.npz"), "--student",
                "resnet_slim_050", "--epochs", "1", "--target", str(lenient_target(base / "target.toml")),
                "--config", str(base / "config.toml"), "--out", str(base / "run"), "--quiet"]
        assert main(args) == 0
        _small_runs[root] = base / "run"
    return _small_runs[root]


def write_photo_folder(root: Path, x: np.ndarray, y: np.ndarray, classes: list[str], sizes=(72, 120),
                       suffix: str = ".jpg", seed: int = 0) -> Path:
    """Real grey images written as RGB photo files of random sizes (width and height drawn from `sizes`),
    each with a random colour tint, one sub-folder per class: what a user's folder of photos looks like."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(zip(x, y)):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        tint = rng.uniform(0.6, 1.0, size=3)
        rgb = (np.asarray(image, dtype=np.float32)[..., None] * tint).round().clip(0, 255).astype(np.uint8)
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").resize((width, height), Image.BICUBIC).save(folder / f"{i:05d}{suffix}",
                                                                                 quality=90)
    return root


def small_model() -> Normalized:
    """An untrained resnet_slim_050 for 1-channel 28x28 images with Fashion-MNIST's normalisation (seed 0)."""
    torch.manual_seed(0)
    return Normalized(create("resnet_slim_050", 1, 10), [0.286], [0.353]).eval()


def train_briefly(model: torch.nn.Module, fashion, steps: int = 150) -> torch.nn.Module:
    """Cross-entropy SGD on real training images: enough for ~70-80% top-1 with resnet_slim_050."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(fashion.y_train), (128,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(data.to_float(fashion.x_train[idx])), fashion.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


_trained: list[torch.nn.Module] = []  # one training per test session, for every test module


def trained_student(fashion) -> Normalized:
    """A copy of small_model() after train_briefly on real Fashion-MNIST (about 10 s, once per session).

    An untrained student predicts one class for every image, so any int8 model "agrees" with it and a broken
    quantizer passes an agreement check; this one predicts every class and is right on most images."""
    if not _trained:
        _trained.append(train_briefly(small_model(), fashion))
    return copy.deepcopy(_trained[0])


def top1(logits, labels) -> float:
    """Share of rows whose largest logit is at the label (numpy arrays or torch tensors)."""
    logits, labels = (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in (logits, labels))
    return float((logits.argmax(1) == labels).mean())
