"""Every registered distillation method on Fashion-MNIST with the default teacher and student: equal epochs,
several seeds, the student trained alone (`none`) as the baseline.

    nice -n 19 python benchmarks/kd_methods.py [--per-class 50] [--epochs 10] [--batch 32] [--seeds 0 1 2]

Each run goes through the product's distill stage (distill.run) on a stratified training subset written as an
.npz (fixed by --subset-seed, the same for every method and seed), and is scored on the full 10,000-image test
split: top-1, agreement with the teacher's top-1, and the mean epoch time. One torch thread per run (the
machine is shared). Writes benchmarks/results/kd_methods.json and .md; finished runs are kept in
benchmarks/results/kd_methods.partial.json, so a rerun with the same settings continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgecompress import config as cfg
from edgecompress import data, distill, files
from edgecompress.distill import methods as distillers
from edgecompress.errors import EdgeError
from edgecompress.models.loaders import WEIGHTS_DIR, build_model, load_teacher
from edgecompress.runner import RunContext

RESULTS = Path(__file__).parent / "results"
TEACHER, TEACHER_WEIGHTS = "resnet18_half", WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(data.to_float(x[i:i + 1000])).argmax(1) for i in range(0, len(x), 1000)])


def one_run(method: str, seed: int, npz: Path, epochs: int, batch: int, work: Path, test: data.Dataset,
            teacher_pred: torch.Tensor, student: str) -> dict:
    config = cfg.RunConfig(data=str(npz), seed=seed)
    config.distill.student = student
    config.distill.batch = batch
    config.teacher.spec, config.teacher.weights = TEACHER, str(TEACHER_WEIGHTS)
    config.distill.method, config.distill.epochs = method, epochs
    out = work / f"seed{seed}" / method
    # the teacher's logits depend on data, seed and teacher only: share them between the methods of a seed
    shared = work / f"seed{seed}" / "teacher_logits.pt"
    if shared.is_file():
        (out / "distill").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared, out / "distill" / "teacher_logits.pt")
    ctx = RunContext(out, config.validate(), quiet=True, force=True)
    began = time.perf_counter()
    distill.run(ctx)
    wall = time.perf_counter() - began
    if (out / "distill" / "teacher_logits.pt").is_file() and not shared.is_file():
        shutil.copy(out / "distill" / "teacher_logits.pt", shared)
    saved = torch.load(out / "distill" / "student.pt", weights_only=True)
    student, _ = build_model(config.distill.student, "", 1, 10, saved["spec"]["mean"], saved["spec"]["std"], "student")
    student.load_state_dict(saved["state_dict"])
    pred = predict(student, test.x_eval)
    history = json.loads((out / "distill" / "history.json").read_text())["epochs"]
    return {"method": method, "seed": seed, "top1": (pred == test.y_eval).float().mean().item(),
            "agreement": (pred == teacher_pred).float().mean().item(),
            "epoch_seconds": statistics.mean(e["seconds"] for e in history), "run_seconds": round(wall, 1)}


def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method and "top1" in r]
        failed = [r for r in runs if r["method"] == method and "error" in r]
        cls = distillers.METHODS[method]
        row = {"method": method, "family": cls.family, "paper": cls.paper, "seeds": len(mine),
               "failed": [r["error"] for r in failed]}
        if mine:
            for key in ("top1", "agreement", "epoch_seconds"):
                values = [r[key] for r in mine]
                row[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append(row)
    base = next((r for r in rows if r["method"] == "none" and "top1" in r), None)
    for row in rows:
        if base and "top1" in row:
            row["gain_pt"] = (row["top1"]["mean"] - base["top1"]["mean"]) * 100
    return rows


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = [
        "# Distillation methods on Fashion-MNIST",
        "",
        f"Teacher `{s['teacher']}` (shipped weights, {s['teacher_top1'] * 100:.2f}% test top-1), student "
        f"`{s['student']}`; every method trained for **{s['epochs']} epochs** on the same stratified "
        f"**{s['train_images']}-image training subset** ({s['per_class']} per class, subset seed {s['subset_seed']}), "
        f"seeds {', '.join(map(str, s['seeds']))}; scored on the full {s['test_images']}-image test split. "
        f"Batch {s['batch']} (the trainer's default is 128), otherwise the trainer's defaults (OneCycle SGD lr "
        f"{s['lr']}, {s['precision']} precision), "
        f"each method with its paper defaults (`edgecompress methods`); {s['threads']} torch thread per run.",
        "",
        f"Measured {s['date']} on {s['host']} ({s['cores']} cores, shared with other jobs: epoch times are "
        f"indicative only); whole benchmark {s['wall_minutes']:.1f} min wall.",
        "",
        "| method | family | paper | top-1 % (mean ± std) | vs student alone (pt) | agreement with teacher % | epoch s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["methods"]:
        if "top1" not in r:
            lines.append(f"| {r['method']} | {r['family']} | {r['paper']} | failed: {'; '.join(r['failed'])[:120]} | | | |")
            continue
        gain = f"{r['gain_pt']:+.2f}" if "gain_pt" in r and r["method"] != "none" else "baseline"
        lines.append(f"| {r['method']} | {r['family']} | {r['paper']} | {r['top1']['mean'] * 100:.2f} ± "
                     f"{r['top1']['std'] * 100:.2f} | {gain} | {r['agreement']['mean'] * 100:.2f} | "
                     f"{r['epoch_seconds']['mean']:.1f} |")
    lines += ["", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=50, help="training images per class in the subset")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(distillers.METHODS))
    # smaller than the trainer's 128: on 500 images, 128 leaves too few steps for any student to learn much
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student", default=cfg.DistillConfig().student, help="zoo name (default: the default student)")
    parser.add_argument("--redo", nargs="+", default=[], metavar="METHOD",
                        help="rerun only these methods' runs, keeping the rest of benchmarks/results/kd_methods.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    fashion = data.load("fashion-mnist")
    subset = data.stratified_sample(fashion.y_train, args.per_class * fashion.num_classes, args.subset_seed)
    setting = {"teacher": TEACHER, "student": args.student, "epochs": args.epochs,
               "per_class": args.per_class, "train_images": len(subset), "subset_seed": args.subset_seed,
               "seeds": args.seeds, "test_images": len(fashion.y_eval), "batch": args.batch,
               "lr": cfg.DistillConfig().lr, "threads": args.threads}
    partial_path, runs, earlier_minutes = RESULTS / "kd_methods.partial.json", [], 0.0
    if partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved["setting"] == setting:
            runs = saved["runs"]
    elif args.redo:  # keep the finished result's other runs, rerun these methods' runs
        saved = json.loads((RESULTS / "kd_methods.json").read_text())
        if {k: saved["setting"].get(k) for k in setting} != setting:
            parser.error("--redo needs benchmarks/results/kd_methods.json made with the same settings")
        runs = [r for r in saved["runs"] if r["method"] not in args.redo]
        earlier_minutes = saved["setting"]["wall_minutes"]
    resumed = len(runs)
    work = Path(tempfile.mkdtemp(prefix="kd_methods_"))
    try:
        npz = work / "fashion-subset.npz"
        np.savez(npz, x=fashion.x_train[subset, 0].numpy(), y=fashion.y_train[subset].numpy(),
                 x_test=fashion.x_eval[:, 0].numpy(), y_test=fashion.y_eval.numpy())
        test = data.load(str(npz))
        mean, std = data.channel_stats(test.x_train)
        teacher, _ = load_teacher(TEACHER, str(TEACHER_WEIGHTS), test.name, 1, 10, mean, std)
        teacher_pred = predict(teacher, test.x_eval)
        teacher_top1 = (teacher_pred == test.y_eval).float().mean().item()
        for seed in args.seeds:
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed for r in runs):
                    continue
                try:
                    run = one_run(method, seed, npz, args.epochs, args.batch, work, test, teacher_pred, args.student)
                except EdgeError as exc:  # a method that cannot run here is reported, not hidden
                    run = {"method": method, "seed": seed, "error": str(exc)}
                runs.append(run)
                print(json.dumps(run), flush=True)
                files.write_json(partial_path, {"setting": setting, "runs": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    host = cfg.host()
    setting |= {"teacher_top1": teacher_top1, "precision": "bf16 autocast" if cfg.cpu_has_bf16() else "fp32",
                "host": host["cpu"], "cores": host.get("cores"), "date": time.strftime("%Y-%m-%d"),
                "wall_minutes": earlier_minutes + (time.perf_counter() - began) / 60, "versions": cfg.versions()}
    notes = ["`multi-teacher` runs here with the one default teacher, where both combinations reduce to Hinton KD "
             "against that teacher; two teachers of different architectures are exercised in "
             "tests/test_distill.py.",
             "`cross-modal` uses its default view: the student sees a 14x14 downsampled image (shown at 28x28), "
             "the teacher the full image; it is scored on full test images.",
             "`dml` and `self-distill` use no teacher; `dml` trains one peer beside the student and reports the student.",
             "`datafree` reads no training image: it synthesises its own from the teacher's batch-norm statistics "
             "(DeepInversion) and trains the epochs on those; with `--epochs 150` it reaches 74.50% (README)."]
    left_out = [m for m in distillers.METHODS if m not in args.methods]
    if left_out:
        notes.append(f"not run here: {', '.join(left_out)} (see the README's section on distillation methods for "
                     "how it was measured)")
    if resumed:
        notes.append(f"{resumed} of the {len(runs)} runs come from an earlier invocation"
                     f"{' (rerun here: ' + ', '.join(args.redo) + ')' if args.redo else ''}; the wall time adds both "
                     "invocations")
    result = {"setting": setting, "methods": summarise(runs, args.methods), "runs": runs, "notes": notes}
    print(markdown(result))
    files.write_json(RESULTS / "kd_methods.json", result)
    files.write_text(RESULTS / "kd_methods.md", markdown(result))
    partial_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
