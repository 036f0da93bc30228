"""Real photos at real size: Fashion-MNIST's 70,000 real images written as a 224x224 RGB JPEG folder (and a
mixed-size variant), then what streaming them costs.

    python benchmarks/photos.py --dir /tmp/photos [--sections write,index,loader,distill,compress] [--out benchmarks/results]

The folders are written under --dir (never committed; reused when complete). Sections:
- write: the 224x224 folder (train/ and test/, one sub-folder per class; each image upscaled bicubic from 28 px and
  given a random colour tint) and a mixed folder of 7,000 images: 64-320 px sides, a tenth grey, a tenth RGBA PNG;
- index: indexing (listing + fingerprint, no pixel decoded) of the 224 folder, cold and warm;
- loader: decoding into the packed file, images/s per worker count, on the first 6,000 training images;
- distill: a distillation step (student forward/backward on cached teacher logits, SGD) at 224 px, images/s with
  the batches read from the packed file vs from the same images as an in-memory tensor, alternating;
- compress: `edgecompress compress` on the whole 224 folder (`--epochs 1`), wall time per stage and the peak
  resident memory of the whole process tree, sampled every 0.2 s from /proc.

Writes photos.json and photos.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance, save_results  # noqa: E402

from edgecompress import data as datasets  # noqa: E402
from edgecompress.data import folder as folders  # noqa: E402
from edgecompress.runner import NoBar  # noqa: E402

SECTIONS = ("write", "index", "loader", "distill", "compress")
CLASSES = [c.replace("/", "-").replace(" ", "-") for c in datasets.FASHION_MNIST_CLASSES]

# Models for 224-px RGB input small enough for this 2-core CPU: a 4x4 stride-4 stem (a patchify stem, as in
# ConvNeXt) takes 224 px to 56 px at once; the teacher is twice the student's width.
MODELS = '''
from torch import nn


def net(width):
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    w = width
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, w, 4, 4, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)),
                         nn.Sequential(block(w, w, 1)), nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w, 1)),
                         nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1)),
                         nn.Sequential(block(4 * w, 8 * w, 2), block(8 * w, 8 * w, 1)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


def teacher():
    return net(16)


def student():
    return net(8)
'''


def _write_one(job) -> None:
    from PIL import Image

    path, pixels, width, height, tint, kind = job
    if path.exists():
        return
    rgb = (pixels.astype(np.float32)[..., None] * tint).round().clip(0, 255).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB").resize((width, height), Image.BICUBIC)
    if kind == "grey":
        im = im.convert("L")
    elif kind == "rgba":
        im = im.convert("RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    im.save(tmp, format="PNG" if kind == "rgba" else "JPEG", quality=90)
    os.replace(tmp, path)


def fashion_arrays() -> dict:
    ds = datasets.load("fashion-mnist")
    return {"train": (ds.x_train[:, 0].numpy(), ds.y_train.numpy()), "test": (ds.x_eval[:, 0].numpy(), ds.y_eval.numpy())}


def write_folders(root: Path) -> dict:
    arrays, rng, timings = fashion_arrays(), np.random.default_rng(0), {}
    for variant in ("224", "mixed"):
        folder, done = root / f"fmnist-{variant}", root / f"fmnist-{variant}.done"
        if done.is_file():
            timings[variant] = json.loads(done.read_text())
            continue
        jobs = []
        for split, (x, y) in arrays.items():
            count = len(y) if variant == "224" else len(y) // 10
            for i in range(count):
                tint = rng.uniform(0.6, 1.0, size=3)
                if variant == "224":
                    size, kind = (224, 224), "rgb"
                else:
                    size = tuple(int(v) for v in rng.integers(64, 321, size=2))
                    kind = rng.choice(["rgb"] * 8 + ["grey", "rgba"])
                suffix = ".png" if kind == "rgba" else ".jpg"
                jobs.append((folder / split / CLASSES[y[i]] / f"{i:05d}{suffix}", x[i], *size, tint, kind))
        began = time.perf_counter()
        with Pool(os.cpu_count()) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=256):
                pass
        record = {"images": len(jobs), "seconds": round(time.perf_counter() - began, 1),
                  "bytes": sum(j[0].stat().st_size for j in jobs)}
        done.write_text(json.dumps(record))
        timings[variant] = record
        print(f"wrote {folder}: {record}", flush=True)
    return timings


def index_section(folder: Path) -> dict:
    out = {}
    for attempt in ("first", "second"):
        began = time.perf_counter()
        entries, classes, _ = folders.index_folder(folder)
        key = folders.fingerprint(entries)
        out[attempt] = {"seconds": round(time.perf_counter() - began, 2), "files": len(entries), "fingerprint": key}
    return out


def loader_section(folder: Path, images: int = 6000) -> dict:
    entries, _, _ = folders.index_folder(folder)
    entries = [e for e in entries if e.split == "train"][:images]
    geometry = datasets.Geometry((224, 224), 0, "bilinear", "rgb")
    rows = []
    for workers in (0, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            folders.pack(entries, geometry, Path(tmp), False, workers, lambda items, label, length=None: NoBar(items))
            seconds = time.perf_counter() - began
        rows.append({"workers": workers, "images": len(entries), "seconds": round(seconds, 2),
                     "images_per_s": round(len(entries) / seconds, 1)})
        print(rows[-1], flush=True)
    return {"rows": rows, "note": "workers 0: the main process decodes; 1: one worker process decodes while the main "
                                  "process writes"}


def distill_section(folder: Path, cache: Path, steps: int = 40, batch: int = 64, rounds: int = 3) -> dict:
    """Streamed vs in-memory batches through the same training step; alternating rounds."""
    ds = datasets.load(str(folder), geometry=datasets.Geometry((224, 224), 0, "bilinear", "rgb"), cache_dir=cache)
    count = steps * batch
    packed = ds.x_train.subset(np.arange(count))
    in_memory = packed[:]  # the same images, read once into a tensor
    labels = ds.y_train[:count]
    namespace: dict = {}
    exec(compile(MODELS, "models.py", "exec"), namespace)  # the benchmark's own model file
    torch.manual_seed(0)
    student = namespace["student"]().to(memory_format=torch.channels_last)
    logits = torch.randn(count, 10)  # stands in for cached teacher logits: their values do not change the cost
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def epoch(images) -> float:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
        began = time.perf_counter()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x = datasets.to_float(images[idx]).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = student(x)
            loss = torch.nn.functional.kl_div(out.float().log_softmax(1), logits[idx].softmax(1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        return count / (time.perf_counter() - began)

    epoch(in_memory)  # warm-up
    rates: dict[str, list[float]] = {"streamed": [], "in_memory": []}
    for _ in range(rounds):
        rates["streamed"].append(round(epoch(packed), 1))
        rates["in_memory"].append(round(epoch(in_memory), 1))
        print(rates, flush=True)
    streamed, memory = float(np.median(rates["streamed"])), float(np.median(rates["in_memory"]))
    del labels
    return {"batch": batch, "steps": steps, "images_per_s": rates, "streamed_median": streamed,
            "in_memory_median": memory, "streaming_cost_pct": round(100 * (memory / streamed - 1), 1)}


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


def compress_section(folder: Path, work: Path, extra: list[str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "models.py").write_text(MODELS)
    target = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text()
    (work / "target.toml").write_text(target.replace('name = "x86-cpu"', 'name = "x86-cpu-nobudget"').split(
        "[budgets]")[0] + "[budgets]\nmax_accuracy_drop = 100.0\nmin_speedup = 0.0\n")
    (work / "config.toml").write_text("[verify]\nlatency_runs_bs1 = 100\nlatency_runs_batch = 10\nlatency_sessions = 2\n")
    run = work / "run"
    command = [sys.executable, "-m", "edgecompress", "compress", "--data", str(folder), "--teacher",
               f"{work / 'models.py'}:teacher", "--student", f"{work / 'models.py'}:student", "--epochs", "1",
               "--input-size", "224", "--channels", "rgb", "--target", str(work / "target.toml"), "--config",
               str(work / "config.toml"), "--out", str(run), "--quiet", *extra]
    began, peak = time.perf_counter(), 0
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    stages = {}
    for stage in ("distill", "quantize", f"export/x86-cpu-nobudget", "verify"):
        done = run / stage / "done.json"
        if done.is_file():
            stages[stage] = json.loads(done.read_text())["seconds"]
    report = run / "verify" / "report.json"
    top1 = {}
    if report.is_file():
        r = json.loads(report.read_text())
        top1 = {k: r[k]["accuracy"] for k in ("teacher", "student_fp32", "artifact")}
    return {"command": " ".join(command), "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "stage_seconds": stages, "peak_tree_rss_mib": round(peak / 2**20), "top1": top1,
            "note": "teacher untrained (a factory model, random init): this section measures memory and time"}


def markdown(result: dict) -> str:
    lines = ["# Photos benchmark", "", f"Host: {result['host']['cpu']}, {result['host']['cores']} cores.", ""]
    if "write" in result:
        lines += ["| folder | images | MB | write s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['images']} | {v['bytes'] / 1e6:.0f} | {v['seconds']} |" for k, v in result["write"].items()]
    if "index" in result:
        i = result["index"]
        lines += ["", f"Indexing {i['first']['files']} files: {i['first']['seconds']} s, again {i['second']['seconds']} s."]
    if "loader" in result:
        lines += ["", "| decode workers | images/s |", "|---|---|"]
        lines += [f"| {r['workers']} | {r['images_per_s']} |" for r in result["loader"]["rows"]]
    if "distill" in result:
        d = result["distill"]
        lines += ["", f"Distill step at 224 px (batch {d['batch']}): streamed {d['streamed_median']} images/s, in memory "
                  f"{d['in_memory_median']} images/s: streaming costs {d['streaming_cost_pct']}% of the step time."]
    if "compress" in result:
        c = result["compress"]
        lines += ["", f"compress on the 224 folder: exit {c['exit_code']}, {c['seconds']} s ({c['stage_seconds']}), "
                  f"peak RSS of the process tree {c['peak_tree_rss_mib']} MiB."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "edgecompress-photos")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--compress-args", default="", help="extra arguments for the compress section")
    args = parser.parse_args()
    sections = args.sections.split(",")
    result = {"sections": sections, **provenance()}
    previous = args.out / "photos.json"
    if previous.is_file():  # sections not rerun keep their last figures
        result = {**json.loads(previous.read_text()), **result}
    result["write"] = write_folders(args.dir)
    folder = args.dir / "fmnist-224"
    if "index" in sections:
        result["index"] = index_section(folder)
    if "loader" in sections:
        result["loader"] = loader_section(folder)
    if "distill" in sections:
        result["distill"] = distill_section(folder, args.dir / "cache")
    if "compress" in sections:
        result["compress"] = compress_section(folder, args.dir / "compress", args.compress_args.split())
    save_results(args.out, "photos", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
