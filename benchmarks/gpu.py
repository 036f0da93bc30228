"""The GPU path, prepared to run in one go on a CUDA machine (under 8 minutes on one data-centre GPU):

    python benchmarks/gpu.py --npz fmnist-gpu.npz --work /tmp/gpu [--out benchmarks/results]

`--npz` holds real images (x, y, x_test, y_test: Fashion-MNIST's, written by `--make-npz` on a machine where
the Debian package is installed), since a lent GPU machine reaches no network and may lack the package.
Steps, each timed, with images/s where images flow:
1. photos: the images written as 224x224 RGB JPEGs (one folder per class, train/ and test/);
2. teacher: torchvision:resnet18 trained from scratch at 224 px by models/train_teacher.py on the GPU (bf16
   autocast, channels_last);
3. compress: `edgecompress compress` with that teacher and torchvision:mobilenet_v3_small at 224 px for the
   x86-cpu target: decoding with DataLoader workers into the packed file, distillation on the GPU (bf16
   autocast, channels_last, pinned memory and asynchronous copies), quantize, export and verify;
4. ddp: `torchrun --standalone --nproc_per_node 1 -m edgecompress distill RUN --force`: the same distillation
   as a one-GPU DistributedDataParallel job (nccl);
5. ort-cuda: the fp32 student ONNX in ONNX Runtime's CUDA execution provider against its CPU provider, batch
   1 and 64, when onnxruntime-gpu is installed (else recorded as absent).
Nothing here runs without CUDA: on a CPU machine the script stops at once and says so (`--allow-cpu` runs
the same steps on the CPU with `--images` small, to check the script itself). Writes gpu.json and gpu.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance, save_results  # noqa: E402

from edgecompress import data as datasets  # noqa: E402
from edgecompress.progress import NoBar  # noqa: E402
from edgecompress.verify import time_runs  # noqa: E402

CLASSES = [c.replace("/", "-").replace(" ", "-") for c in datasets.FASHION_MNIST_CLASSES]


def make_npz(path: Path, train: int, test: int) -> None:
    """A stratified subset of the installed Fashion-MNIST, to carry to a machine that lacks it."""
    ds = datasets.load("fashion-mnist", 0)
    i = datasets.stratified_sample(ds.y_train, train, 0)
    j = datasets.stratified_sample(ds.y_eval, test, 0)
    np.savez_compressed(path, x=ds.x_train[i, 0].numpy(), y=ds.y_train[i].numpy(), x_test=ds.x_eval[j, 0].numpy(),
                        y_test=ds.y_eval[j].numpy())


def write_photos(npz: Path, root: Path, size: int) -> dict:
    from PIL import Image

    began, count = time.perf_counter(), 0
    arrays = np.load(npz)
    for split, xs, ys in (("train", arrays["x"], arrays["y"]), ("test", arrays["x_test"], arrays["y_test"])):
        for i, (image, label) in enumerate(zip(xs, ys)):
            folder = root / split / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                                                             quality=90)
            count += 1
    seconds = time.perf_counter() - began
    return {"images": count, "seconds": round(seconds, 1), "images_per_s": round(count / seconds, 1)}


def timed(command: list[str], env: dict | None = None) -> dict:
    print("+", " ".join(command), flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
    return {"command": " ".join(command), "exit": done.returncode, "seconds": round(time.perf_counter() - began, 1),
            "stderr_tail": done.stderr[-1500:]}


def history_rate(run: Path) -> list[float]:
    history = json.loads((run / "distill" / "history.json").read_text())
    return [e["images_per_s"] for e in history["epochs"]]


def ort_cuda(run: Path, size: int) -> dict:
    import onnxruntime as ort

    from edgecompress.backends.onnxruntime import OrtRunner

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"absent": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"}
    fp32 = run / "quantize" / "student.fp32.onnx"
    images = torch.rand(64, 3, size, size)  # latency only: values do not change a dense CNN's time
    out = {"model": str(fp32)}
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        for batch in (1, 64):
            make = functools.partial(OrtRunner, fp32, os.cpu_count() or 1, "onnxruntime-fp32", (provider,))
            [times] = time_runs(make, images, batch, warmup=10, runs=50 if batch == 1 else 10, min_seconds=1.0,
                                progress=lambda length: NoBar(None), sessions=1)
            ms = float(np.median(times))
            out[f"{provider}_bs{batch}"] = {"p50_ms": round(ms, 3), "images_per_s": round(1000 * batch / ms, 1)}
    return out


def save(out: Path, result: dict) -> None:
    """gpu.json and gpu.md with the steps finished so far: a run stopped at its time limit keeps them."""
    lines = ["# The GPU path", "", f"Device: {result['device']}; {result['size']}-px photos.", ""]
    if "photos" in result:
        lines.append(f"- photos written: {result['photos']['images']} at {result['photos']['images_per_s']} images/s")
    if "teacher" in result:
        t = result["teacher"]
        lines.append(f"- teacher torchvision:resnet18, {t['epochs']} epochs: {t['seconds']} s, "
                     f"top-1 {t['eval_top1']:.4f}")
    if "compress" in result:
        c = result["compress"]
        lines.append(f"- compress (exit {c['exit']}): {c['seconds']} s, distill images/s per epoch "
                     f"{c.get('distill_images_per_s')}, top-1 {c.get('top1')}, speed-up {c.get('speedup_vs_teacher')}")
    if "ddp" in result:
        d = result["ddp"]
        lines.append(f"- torchrun DDP distill, 1 process (exit {d['exit']}): {d['seconds']} s, images/s "
                     f"{d.get('distill_images_per_s')}")
    if "ort_cuda" in result:
        lines.append(f"- ONNX Runtime CUDA provider: {json.dumps(result['ort_cuda'])}")
    save_results(out, "gpu", result, "\n".join(lines + [""]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=Path("fmnist-gpu.npz"))
    parser.add_argument("--make-npz", action="store_true", help="write --npz from the installed Fashion-MNIST")
    parser.add_argument("--train-images", type=int, default=12000, help="with --make-npz")
    parser.add_argument("--test-images", type=int, default=2000, help="with --make-npz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgecompress-gpu"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.make_npz:
        make_npz(args.npz, args.train_images, args.test_images)
        print(f"wrote {args.npz}")
        return 0
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: this script measures the GPU path (use --allow-cpu to check the script itself)")
        return 2
    from edgecompress.models import train_teacher

    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"provenance": provenance(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else "cpu", "size": args.size}
    photos = args.work / "photos"
    result["photos"] = write_photos(args.npz, photos, args.size)
    save(args.out, result)

    began = time.perf_counter()
    teacher = args.work / "teacher.pt"
    train_teacher.train("torchvision:resnet18", str(photos), args.teacher_epochs, 0, 128, 0.1, [args.size], teacher)
    result["teacher"] = {"seconds": round(time.perf_counter() - began, 1), "epochs": args.teacher_epochs,
                         "eval_top1": torch.load(teacher, weights_only=True)["meta"]["eval_top1"]}
    save(args.out, result)

    run = args.work / "run"
    # x86-cpu: quantize, export and verify in ONNX Runtime on the host's CPU (TensorRT may be absent there); the
    # GPU does the training, and ONNX Runtime's CUDA provider is timed on its own below.
    target = "x86-cpu"
    result["compress"] = timed([sys.executable, "-m", "edgecompress", "compress", "--teacher", "torchvision:resnet18",
                                "--teacher-weights", str(teacher), "--student", "torchvision:mobilenet_v3_small",
                                "--data", str(photos), "--input-size", str(args.size), "--epochs", str(args.epochs),
                                "--target", target, "--out", str(run), "--quiet"])
    report = run / "verify" / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        result["compress"] |= {"distill_images_per_s": history_rate(run),
                               "top1": {k: r[k]["accuracy"] for k in ("teacher", "student_fp32", "artifact")},
                               "speedup_vs_teacher": r["speedup_vs_teacher"], "budgets": r["budgets"]}
        print((run / "verify" / "report.md").read_text()[:3000], flush=True)
    save(args.out, result)

    result["ddp"] = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "edgecompress", "distill", str(run), "--force", "--quiet"])
    if result["ddp"]["exit"] == 0:
        result["ddp"]["distill_images_per_s"] = history_rate(run)
    save(args.out, result)
    result["ort_cuda"] = ort_cuda(run, args.size) if report.is_file() else {"absent": "compress did not finish"}

    save(args.out, result)
    # A missed budget is a measurement (exit 1 from compress, recorded above); a step that did not finish is not.
    return 0 if report.is_file() and result["ddp"]["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
