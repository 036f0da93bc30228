"""Quantization benchmark: ONNX Runtime's quantize_static defaults against edgecompress's quantize stage.

For every shipped student of the zoo, trained briefly here with Hinton KD from the shipped teacher (the setting
is printed and recorded), on the 10,000 Fashion-MNIST test images:
  - "ORT defaults": quantize_static(model, out, reader), nothing else (QDQ, int8 activations and weights,
    per-tensor, MinMax), calibrated on the same 512 stratified training images;
  - "ours": the x86-cpu scheme (uint8 activations, int8 per-channel weights), calibration "auto" (MinMax, Entropy,
    Percentile, best probe SQNR), then the sensitivity fallback and QAT while the 0.3-point budget is missed.
Plus two constructed cases on the default student (the distill config's): one channel blown up 100x after a BatchNorm
and compensated in the next conv (the hard case for the fallback), and the same in all three stages with at
most one node kept in float (the case for QAT); and the x86 latency of uint8 against int8 activations.

    nice -n 19 .venv/bin/python benchmarks/quantization.py [--steps 150] [--students a,b]
    nice -n 19 .venv/bin/python benchmarks/quantization.py --cases-only --default-run DIR [--train-images 10000]

With --default-run DIR --seeds 0,1,2: the default run's student also under several calibration seeds, ORT's defaults
against the stage's defaults (and the stage without bias correction), each seed drawing its own calibration and
probe images (calibration_seeds).

Our tries are judged and chosen on 10,000 selection images drawn from the training split apart from the
calibration, probe and QAT images, as the stage does; every top-1 in the tables is on the test images, which
choose nothing.

Writes benchmarks/results/quantization.json and .md. Latencies: batch 1, one intra-op thread, median of a quick
timing on this (shared) host; compare within one table, not across hosts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecompress import config as cfg
from edgecompress import backends, data, files, quantize, sensitivity, targets
from edgecompress.distill.methods import kd_loss
from edgecompress.models import ZOO, Normalized, create
from edgecompress.models.loaders import WEIGHTS_DIR, load_teacher
from edgecompress.progress import NoBar
from edgecompress.runners import TorchRunner, predict

RESULTS = Path(__file__).parent / "results"
TEACHERS = ("resnet18", "resnet18_half")
DEFAULT_STUDENT = cfg.DistillConfig().student


def train_student(name: str, fm: data.Dataset, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
                  steps: int, seed: int) -> Normalized:
    """Brief Hinton KD (T 4, alpha 0.9, SGD nesterov, one-cycle lr 0.05, batch 128) on a training subset."""
    torch.manual_seed(seed)
    mean, std = data.channel_stats(fm.x_train)
    model = Normalized(create(name, 1, fm.num_classes), mean, std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        logits = model(data.to_float(x[idx]))
        loss = 0.1 * F.cross_entropy(logits, y[idx]) + 0.9 * kd_loss(logits, teacher_logits[idx], 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def ort_defaults(fp32: Path, out: Path, calibration: torch.Tensor) -> None:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(fp32), str(out), quantize.CalibrationReader(calibration))


@dataclasses.dataclass
class Selection:
    """Training images apart from calibration, probe and QAT images that the stage's tries are judged on (as the
    stage does), with the teacher's top-1 on them; the test images only report."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_top1: float


def eval_correct(path: Path, fm: data.Dataset) -> np.ndarray:
    """Per test image: whether the model's top-1 is right (what the benchmark reports)."""
    return sensitivity.Judge.logits(path, fm.x_eval).argmax(1) == fm.y_eval.numpy()


def compare(name: str, model: torch.nn.Module, fm: data.Dataset, calibration: torch.Tensor, probe: torch.Tensor,
            selection: Selection, teacher_top1: float, qat_inputs: quantize.QatInputs, conf: cfg.QuantizeConfig,
            work: Path) -> dict:
    spec = {"input_shape": [1, 28, 28], "mean": model.mean_values, "std": model.std_values, "classes": fm.classes}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    fp32 = work / f"{slug}.fp32.onnx"
    quantize.export_onnx(model, spec, 17, fp32)
    judge = sensitivity.Judge(fp32, selection.x, selection.y, probe, 1, ("CPUExecutionProvider",))
    budget = quantize.Budget(judge.correct(fp32), selection.teacher_top1, conf.max_drop_vs_fp32, 2.0)
    fp32_top1 = float(eval_correct(fp32, fm).mean())
    default_path = work / f"{slug}.ort-default.onnx"
    began = time.perf_counter()
    ort_defaults(fp32, default_path, calibration)
    default_seconds = time.perf_counter() - began
    default_top1 = float(eval_correct(default_path, fm).mean())
    (work / slug).mkdir()
    began = time.perf_counter()
    search = quantize.search_int8(model, spec, fp32, backends.scheme_for(targets.load("x86-cpu")), conf, calibration,
                                  judge, budget, 17, qat_inputs, work / slug, print, lambda *a, **k: NoBar(None))
    ours_seconds = time.perf_counter() - began
    final = search.chosen()

    def row(top1: float, path: Path, seconds: float) -> dict:
        return {"top1": round(top1, 4), "drop_vs_fp32_pt": round((fp32_top1 - top1) * 100, 2),
                "drop_vs_teacher_pt": round((teacher_top1 - top1) * 100, 2),
                "latency_bs1_ms": round(judge.latency(path), 4), "size_bytes": path.stat().st_size,
                "seconds": round(seconds, 1)}

    result = {"student": name, "fp32": row(fp32_top1, fp32, 0.0), "ort_defaults": row(default_top1,
              default_path, default_seconds), "ours": row(float(eval_correct(final["path"], fm).mean()),
                                                          final["path"], ours_seconds)}
    result["ours"] |= {"chosen": final["kind"], "calibration": final["calibration"],
                       "float_nodes": final["excluded_nodes"], "budget_met": not final["missed"]}
    result["tries"] = [{k: v for k, v in t.items() if k != "path"} for t in search.tries]
    result["sensitivity_top3"] = search.ranking[:3]
    return result


def top1_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(TorchRunner(model, 1), x, 500).argmax(1) == y.numpy()).mean())


def calibration_seeds(model: Normalized, fm: data.Dataset, seeds: list[int], teacher: torch.nn.Module,
                      work: Path) -> list[dict]:
    """The default student quantized by the stage's defaults (QuantizeConfig(): MinMax, bias correction) and by
    ORT's defaults, with the calibration images (512, stratified) and the probe images (1000 others) drawn by each
    seed as the stage draws them (with its selection images, which choose among our tries); also ours without bias
    correction. Per seed, on the test images: top-1, the images only one of ours and ORT's gets right (a paired
    comparison), and the logits' SQNR vs fp32 on the probe images."""
    spec = {"input_shape": [1, 28, 28], "mean": model.mean_values, "std": model.std_values, "classes": fm.classes}
    fp32 = work / "seeds.fp32.onnx"
    quantize.export_onnx(model, spec, 17, fp32)
    scheme, conf = backends.scheme_for(targets.load("x86-cpu")), cfg.QuantizeConfig()
    rows = []
    for seed in seeds:
        calib_idx, select_idx, probe_idx, _ = quantize.split_training_images(fm.y_train, conf, seed)
        judge = sensitivity.Judge(fp32, fm.x_train[select_idx], fm.y_train[select_idx], fm.x_train[probe_idx], 1,
                                  ("CPUExecutionProvider",))
        budget = quantize.Budget(judge.correct(fp32), top1_of(teacher, fm.x_train[select_idx], fm.y_train[select_idx]),
                                 conf.max_drop_vs_fp32, 2.0)
        fp32_correct = eval_correct(fp32, fm)
        default_path = work / f"seed{seed}.ort-default.onnx"
        ort_defaults(fp32, default_path, fm.x_train[calib_idx])
        correct = {"ort_defaults": eval_correct(default_path, fm)}
        sqnr = {"ort_defaults": judge.probe_sqnr(default_path)}
        for key, bias_correction in (("ours", True), ("ours_without_bias_correction", False)):
            folder = work / f"seed{seed}-{key}"
            folder.mkdir()
            search = quantize.search_int8(model, spec, fp32, scheme, dataclasses.replace(conf, bias_correction=
                                          bias_correction), fm.x_train[calib_idx], judge, budget, 17, None, folder,
                                          lambda *a: None, lambda *a, **k: NoBar(None))
            final = search.chosen()
            correct[key], sqnr[key] = eval_correct(final["path"], fm), final["probe_sqnr_db"]
            if key == "ours":
                chosen = f"{final['kind']} ({final['calibration']}, {len(final['excluded_nodes'])} float nodes)"
        row = {"seed": seed, "calibration_indices": [int(i) for i in calib_idx[:3]] + ["..."], "chosen": chosen}
        for key, right in [("fp32", fp32_correct), *correct.items()]:
            row[key] = {"top1": round(float(right.mean()), 4),
                        "drop_vs_fp32_pt": round(float(fp32_correct.mean() - right.mean()) * 100, 2)}
            if key in sqnr:
                row[key]["probe_sqnr_db"] = round(sqnr[key], 3)
        row["only_ours_right"] = int((correct["ours"] & ~correct["ort_defaults"]).sum())
        row["only_ort_defaults_right"] = int((~correct["ours"] & correct["ort_defaults"]).sum())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def activation_latency(model: torch.nn.Module, fm: data.Dataset, calibration: torch.Tensor, work: Path) -> dict:
    """uint8 vs int8 activations under the x86 scheme: batch-1 and batch-64 medians, 2 s each, one thread."""
    spec = {"input_shape": [1, 28, 28], "mean": model.mean_values, "std": model.std_values, "classes": fm.classes}
    fp32 = work / "latency.fp32.onnx"
    quantize.export_onnx(model, spec, 17, fp32)
    x86 = targets.load("x86-cpu")
    out = {}
    for activation in ("uint8", "int8"):
        scheme = backends.onnxruntime.x86_scheme(dataclasses.replace(x86, activation_type=activation))
        path = work / f"latency.{activation}.onnx"
        quantize.quantize_qdq(fp32, path, calibration, "minmax", scheme)
        out[activation] = {f"bs{b}": round(sensitivity.median_latency_ms(
            path, 1, ("CPUExecutionProvider",), data.to_float(fm.x_eval[:b]).numpy(), seconds=2.0), 4)
            for b in (1, 64)}
    out["fp32"] = {f"bs{b}": round(sensitivity.median_latency_ms(
        fp32, 1, ("CPUExecutionProvider",), data.to_float(fm.x_eval[:b]).numpy(), seconds=2.0), 4) for b in (1, 64)}
    return out


def planted(model: Normalized, stages: tuple[int, ...]) -> Normalized:
    """A copy with channel 0 after bn1 of the first block of each of `stages` scaled 100x (and compensated)."""
    import copy

    hard = copy.deepcopy(model)
    for stage in stages:
        block = hard.net.stages[stage][0]
        sensitivity.plant_outlier_channel(block.bn1, block.conv2, channel=0, factor=100.0)
    return hard


def markdown(r: dict) -> str:
    lines = ["# Quantization: ORT quantize_static defaults vs edgecompress", "",
             f"Host: {r['host']['cpu']}, {r['host'].get('cores')} cores (shared with other work); onnxruntime "
             f"{r['versions']['onnxruntime']}, torch {r['versions']['torch']}. Students: {r['setting']}.",
             f"Accuracy: top-1 on the {r['eval_images']} Fashion-MNIST test images. Latency: batch 1, one "
             "thread, median of a quick timing (ms). Budget for ours: <= 0.3 pt below the fp32 student.", "",
             "| student | fp32 top-1 | ORT defaults top-1 (drop vs fp32 / vs teacher) | ours top-1 (drop vs fp32 / "
             "vs teacher) | ours chosen | fp32 / ORT defaults / ours latency (ms) | ORT defaults / ours size (KB) |",
             "|---|---|---|---|---|---|---|"]
    for s in r["students"] + r["cases"]:
        f, d, o = s["fp32"], s["ort_defaults"], s["ours"]
        chosen = f"{o['chosen']} ({o['calibration']}" + (f", {len(o['float_nodes'])} float nodes" if o["float_nodes"]
                                                         else "") + ")"
        lines.append(f"| {s['student']} | {f['top1'] * 100:.2f}% | {d['top1'] * 100:.2f}% ({d['drop_vs_fp32_pt']:+.2f} /"
                     f" {d['drop_vs_teacher_pt']:+.2f}) | {o['top1'] * 100:.2f}% ({o['drop_vs_fp32_pt']:+.2f} / "
                     f"{o['drop_vs_teacher_pt']:+.2f}) | {chosen} | {f['latency_bs1_ms']:.3f} / "
                     f"{d['latency_bs1_ms']:.3f} / {o['latency_bs1_ms']:.3f} | {d['size_bytes'] / 1024:.0f} / "
                     f"{o['size_bytes'] / 1024:.0f} |")
    lines += ["", f"Teacher ({r['teacher']}) top-1: {r['teacher_top1'] * 100:.2f}%.", ""]
    if r.get("calibration_seeds"):
        lines += seeds_markdown(r["calibration_seeds"], r["eval_images"])
    lines += ["## Every try of the constructed cases", ""]
    for s in r["cases"]:
        lines += [f"### {s['student']}", "", "Each try judged on the selection images (training images apart from "
                  "calibration, probe and QAT images), as the stage judges them; the test images only report.", "",
                  "| try | kind | calibration | float nodes | selection top-1 | drop vs fp32 (pt) "
                  "| latency (ms) |", "|---|---|---|---|---|---|---|"]
        for t in s["tries"]:
            nodes = ", ".join(n.rsplit("/", 2)[-2] if "/" in n else n for n in t["excluded_nodes"]) or "-"
            lines.append(f"| {t['try']} | {t['kind']} | {t['calibration']} | {nodes} | "
                         f"{t['selection_top1'] * 100:.2f}% | "
                         f"{t['drop_vs_fp32_pt']:+.2f} | {t['latency_bs1_ms']:.3f} |")
        ptq = min(t["drop_vs_fp32_pt"] for t in s["tries"] if t["kind"] == "ptq")
        qat = [t["drop_vs_fp32_pt"] for t in s["tries"] if t["kind"] == "qat"]
        if qat and ptq > 0:
            run = next(t for t in s["tries"] if t["kind"] == "qat")
            lines.append(f"\nQAT recovered {(ptq - qat[0]) / ptq:.0%} of the best PTQ try's drop "
                         f"({ptq:+.2f} -> {qat[0]:+.2f} pt), with no node in float"
                         + (f"; fine-tuning took {run['qat_seconds']:.0f} s ({run['qat_epochs']} epoch(s) of "
                            f"{run['qat_images']} images, lr {run['qat_lr']:g}, step-size lr "
                            f"{run['qat_scale_lr']:g}, one thread)." if "qat_scale_lr" in run else "."))
        lines.append("")
    lat = r["activation_latency"]
    lines += ["## x86: uint8 vs int8 activations (default student, ms, one thread)", "",
              "| model | batch 1 | batch 64 |", "|---|---|---|"]
    for key in ("fp32", "uint8", "int8"):
        lines.append(f"| {key} | {lat[key]['bs1']:.3f} | {lat[key]['bs64']:.3f} |")
    lines += ["", f"Wall time: {r['seconds']:.0f} s. Command: {r.get('command', '')}"]
    if r.get("cases_run"):
        c = r["cases_run"]
        lines += ["", f"The constructed cases (their rows above and their tries) were rerun on their own: "
                      f"{c['setting']}; {c['seconds']:.0f} s; command: {c['command']}"]
    if r.get("note"):
        lines += ["", f"Note: {r['note']}"]
    return "\n".join(lines) + "\n"


def seeds_markdown(rows: list[dict], eval_images: int) -> list[str]:
    """The calibration-seed table of the default student, with the mean over seeds."""
    keys = ("ort_defaults", "ours", "ours_without_bias_correction")
    lines = ["## Default student: calibration seeds", "",
             "Each seed draws the 512 calibration images (stratified) and the 1,000 probe images as the quantize stage "
             "does; ours is the stage with its defaults (MinMax, bias correction, fallback if the budget is missed). "
             f"Top-1 on the {eval_images} test images (drop vs fp32 in points, + = lost); probe: logits' SQNR vs "
             "fp32 on the probe images (dB, training split); paired: test images only ours / only ORT's defaults get "
             "right.", "",
             "| seed | fp32 | ORT defaults | ours | ours without bias correction | paired (ours / ORT) | probe SQNR "
             "ORT / ours / ours without BC |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]['top1'] * 100:.2f}% ({row[k]['drop_vs_fp32_pt']:+.2f})" for k in keys]
        lines.append(f"| {row['seed']} | {row['fp32']['top1'] * 100:.2f}% | {' | '.join(cells)} | "
                     f"{row['only_ours_right']} / {row['only_ort_defaults_right']} | "
                     + " / ".join(f"{row[k]['probe_sqnr_db']:.2f}" for k in keys) + " |")
    mean = {k: sum(row[k]["top1"] for row in rows) / len(rows) for k in ("fp32", *keys)}
    sqnr = {k: sum(row[k]["probe_sqnr_db"] for row in rows) / len(rows) for k in keys}
    lines.append(f"| mean | {mean['fp32'] * 100:.2f}% | "
                 + " | ".join(f"{mean[k] * 100:.3f}% ({(mean['fp32'] - mean[k]) * 100:+.3f})" for k in keys)
                 + f" | {sum(r['only_ours_right'] for r in rows)} / {sum(r['only_ort_defaults_right'] for r in rows)} | "
                 + " / ".join(f"{sqnr[k]:.2f}" for k in keys) + " |")
    wins = sum(r["ours"]["top1"] >= r["ort_defaults"]["top1"] for r in rows)
    lines += ["", f"Ours at least as accurate as ORT's defaults on {wins} of {len(rows)} seeds.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="KD steps of batch 128 per student")
    parser.add_argument("--train-images", type=int, default=5000, help="training subset (teacher logits on it)")
    parser.add_argument("--students", default=",".join(n for n in ZOO if n not in TEACHERS))
    parser.add_argument("--default-run", type=Path, help="a run directory of `edgecompress compress` (defaults, "
                        "fashion-mnist): its distilled student is compared too and is the base of the constructed cases")
    parser.add_argument("--seeds", default="", help="calibration seeds for the default run's student, e.g. "
                        "0,1,2: ORT's defaults vs the stage's defaults with each seed's calibration images")
    parser.add_argument("--eval-images", type=int, default=0, help="first N test images only (0: all; for smoke runs)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    parser.add_argument("--cases-only", action="store_true", help="rerun only the constructed cases (needs "
                        "--default-run) and replace them in the saved .json, keeping its student rows")
    args = parser.parse_args(argv)
    if args.render:
        files.write_text(RESULTS / "quantization.md", markdown(json.loads((RESULTS / "quantization.json").read_text())))
        return 0
    if args.seeds and not args.default_run:
        parser.error("--seeds needs --default-run DIR (the student whose calibration seeds are compared)")
    if args.cases_only and not args.default_run:
        parser.error("--cases-only needs --default-run DIR (the student the constructed cases start from)")
    torch.set_num_threads(1)  # measured here: one thread trains 5x faster than two on this loaded 2-core host
    began = time.perf_counter()
    fm = data.load("fashion-mnist")
    if args.eval_images:
        fm.x_eval, fm.y_eval = fm.x_eval[:args.eval_images], fm.y_eval[:args.eval_images]
    mean, std = data.channel_stats(fm.x_train)
    teacher, _ = load_teacher("resnet18_half", str(WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"), fm.name, 1,
                              fm.num_classes, mean, std)
    calib_idx = data.stratified_sample(fm.y_train, 512, 0)
    rest = torch.ones(len(fm.y_train), dtype=torch.bool)
    rest[calib_idx] = False
    pool = rest.nonzero().flatten()
    probe_idx = pool[data.stratified_sample(fm.y_train[pool], 1000, 0)]
    rest[probe_idx] = False
    pool = rest.nonzero().flatten()
    select_idx = pool[data.stratified_sample(fm.y_train[pool], cfg.QuantizeConfig().selection_size, 0)]
    rest[select_idx] = False
    pool = rest.nonzero().flatten()
    train_idx = pool[data.stratified_sample(fm.y_train[pool], args.train_images, 1)]
    x_train, y_train = fm.x_train[train_idx], fm.y_train[train_idx]
    print(f"teacher logits on {len(train_idx)} training and {len(fm.y_eval)} test images", flush=True)
    teacher_train = torch.from_numpy(predict(TorchRunner(teacher, 1), x_train, 500))
    teacher_top1 = top1_of(teacher, fm.x_eval, fm.y_eval)
    selection = Selection(fm.x_train[select_idx], fm.y_train[select_idx],
                          top1_of(teacher, fm.x_train[select_idx], fm.y_train[select_idx]))
    calibration, probe = fm.x_train[calib_idx], fm.x_train[probe_idx]
    conf = cfg.QuantizeConfig(calibration_method="auto", qat_images=len(train_idx))
    qat_inputs = quantize.QatInputs(x_train, y_train, lambda: teacher_train, 4.0, 0.9, 0)
    setting = (f"Hinton KD from resnet18_half (T 4, alpha 0.9), {args.steps} steps of batch 128 on "
               f"{len(train_idx)} training images, seed 0, one thread")
    results = {"setting": setting, "teacher": "resnet18_half", "teacher_top1": teacher_top1,
               "eval_images": len(fm.y_eval), "selection_images": len(select_idx), "students": [], "cases": []}
    with tempfile.TemporaryDirectory(prefix="edgecompress-quant-bench-") as tmp:
        work = Path(tmp)
        trained = {}
        for name in filter(None, "" if args.cases_only else args.students.split(",")):
            t0 = time.perf_counter()
            trained[name] = train_student(name, fm, x_train, y_train, teacher_train, args.steps, 0)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            results["students"].append(compare(name, trained[name], fm, calibration, probe, selection, teacher_top1,
                                               qat_inputs, conf, work))
            print(json.dumps({k: results["students"][-1][k] for k in ("fp32", "ort_defaults", "ours")}), flush=True)
        if args.default_run:
            saved = torch.load(args.default_run / "distill" / "student.pt", map_location="cpu", weights_only=True)
            spec, full = saved["spec"], create(saved["spec"]["student"], 1, fm.num_classes)
            trained["default"] = Normalized(full, spec["mean"], spec["std"])
            trained["default"].load_state_dict(saved["state_dict"])
            trained["default"].eval()
            history = json.loads((args.default_run / "distill" / "history.json").read_text())
            results["default_run"] = {"student": spec["student"], "epochs": len(history["epochs"]),
                                      "method": history["method"]}
            if not args.cases_only:
                results["students"].append(compare(f"{spec['student']} ({len(history['epochs'])}-epoch distill, "
                                                   "edgecompress defaults)", trained["default"], fm, calibration,
                                                   probe, selection, teacher_top1, qat_inputs, conf, work))
        base = trained.get("default") or trained.get(DEFAULT_STUDENT) or next(iter(trained.values()))
        if isinstance(base.net, type(create(DEFAULT_STUDENT, 1, fm.num_classes))):
            label = "default student" if "default" in trained else DEFAULT_STUDENT
            hard = compare(f"{label} + 100x outlier channel (stage 0)", planted(base, (0,)), fm,
                           calibration, probe, selection, teacher_top1, qat_inputs, conf, work)
            qat_conf = cfg.QuantizeConfig(**{**conf.__dict__, "max_float_nodes": 1})
            qat_case = compare(f"{label} + 100x outliers (stages 0-2), max 1 float node", planted(base, (0, 1, 2)),
                               fm, calibration, probe, selection, teacher_top1, qat_inputs, qat_conf, work)
            results["cases"] += [hard, qat_case]
        if not args.cases_only:
            results["activation_latency"] = activation_latency(base, fm, calibration, work)
        if args.seeds and "default" in trained and not args.cases_only:
            results["calibration_seeds"] = calibration_seeds(trained["default"], fm, [int(s) for s in
                                                             args.seeds.split(",")], teacher, work)
    command = "benchmarks/quantization.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.cases_only:
        cases = {"cases": results["cases"], "cases_run": {
            "command": command, "seconds": round(time.perf_counter() - began, 1), "host": cfg.host(),
            "versions": cfg.versions(), "setting": f"QAT on {len(train_idx)} training images (teacher logits on "
            f"them), {len(fm.y_eval)} test images", "default_run": results.get("default_run")}}
        results = json.loads((RESULTS / "quantization.json").read_text()) | cases
    else:
        results["seconds"] = round(time.perf_counter() - began, 1)
        results["host"], results["versions"] = cfg.host(), cfg.versions()
        results["python"] = platform.python_version()
        results["command"] = command
    RESULTS.mkdir(exist_ok=True)
    files.write_json(RESULTS / "quantization.json", results)
    text = markdown(results)
    files.write_text(RESULTS / "quantization.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
