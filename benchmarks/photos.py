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
- augment: crop-flip augmentation on a 12,000-image subset at 224 px (a CSV list of the folder's files): a teacher
  (`wide_teacher`, 36x the student's MACs) trained here for 3 epochs, then per seed 2 epochs of KD with the
  teacher online on every batch while the FKD cache records (the same arithmetic as `soft_labels = "online"`),
  and the same run replaying that cache (`--force` into the same run directory): epoch seconds and student top-1
  on 2,000 eval images;
- compress: a first `edgecompress compress` on the whole 224 folder (`--epochs 1`, fresh run directory), wall time
  per stage and the peak resident memory of the whole process tree, sampled every 0.2 s from /proc.

Writes photos.json and photos.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
from edgecompress.progress import NoBar  # noqa: E402

SECTIONS = ("write", "index", "loader", "distill", "augment", "compress")
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


def wide_teacher():  # 36x the student's multiply-accumulates (ResNet-50 over MobileNetV3-small: about 70x)
    return net(48)


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


def distill_section(folder: Path, cache: Path, steps: int = 60, batch: int = 64, rounds: int = 5) -> dict:
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


def subset_list(folder: Path, path: Path, train: int, test: int) -> Path:
    """A CSV list of the first `train` / `test` images of each split, spread over the classes."""
    lines = ["path,label,split"]
    for split, count in (("train", train), ("test", test)):
        per_class = count // len(CLASSES)
        for c in CLASSES:
            for f in sorted((folder / split / c).iterdir())[:per_class]:
                lines.append(f"{f},{c},{split}")
    path.write_text("\n".join(lines) + "\n")
    return path


def augment_section(folder: Path, work: Path, teacher_epochs: int = 3, epochs: int = 2, seeds=(0, 1, 2)) -> dict:
    from edgecompress import config as cfg
    from edgecompress import distill
    from edgecompress.data import augment
    from edgecompress.models import Normalized
    from edgecompress.runner import RunContext, run_stage

    work.mkdir(parents=True, exist_ok=True)
    (work / "models.py").write_text(MODELS)
    listing = subset_list(folder, work / "subset.csv", 12000, 2000)
    namespace: dict = {}
    exec(compile(MODELS, "models.py", "exec"), namespace)  # the benchmark's own model file

    def config(soft_labels: str, seed: int = 0, mode: str = "crop-flip") -> cfg.RunConfig:
        conf = cfg.RunConfig(data=str(listing), seed=seed, teacher=cfg.TeacherConfig(
            f"{work / 'models.py'}:wide_teacher", str(work / "wide_teacher.pt")))
        conf.preprocess.size, conf.preprocess.channels = [224], "rgb"
        d = conf.distill
        d.student, d.epochs, d.augment, d.soft_labels = f"{work / 'models.py'}:student", epochs, mode, soft_labels
        return conf.validate()

    probe = RunContext(work / "teacher-run", config("online"), quiet=True)
    ds = probe.data
    mean, std = datasets.channel_stats(ds.x_train)
    result = {"train_images": len(ds.y_train), "eval_images": len(ds.y_eval), "epochs": epochs, "seeds": seeds,
              "teacher": "wide_teacher (net(48), 36x the student's MACs); student net(8)"}

    def top1(model) -> float:
        model.eval()
        with torch.no_grad():
            hits = sum((model(datasets.to_float(ds.x_eval[i:i + 250])).argmax(1) == ds.y_eval[i:i + 250]).sum().item()
                       for i in range(0, len(ds.y_eval), 250))
        return hits / len(ds.y_eval)

    if not (work / "wide_teacher.pt").is_file():  # the teacher, trained with the same augmentation
        torch.manual_seed(0)
        teacher = Normalized(namespace["wide_teacher"](), mean, std).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = teacher_epochs * (len(ds.y_train) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.2)
        gen, began = torch.Generator().manual_seed(0), time.perf_counter()
        for epoch in range(teacher_epochs):
            teacher.train()
            views = augment.crop_params(len(ds.y_train), 224, 224, "crop-flip", (0.35, 1.0), 100, epoch)
            order = torch.randperm(len(ds.y_train), generator=gen)
            for s in range(len(ds.y_train) // 128):
                idx = order[s * 128:(s + 1) * 128]
                x = augment.apply(datasets.to_float(ds.x_train[idx]).contiguous(memory_format=torch.channels_last),
                                  views[idx])
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(teacher(x).float(), ds.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            print(f"teacher epoch {epoch + 1}: {time.perf_counter() - began:.0f} s", flush=True)
        torch.save({"state_dict": teacher.net.state_dict(), "meta": {"mean": mean, "std": std}},
                   work / "wide_teacher.pt")
        result["teacher_train_seconds"] = round(time.perf_counter() - began, 1)
    teacher = Normalized(namespace["wide_teacher"](), mean, std)
    teacher.net.load_state_dict(torch.load(work / "wide_teacher.pt", weights_only=True)["state_dict"])
    result["teacher_top1"] = top1(teacher)

    def distil(name: str, seed: int, mode: str = "crop-flip") -> dict:
        ctx = RunContext(work / name, config("cache", seed, mode), quiet=True, force=True)
        run_stage(ctx, distill.STAGE)
        history = json.loads((work / name / "distill" / "history.json").read_text())["epochs"]
        student = distill.build_student(ctx)
        student.load_state_dict(torch.load(work / name / "distill" / "student.pt", weights_only=True)["state_dict"])
        row = {"seed": seed, "teacher": [e["teacher"] for e in history],
               "epoch_seconds": [e["seconds"] for e in history], "top1": top1(student)}
        print(name, row, flush=True)
        return row

    result["online"], result["fkd_replay"] = [], []
    for seed in seeds:
        shutil.rmtree(work / f"fkd-seed{seed}" / "distill" / "soft_labels", ignore_errors=True)
        result["online"].append(distil(f"fkd-seed{seed}", seed))  # records the cache as the teacher runs
        result["fkd_replay"].append(distil(f"fkd-seed{seed}", seed))
    result["no_augment"] = [distil(f"none-seed{seed}", seed, "none") for seed in seeds]  # cached plain logits
    online = np.median([s for r in result["online"] for s in r["epoch_seconds"]])
    replay = np.median([s for r in result["fkd_replay"] for s in r["epoch_seconds"]])
    result["epoch_speedup_replay_vs_online"] = round(float(online / replay), 2)
    diffs = [b["top1"] - a["top1"] for a, b in zip(result["online"], result["fkd_replay"])]
    result["top1_replay_minus_online"] = {"per_seed": [round(d, 4) for d in diffs],
                                          "mean": round(float(np.mean(diffs)), 4)}
    return result


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
    shutil.rmtree(run, ignore_errors=True)  # a first run: decoding, teacher logits and all
    command = [sys.executable, "-m", "edgecompress", "compress", "--data", str(folder), "--teacher",
               f"{work / 'models.py'}:teacher", "--student", f"{work / 'models.py'}:student", "--epochs", "1",
               "--input-size", "224", "--channels", "rgb", "--target", str(work / "target.toml"), "--config",
               str(work / "config.toml"), "--out", str(run), "--quiet", *extra]
    began, peak, peak_at, timeline = time.perf_counter(), 0, 0.0, []
    wall_start = time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        rss, now = tree_rss_bytes(proc.pid), time.perf_counter() - began
        if rss > peak:
            peak, peak_at = rss, now
        if not timeline or now - timeline[-1][0] >= 5:
            timeline.append((round(now, 1), round(rss / 2**20)))
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    stages, stage_ends = {}, {}
    for stage in ("distill", "quantize", "export/x86-cpu-nobudget", "verify"):
        done = run / stage / "done.json"
        if done.is_file():
            stages[stage] = json.loads(done.read_text())["seconds"]
            stage_ends[stage] = round(done.stat().st_mtime - wall_start, 1)
    report = run / "verify" / "report.json"
    top1 = {}
    if report.is_file():
        r = json.loads(report.read_text())
        top1 = {k: r[k]["accuracy"] for k in ("teacher", "student_fp32", "artifact")}
    return {"command": " ".join(command), "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "stage_seconds": stages, "stage_ends_s": stage_ends, "peak_tree_rss_mib": round(peak / 2**20),
            "peak_at_s": round(peak_at, 1), "rss_timeline_mib": timeline, "top1": top1,
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
    if "augment" in result:
        a = result["augment"]
        lines += ["", f"Crop-flip KD at 224 px, {a['train_images']} training images, {a['epochs']} epochs, {a['teacher']}; "
                  f"teacher top-1 {a['teacher_top1']:.2%} on {a['eval_images']} eval images:", "",
                  "| seed | teacher online: epoch s | top-1 | FKD cache replayed: epoch s | top-1 |", "|---|---|---|---|---|"]
        for on, re in zip(a["online"], a["fkd_replay"]):
            lines.append(f"| {on['seed']} | {' / '.join(map(str, on['epoch_seconds']))} | {on['top1']:.2%} | "
                         f"{' / '.join(map(str, re['epoch_seconds']))} | {re['top1']:.2%} |")
        for row in a.get("no_augment", []):
            lines.append(f"| {row['seed']}, no augmentation (cached logits) | {' / '.join(map(str, row['epoch_seconds']))} "
                         f"| {row['top1']:.2%} | | |")
        d = a["top1_replay_minus_online"]
        lines += ["", f"Replayed epochs run {a['epoch_speedup_replay_vs_online']}x faster than with the teacher online; "
                  f"top-1 replayed minus online: {d['mean'] * 100:+.2f} pt on average "
                  f"({', '.join(f'{v * 100:+.2f}' for v in d['per_seed'])})."]
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
    if "augment" in sections:
        result["augment"] = augment_section(folder, args.dir / "augment")
    if "compress" in sections:
        result["compress"] = compress_section(folder, args.dir / "compress", args.compress_args.split())
    save_results(args.out, "photos", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
