"""Distillation methods measured, not defaults: every method against the student trained alone, equal epochs and
schedule, several seeds, paired gains with 95% intervals; hyperparameters chosen on a validation split held out of
the training images, never on the test images.

    nice python benchmarks/kd_methods.py --setting subset [--seeds 0 1 2 3 4] [--methods ...]
    nice python benchmarks/kd_methods.py --setting full --precision bf16   (the product's precision on this CPU)
    nice python benchmarks/kd_methods.py --tune dkd beta=4,8 --setting subset --seeds 0 1   (validation only)

Data: Fashion-MNIST's 60,000 training images less a stratified validation split (--validation, default 5,000,
fixed by --split-seed); `subset` trains on a stratified 5,000 of the rest, `full` on all of the rest. Each run goes
through the product's distill stage (distill.run) with the pinned setting (teacher, student, epochs, batch, lr,
schedule, precision: all in the JSON and applied), and is scored on the validation split (for tuning) and on the
10,000 test images (for the table only). Gains over `none` are paired by seed: mean difference of test top-1
with a 95% Student-t interval over the seeds. Logit-standardised KD (hinton standardize=true) has its own row.
`cross-modal` is compared with itself at alpha = 0, which is the student trained alone on the same (downsampled)
view. `datafree` reads no training image and gets its own line.
Writes benchmarks/results/kd_methods-<setting>.json/.md (or kd_tuning-<method>.json with --tune); finished runs
are kept in a .partial.json beside them, so a rerun with the same setting continues where it stopped;
--runs-from adds the runs kept in other output directories (seeds or methods run in parallel, one --out each).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import provenance  # noqa: E402
from readme import clipping, commits, methods_table, shown  # noqa: E402

from edgecompress import config as cfg  # noqa: E402
from edgecompress import data, distill, files  # noqa: E402
from edgecompress.distill import methods as distillers  # noqa: E402
from edgecompress.errors import EdgeError  # noqa: E402
from edgecompress.models.loaders import WEIGHTS_DIR, build_model, load_teacher  # noqa: E402
from edgecompress.runner import RunContext  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEACHER, TEACHER_WEIGHTS = "resnet18_half", WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"
SUBSET_IMAGES = 5000
# two-sided 97.5% quantiles of Student's t, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# what makes two runs comparable (the rest of the setting records when and where)
SAME_SETTING = ("setting", "teacher", "student", "epochs", "batch", "lr", "max_grad_norm", "precision",
                "threads", "train_images", "validation_images", "split_seed")
# what a setting recorded before the key existed ran with
SETTING_BEFORE_KEY = {"max_grad_norm": 0.0}
BASELINES = {"cross-modal": {"alpha": 0.0}}  # compared with itself at these options instead of with `none`
# rows of their own beside a method's defaults: logit standardisation is an option of hinton, measured as a method
VARIANTS = {"hinton": [{"standardize": "true"}]}


def same_setting(saved: dict, setting: dict) -> bool:
    return all(saved.get(k, SETTING_BEFORE_KEY.get(k)) == setting[k] for k in SAME_SETTING)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(data.to_float(x[i:i + 1000])).argmax(1) for i in range(0, len(x), 1000)])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def splits(validation: int, split_seed: int, setting: str) -> tuple[torch.Tensor, torch.Tensor, data.Dataset]:
    """(train indices, validation indices) into Fashion-MNIST's training images, and the data set."""
    fashion = data.load("fashion-mnist")
    held = data.stratified_sample(fashion.y_train, validation, split_seed)
    rest = torch.ones(len(fashion.y_train), dtype=torch.bool)
    rest[held] = False
    pool = rest.nonzero().flatten()
    if setting == "subset":
        pool = pool[data.stratified_sample(fashion.y_train[pool], SUBSET_IMAGES, split_seed + 1)]
    return pool, held, fashion


def distill_config(method: str, options: dict, setting: dict) -> cfg.DistillConfig:
    d = cfg.DistillConfig()
    d.student, d.method, d.method_opts = setting["student"], method, dict(options)
    d.epochs, d.batch, d.lr, d.precision = setting["epochs"], setting["batch"], setting["lr"], setting["precision"]
    d.max_grad_norm = setting["max_grad_norm"]
    return d


def resolved(method: str, options: dict, setting: dict) -> dict:
    """Every option the method runs with (its defaults, distill.temperature/alpha, then `options`): what a run is
    recorded and resumed by, so a run made before a default changed is not taken for one made after."""
    return distillers.method_options(distill_config(method, options, setting))


def one_run(method: str, options: dict, seed: int, npz: Path, setting: dict, work: Path, scored: dict) -> dict:
    config = cfg.RunConfig(data=str(npz), seed=seed)
    config.teacher.spec, config.teacher.weights = TEACHER, str(TEACHER_WEIGHTS)
    config.distill = d = distill_config(method, options, setting)
    tag = method + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    out = work / f"seed{seed}" / tag
    shared = work / f"seed{seed}" / "teacher_logits.pt"  # depends on data, seed and teacher only
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
    student, _ = build_model(d.student, "", 1, 10, saved["spec"]["mean"], saved["spec"]["std"], "student")
    student.load_state_dict(saved["state_dict"])
    result = {"method": method, "options": options, "resolved": resolved(method, options, setting), "seed": seed,
              "run_seconds": round(wall, 1), "commit": setting["commit"]}
    for split, (x, y, teacher_pred) in scored.items():
        pred = predict(student, x)
        result[f"{split}_top1"] = (pred == y).float().mean().item()
        result[f"{split}_agreement"] = (pred == teacher_pred).float().mean().item()
    shutil.rmtree(out, ignore_errors=True)
    return result


def tuning_grid(method: str, runs: list[dict], seeds: list[int], setting: dict) -> list[dict]:
    """One row per option set the runs trained with (their recorded resolved options, not the options re-resolved
    against today's defaults, which may have changed since): its options as given plus every one that differs
    from today's default, and the mean validation top-1 over `seeds`."""
    today, rows = resolved(method, {}, setting), {}
    for r in runs:
        if r["method"] == method and "validation_top1" in r and r["seed"] in seeds:
            row = rows.setdefault(json.dumps(r["resolved"], sort_keys=True),
                                  {"resolved": r["resolved"], "given": r["options"], "scores": []})
            row["scores"].append(r["validation_top1"])
    table = []
    for row in rows.values():
        ran = row["resolved"]
        keys = sorted(set(row["given"]) | {k for k in today if ran.get(k) != today[k]})
        options = {k: shown(ran[k]) if k in ran else "(not an option then)" for k in keys}
        table.append({"options": options, "resolved": ran, "validation_top1": statistics.mean(row["scores"]),
                      "seeds": len(row["scores"])})
    return table


def run_key(run: dict) -> tuple[str, str, int]:
    """What makes two runs the same run: the method, its resolved options and the seed."""
    return run["method"], json.dumps(run.get("resolved"), sort_keys=True), run["seed"]


def paired(values: list[float], base: list[float]) -> dict:
    """Mean paired difference in points with a 95% Student-t interval over the pairs (seeds)."""
    diffs = [(a - b) * 100 for a, b in zip(values, base)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"mean_pt": mean, "ci95_pt": None, "pairs": len(diffs)}
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean_pt": round(mean, 3), "ci95_pt": [round(mean - half, 3), round(mean + half, 3)], "pairs": len(diffs)}


def summarise(runs: list[dict], methods: list[str], setting: dict) -> list[dict]:
    def of(method: str, options: dict) -> dict[int, dict]:
        wanted = resolved(method, options, setting)
        return {r["seed"]: r for r in runs
                if r["method"] == method and r.get("resolved") == wanted and "test_top1" in r}

    rows = []
    for method, options in table_rows(methods):
        cls = distillers.METHODS[method]
        mine = of(method, options)
        row = {"method": method + "".join(f" {k}={v}" for k, v in options.items()), "family": cls.family,
               "paper": cls.paper, "options": resolved(method, options, setting), "seeds": sorted(mine),
               "failed": [r["error"] for r in runs if r["method"] == method and r["options"] == options
                          and "error" in r]}
        if mine:
            for key in ("test_top1", "validation_top1", "test_agreement"):
                values = [r[key] for r in mine.values()]
                row[key] = {"mean": statistics.mean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            base_method, base_options = (method, BASELINES[method]) if method in BASELINES else ("none", {})
            base = of(base_method, base_options)
            seeds = sorted(set(mine) & set(base))
            if method not in ("none", "datafree") and seeds:
                row["baseline"] = base_method + "".join(f" {k}={v}" for k, v in base_options.items())
                row["gain_vs_baseline"] = paired([mine[s]["test_top1"] for s in seeds],
                                                 [base[s]["test_top1"] for s in seeds])
            hinton = of("hinton", {})
            seeds = sorted(set(mine) & set(hinton))
            # against Hinton KD only where both train on the same images (not cross-modal's view, not data-free)
            if (method, options) != ("hinton", {}) and method not in ("none", "datafree", *BASELINES) and seeds:
                row["gain_vs_hinton"] = paired([mine[s]["test_top1"] for s in seeds],
                                               [hinton[s]["test_top1"] for s in seeds])
        rows.append(row)
    return rows


def table_rows(methods: list[str]) -> list[tuple[str, dict]]:
    """(method, options) of each row: every method with its defaults, then the variants of those measured."""
    return [(m, {}) for m in methods] + [(m, o) for m, variants in VARIANTS.items() if m in methods for o in variants]


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"# Distillation methods on Fashion-MNIST: {s['setting']} setting", "",
        f"Teacher `{s['teacher']}` (shipped weights, {s['teacher_test_top1'] * 100:.2f}% test top-1), student "
        f"`{s['student']}`; every method {s['epochs']} epoch(s) on the same {s['train_images']} training images "
        f"(the {s['validation_images']} validation images held out), batch {s['batch']}, OneCycle SGD peak lr "
        f"{s['lr']}, {clipping(s)}, {s['precision']} precision, seeds {', '.join(map(str, s['seeds']))}; each "
        f"method with its defaults (`edgecompress methods`). Test top-1 on the {s['test_images']} test images; gains are paired by "
        f"seed (mean [95% t-interval] in points). Runs at {commits(result['runs'])}; written {s['date']}, "
        f"{s['host']}.", "",
        *methods_table(result["methods"], agreement=True)]
    lines += ["", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def parse_grid(items: list[str]) -> list[dict]:
    """`key=v1,v2 other=w1` -> the cartesian product of the options, as strings (the method coerces them)."""
    grid = [{}]
    for item in items:
        key, _, values = item.partition("=")
        grid = [g | {key: v} for g in grid for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("subset", "full"), default="subset")
    parser.add_argument("--validation", type=int, default=5000, help="training images held out for tuning")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+",
                        default=[m for m in distillers.METHODS if m != "datafree"])
    # the tables' schedule, pinned: 4 epochs was the distill stage's default when they ran (it is 5 since)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=cfg.DistillConfig().batch)
    parser.add_argument("--lr", type=float, default=cfg.DistillConfig().lr)
    parser.add_argument("--max-grad-norm", type=float, default=0.0)
    parser.add_argument("--precision", default="fp32", help="fp32 by default: bf16 autocast's rounding adds noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student", default=cfg.DistillConfig().student)
    parser.add_argument("--tune", nargs="+", metavar=("METHOD", "KEY=V1,V2"),
                        help="a grid of one method's options, scored on the validation split only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs-from", type=Path, nargs="+", default=[], metavar="DIR",
                        help="also reuse the runs kept in these output directories (runs split over processes or "
                             "machines, each with its own --out), under the same setting")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    if args.tune:
        method, grid = args.tune[0], parse_grid(args.tune[1:])
        plan = [(method, g) for g in grid]
        stem = f"kd_tuning-{method}-{args.setting}"
    else:
        plan = table_rows(args.methods) + [(m, o) for m, o in BASELINES.items() if m in args.methods]
        if "hinton" not in args.methods or "none" not in args.methods:
            parser.error("--methods must include none and hinton (the baselines every gain is paired with)")
        stem = f"kd_methods-{args.setting}"
    train_idx, val_idx, fashion = splits(args.validation, args.split_seed, args.setting)
    setting = {"setting": args.setting, "teacher": TEACHER, "student": args.student, "epochs": args.epochs,
               "batch": args.batch, "lr": args.lr, "max_grad_norm": args.max_grad_norm,
               "precision": args.precision, "threads": args.threads,
               "train_images": len(train_idx), "validation_images": len(val_idx), "split_seed": args.split_seed,
               "test_images": len(fashion.y_eval), "seeds": args.seeds, "commit": commit(),
               "schedule": "OneCycle (the distill stage's), SGD Nesterov momentum 0.9, weight decay "
                           f"{cfg.DistillConfig().weight_decay}"}
    args.out.mkdir(parents=True, exist_ok=True)
    partial_path, runs = args.out / f"{stem}.partial.json", []
    # runs are kept by (method, resolved options, seed) and reused under the same training setting, from another
    # commit or seed list too; a finished tuning's runs as well, so a grid can be extended
    for earlier in (partial_path, args.out / f"{stem}.json"):
        if earlier.is_file():
            saved = json.loads(earlier.read_text())
            if same_setting(saved["setting"], setting):
                runs = saved["runs"]
                break
    done = {run_key(r) for r in runs}
    for other in args.runs_from:
        for earlier in (other / f"{stem}.partial.json", other / f"{stem}.json"):
            saved = json.loads(earlier.read_text()) if earlier.is_file() else None
            if saved and same_setting(saved["setting"], setting):
                runs += [r for r in saved["runs"] if run_key(r) not in done]
                done = {run_key(r) for r in runs}
    work = Path(tempfile.mkdtemp(prefix="kd_methods_"))
    try:
        npz = work / "fashion-train.npz"
        np.savez(npz, x=fashion.x_train[train_idx, 0].numpy(), y=fashion.y_train[train_idx].numpy(),
                 x_test=fashion.x_eval[:, 0].numpy(), y_test=fashion.y_eval.numpy())
        train = data.load(str(npz))
        mean, std = data.channel_stats(train.x_train)
        teacher, _ = load_teacher(TEACHER, str(TEACHER_WEIGHTS), train.name, 1, 10, mean, std)
        x_val, y_val = fashion.x_train[val_idx], fashion.y_train[val_idx]
        scored = {"validation": (x_val, y_val, predict(teacher, x_val))}
        if not args.tune:  # tuning never reads the test images
            scored["test"] = (fashion.x_eval, fashion.y_eval, predict(teacher, fashion.x_eval))
            setting["teacher_test_top1"] = (scored["test"][2] == fashion.y_eval).float().mean().item()
        for seed in args.seeds:
            for method, options in plan:
                wanted = resolved(method, options, setting)
                if run_key({"method": method, "resolved": wanted, "seed": seed}) in done:
                    continue
                try:
                    run = one_run(method, options, seed, npz, setting, work, scored)
                except EdgeError as exc:  # a method that cannot run here is reported, not hidden
                    run = {"method": method, "options": options, "resolved": wanted, "seed": seed, "error": str(exc)}
                runs.append(run)
                done.add(run_key(run))
                print(json.dumps(run), flush=True)
                files.write_json(partial_path, {"setting": setting, "runs": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    setting |= {"date": time.strftime("%Y-%m-%d"), "host": provenance()["host"]["cpu"],
                "wall_minutes": round((time.perf_counter() - began) / 60, 1)}
    if args.tune:
        method = args.tune[0]
        table = tuning_grid(method, runs, args.seeds, setting)
        result = {"setting": setting, "method": args.tune[0], "grid": table, "runs": runs,
                  "chosen": max(table, key=lambda row: row["validation_top1"])["options"],
                  "rule": "highest mean validation top-1; the test images are not read"}
        files.write_json(args.out / f"{stem}.json", result)
        print(json.dumps(result["grid"], indent=1))
    else:
        notes = {"multi-teacher": "`multi-teacher` runs with the one default teacher, where both combinations "
                                  "reduce to Hinton KD.",
                 "cross-modal": "`cross-modal`: the student sees a 14x14 downsampled view (shown at 28x28); its "
                                "baseline is cross-modal with alpha = 0, the student trained alone on the same view; "
                                "scored on full test images.",
                 "dml": "`dml` uses no teacher and reports the first of its two students.",
                 "self-distill": "`self-distill` uses no teacher."}
        notes = [note for method, note in notes.items() if method in args.methods]
        result = {"setting": setting, "methods": summarise(runs, args.methods, setting), "runs": runs, "notes": notes}
        files.write_json(args.out / f"{stem}.json", result)
        files.write_text(args.out / f"{stem}.md", markdown(result))
        print(markdown(result))
    partial_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
