"""Distillation methods on a torchvision pair and real photos: does a method that wins on Fashion-MNIST's
CIFAR-style student also train the kind of pair a user brings? (The default method has to.)

The slow photo test's setting (tests/test_libraries.py): Fashion-MNIST's real images written as RGB photos of
72 to 120 px with a colour tint, 80 per class to train on and 10 per class to test on (so a top-1 is good to about
5 pt), a torchvision ResNet-18 teacher trained from scratch at 64 px for 3 epochs, a MobileNetV3-Small student,
`edgecompress compress` for 8 epochs at batch 32 and the default peak lr, each method at its defaults (plus the
rows in VARIANTS). A method whose loss becomes NaN gets its error line instead of a top-1.

    nice python benchmarks/method_photos.py [--methods hinton dkd sp reviewkd] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from perf import provenance, save_results  # noqa: E402
from testkit import FAST_VERIFY, lenient_target, write_photo_folder  # noqa: E402

from edgecompress import data  # noqa: E402
from edgecompress.models import train_teacher  # noqa: E402

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
TEACHER, STUDENT, SIZE, EPOCHS, BATCH = "torchvision:resnet18", "torchvision:mobilenet_v3_small", 64, 8, 32
# extra rows: (label, --method, options and config lines)
VARIANTS = {"dkd": [("dkd, max_grad_norm 5", ["--method", "dkd"], "max_grad_norm = 5.0\n")],
            "sp": [("sp, gamma 300", ["--method", "sp", "--method-opt", "gamma=300"], "")]}


def write_photos(root: Path) -> Path:
    fashion = data.load("fashion-mnist")
    x, y = fashion.x_train[:, 0].numpy(), fashion.y_train.numpy()
    x_test, y_test = fashion.x_eval[:, 0].numpy(), fashion.y_eval.numpy()
    train = np.concatenate([np.flatnonzero(y == c)[:80] for c in range(10)])
    test = np.concatenate([np.flatnonzero(y_test == c)[:10] for c in range(10)])
    write_photo_folder(root / "train", x[train], y[train], CLASSES)
    write_photo_folder(root / "test", x_test[test], y_test[test], CLASSES, seed=1)
    return root


def one_run(work: Path, photos: Path, weights: Path, label: str, args: list[str], config_lines: str) -> dict:
    run = work / label.replace(" ", "_").replace(",", "")
    config = work / f"{run.name}.toml"
    config.write_text(FAST_VERIFY + f"[distill]\nbatch = {BATCH}\n{config_lines}")
    began = time.perf_counter()
    done = subprocess.run(["edgecompress", "compress", "--teacher", TEACHER, "--teacher-weights", str(weights),
                           "--student", STUDENT, "--data", str(photos), "--input-size", str(SIZE), "--epochs",
                           str(EPOCHS), "--config", str(config), "--target", str(lenient_target(work / "t.toml")),
                           "--out", str(run), "--quiet", *args], capture_output=True, text=True)
    row = {"label": label, "args": args, "config": config_lines.strip(), "seconds": round(time.perf_counter() - began, 1)}
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1]}
    report = json.loads((run / "verify" / "report.json").read_text())
    history = json.loads((run / "distill" / "history.json").read_text())
    return {**row, "teacher_top1": report["teacher"]["accuracy"], "fp32_top1": report["student_fp32"]["accuracy"],
            "int8_top1": report["artifact"]["accuracy"], "grad_norm_max": max(e["grad_norm_max"] for e in history["epochs"]),
            "teacher_answers": history["epochs"][0]["teacher"]}


def markdown(result: dict) -> str:
    lines = ["# Distillation methods on a torchvision pair and real photos", "",
             f"{result['setting']}; written {result['date']}, {result['host']['cpu']}.", "",
             "| method | int8 top-1 | fp32 top-1 | largest gradient norm (before clipping) | teacher | seconds |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error'].split(';')[0]} | | | | {r['seconds']} |")
        else:
            lines.append(f"| {r['label']} | {r['int8_top1'] * 100:.0f}% | {r['fp32_top1'] * 100:.0f}% | "
                         f"{r['grad_norm_max']:,.1f} | {r['teacher_answers']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["hinton", "dkd", "sp", "reviewkd"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="method_photos_") as tmp:
        work = Path(tmp)
        photos = write_photos(work / "photos")
        weights = train_teacher.train(TEACHER, str(photos), 3, 0, BATCH, 0.05, [SIZE], work / "teacher.pt")
        runs = []
        for method in args.methods:
            for label, extra, lines in [(method, ["--method", method], ""), *VARIANTS.get(method, [])]:
                runs.append(one_run(work, photos, weights, label, extra, lines))
                print(json.dumps(runs[-1]), flush=True)
    result = {**provenance(), "date": time.strftime("%Y-%m-%d"), "runs": runs,
              "setting": f"{TEACHER} teacher (trained from scratch at {SIZE} px, 3 epochs), {STUDENT} student, 800 "
                         f"photos to train on and 100 to test on, {EPOCHS} epochs at batch {BATCH}"}
    save_results(args.out, "method_photos", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
