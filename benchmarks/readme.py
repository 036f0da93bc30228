"""The README's measured blocks, generated from the committed results under benchmarks/results/:

    python benchmarks/readme.py            # rewrite every block of README.md from the JSON
    python benchmarks/readme.py --check    # exit 1 naming each block that differs (tests/test_readme.py runs it)

A block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md; NAME is a key of BLOCKS,
whose function turns the JSON into Markdown. Every figure inside a block comes from a JSON a benchmark wrote, so
a README figure cannot drift from its result: rerun the benchmark, then this script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def load(results: Path, stem: str) -> dict:
    return json.loads((results / f"{stem}.json").read_text())


def para(text: str, indent: str = "") -> str:
    """A paragraph (or a list item, with `indent` for its continuation lines) wrapped as the README is."""
    return textwrap.fill(text, width=115, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def zoo_table(r: dict) -> list[str]:
    """students224.json's zoo rows as a Markdown table (the README's block and students224.md alike)."""
    cores = r["provenance"]["host"]["cores"]
    lines = ["| student | params | MMACs | bs1 t1 fp32 / int8 | bs16 t1 fp32 / int8 | "
             f"bs1 t{cores} fp32 / int8 | bs16 t{cores} fp32 / int8 | int8 layers | float between int8 kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["zoo"]:
        t = row["p50_ms"]
        cells = [f"{t[f'fp32_bs{b}_t{n}']:.2f} / {t[f'int8_bs{b}_t{n}']:.2f}" for n in (1, cores) for b in (1, 16)]
        ops = ", ".join(f"{op} x{n}" for op, n in row["dequantized_ops"].items()) or "-"
        lines.append(f"| {row['name']} | {row['params']:,} | {row['mmacs']} | {' | '.join(cells)} | "
                     f"{row['int8_layers']}/{row['int8_layers'] + row['float_layers']} | {ops} |")
    return lines


def students224_zoo(results: Path) -> str:
    """The 224-px zoo's latency table and what it shows, from students224.json's zoo rows."""
    r = load(results, "students224")
    lines = zoo_table(r)
    zoo = {row["name"]: row["p50_ms"] for row in r["zoo"]}
    fully_int8 = all(row["float_layers"] == 0 for row in r["zoo"])
    slower = [name for name, t in zoo.items() if t["int8_bs1_t1"] > t["fp32_bs1_t1"]]
    fastest = min(zoo, key=lambda name: zoo[name]["int8_bs1_t1"])
    gain = max(zoo, key=lambda name: zoo[name]["fp32_bs1_t1"] / zoo[name]["int8_bs1_t1"])
    small, lite, b0 = (zoo[n] for n in ("torchvision:mobilenet_v3_small", "timm:efficientnet_lite0",
                                        "torchvision:efficientnet_b0"))
    lines += ["", para(
        f"{'Every' if fully_int8 else 'Not every'} convolution and Gemm runs an int8 kernel in all {len(zoo)} "
        f"students. Slower in int8 than in fp32 at batch 1 on one thread: {', '.join(slower) or 'none'} "
        f"(mobilenet_v3_small: {small['int8_bs1_t1']:.2f} vs {small['fp32_bs1_t1']:.2f} ms): its squeeze-excite "
        "gates (`HardSigmoid`) have no int8 kernel, and each costs a dequantize-requantize round trip on a network "
        f"this small. The fastest in int8 is {fastest} ({zoo[fastest]['int8_bs1_t1']:.2f} ms); the largest int8 "
        f"gain is {gain}'s ({zoo[gain]['int8_bs1_t1']:.2f} ms, "
        f"{zoo[gain]['fp32_bs1_t1'] / zoo[gain]['int8_bs1_t1']:.1f}x its fp32). timm's efficientnet_lite0 (ReLU6, "
        f"no squeeze-excite) is the int8-friendly choice at EfficientNet-B0's size ({lite['int8_bs1_t1']:.2f} vs "
        f"b0's {b0['int8_bs1_t1']:.2f} ms).")]
    return "\n".join(lines)


def students224_distill(results: Path) -> str:
    """The 112-px distillation's table, its budget outcome and the quantize stage's tries."""
    d = load(results, "students224")["distill"]
    t, ms = d["top1"], d["p50_ms"]
    trained = f"trained in {d['teacher_train_s']:.0f} s" if d["teacher_train_s"] else "trained by an earlier run"
    lines = [para(f"A `{d['teacher']}` teacher trained from scratch by `models/train_teacher.py` for "
                  f"{d['teacher_epochs']} epochs ({trained}) on {d['train_images']:,} training photos, distilled "
                  f"into `{d['student']}` for {d['epochs']} epochs (Hinton KD, {d['student_precision']}) at "
                  f"{d['size']} px for x86-cpu; `compress` took {d['compress_s']:.0f} s and exited "
                  f"{d['compress_exit']}."), "",
             f"| model | top-1 ({d['eval_images']:,} test photos) | bs1 p50, {d['threads']} thread |", "|---|---|---|",
             f"| teacher, eager PyTorch fp32 | {100 * t['teacher']:.2f}% | {ms['teacher_eager']:.2f} ms |",
             f"| teacher, ONNX Runtime fp32 | (same model) | {ms['teacher_ort_fp32']:.2f} ms |",
             f"| student, eager PyTorch fp32 | {100 * t['student_fp32']:.2f}% | {ms['student_eager']:.2f} ms |",
             f"| student int8 artifact, ONNX Runtime | {100 * t['artifact_int8']:.2f}% | "
             f"{ms['artifact_int8']:.3f} ms |", "",
             para(f"The int8 artifact is {d['speedup_vs_teacher_ort_fp32']}x faster than the teacher in ONNX Runtime "
                  f"fp32 and {d['speedup_vs_teacher_eager']}x faster than the teacher in eager PyTorch (interleaved "
                  f"in one process), {abs(d['drop_pt']):.2f} points {'below' if d['drop_pt'] > 0 else 'above'} it: "
                  f"x86-cpu's 2-point accuracy budget is {'missed' if d['drop_pt'] > 2 else 'met'}.")]
    tries = d.get("quantize_tries")
    if tries:
        lines += ["", "The quantize stage's tries (chosen on selection images from the training photos):", ""]
        lines += [para(f"- try {q['try']}, {q['kind']} ({q['calibration']}, {q['float_nodes']} nodes in float): "
                       f"{100 * q['selection_top1']:.2f}% selection top-1{' (shipped)' if q['chosen'] else ''}", "  ")
                  for q in tries]
    return "\n".join(lines)


def gpu_h200(results: Path) -> str:
    """What the GPU path measured on the lent H200, from gpu-h200-224.json and gpu-h200-64.json."""
    big, small = load(results, "gpu-h200-224"), load(results, "gpu-h200-64")
    v = big["provenance"]["versions"]
    ddp = " / ".join(f"{x:,.0f}" for x in big["ddp"]["distill_images_per_s"])
    return "\n".join([
        para(f"Measured on {big['device']} ({big['provenance']['host']['cores']} cores, torch {v['torch']}, ONNX "
             f"Runtime {v['onnxruntime']} without CUDA), in `benchmarks/results/gpu-h200-*.{{json,md}}`:"), "",
        para(f"- at {big['size']} px: {big['photos']['images']:,} photos written at "
             f"{big['photos']['images_per_s']:,.0f} images/s; the resnet18 teacher trained for "
             f"{big['teacher']['epochs']} epochs in {big['teacher']['seconds']} s "
             f"({100 * big['teacher']['eval_top1']:.2f}% top-1); the one-GPU torchrun DDP distillation ran at {ddp} "
             f"images/s per epoch (the first includes CUDA's start-up); `compress` exited {big['compress']['exit']} "
             "(the failure described below);", "  "),
        para(f"- at {small['size']} px, {small['photos']['images']:,} photos, every step: `compress` in "
             f"{small['compress']['seconds']} s (exit {small['compress']['exit']}: "
             f"{'; '.join(small['compress']['budgets']['failed']) or 'budgets met'}), the DDP distillation in "
             f"{small['ddp']['seconds']} s;", "  "),
        para(f"- ONNX Runtime's CUDA provider: {small['ort_cuda'].get('absent', 'measured')}.", "  ")])


def host_words(provenance: dict) -> str:
    host = provenance["host"]
    flags = [f.upper().replace("_", "-") for f in host.get("cpu_flags", []) if f.startswith(("avx512_", "amx_"))]
    return f"{host['cores']}-core {host['cpu']}" + (f" ({', '.join(flags)})" if flags else "")


def default_run(results: Path) -> str:
    """The README's first measurement: the default `compress`, from perf.json's e2e section."""
    r = load(results, "perf")
    e = r["e2e"]
    stages, top1 = e["stage_s"], e["top1"]
    return para(
        f"Measured by `python benchmarks/perf.py` on the {host_words(r)} CI machine, first run of the defaults "
        f"({e['student']}, {e['epochs']} epochs of {e['method']}): {e['wall_s']:.0f} s (distill "
        f"{stages['distill']:.0f} s, quantize "
        f"{stages['quantize']:.0f} s, verify {stages['verify']:.0f} s); teacher {100 * top1['teacher']:.2f}% top-1, "
        f"fp32 student {100 * top1['student_fp32']:.2f}%, int8 artifact {100 * top1['artifact']:.2f}% on the "
        f"{e['eval_images']:,} test images; the artifact is {e['speedup_vs_teacher']}x faster than the teacher in "
        f"PyTorch at batch 1 on one thread ({e['bs1_p50_ms']['artifact']:.3f} vs {e['bs1_p50_ms']['teacher']:.2f} "
        f"ms, the run's own report; the benchmark's inference section, timed separately, measured "
        f"{r['ratios']['artifact vs teacher torch eager, bs1 1 thread (x faster)']}x) and {e['size_ratio']:.0f}x "
        "smaller.")


def perf(results: Path) -> str:
    """The performance benchmark's headline ratios, from perf.json."""
    r = load(results, "perf")
    rates = {(row["mode"], row["precision"]): row["images_per_s"] for row in r["distill"]}
    share = {f"{mode} {precision}": 100 * rates[(mode, precision)] / rates[("student alone", precision)]
             for mode in ("cached KD", "naive KD") for precision in ("fp32", "bf16")}
    ratio = r["ratios"]
    return para(
        f"Measured on the {host_words(r)} CI machine with nothing else running (benchmarks/results/perf.md; the "
        f"default run): the first `compress` takes {r['e2e']['wall_s']:.0f} s; an optimiser step on cached teacher "
        f"logits runs at {share['cached KD fp32']:.0f}% (fp32) and {share['cached KD bf16']:.0f}% (bf16) of the "
        f"student-alone speed, naive KD at {share['naive KD fp32']:.0f}% / {share['naive KD bf16']:.0f}%. The int8 "
        f"artifact is {ratio['artifact vs teacher torch eager, bs1 1 thread (x faster)']}x faster than the teacher "
        "in PyTorch eager (bs1, 1 thread) and runs at "
        f"{ratio['artifact bs64 1 thread, % of the u8s8 MatMulInteger peak']}% of the uint8 x int8 MatMulInteger "
        f"peak at bs64 on 1 thread; against the same student in fp32 it is "
        f"{ratio['artifact int8 vs student fp32 in ORT, bs1 1 thread (x faster)']}x faster at bs1 and "
        f"{ratio['artifact int8 vs student fp32 in ORT, bs64 1 thread (x faster)']}x at bs64 (one session each), "
        f"{ratio['the same, interleaved sessions, bs1 / bs64 (x faster)']}x in alternating fresh sessions; the "
        "ceiling the uint8 x int8 peak allows over this fp32 student at bs64 is "
        f"{ratio['ceiling of int8 vs student fp32, bs64 1 thread (u8s8 peak / fp32 student GOP/s)']}x.")


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def which_default(student: str) -> str:
    """How a result names the student of the default run it was made on: today's default, or an earlier one."""
    from edgecompress.config import DistillConfig

    return "default student" if student == DistillConfig().student else "the default student then"


def quantization(results: Path) -> str:
    """ORT's quantize_static defaults against the quantize stage: the table and the calibration-seed sweep."""
    r = load(results, "quantization")
    student_then = which_default(r["default_run"]["student"])
    default = next(s for s in r["students"] if "edgecompress defaults" in s["student"])
    seeds, (outlier, outliers3) = r["calibration_seeds"], r["cases"]
    f, o, u = default["fp32"], default["ort_defaults"], default["ours"]

    def mean(key: str, field: str = "top1") -> float:
        return sum(row[key][field] for row in seeds) / len(seeds)

    def drops(key: str) -> list[float]:
        return [row[key]["drop_vs_fp32_pt"] for row in seeds]

    def best_ptq(case: dict) -> dict:
        return min((t for t in case["tries"] if t["kind"] == "ptq"), key=lambda t: t["drop_vs_fp32_pt"])

    def float_nodes(case: dict) -> str:
        return "+".join(n.rsplit("/", 2)[-2] for n in case["ours"]["float_nodes"] if n.endswith("Conv")) or "none"

    first = outlier["tries"][0]
    qat = [t for t in outliers3["tries"] if t["kind"] == "qat"]
    fallback3 = [t for t in outliers3["tries"] if t["kind"] == "fallback"]
    recovered = (1 - qat[-1]["drop_vs_fp32_pt"] / best_ptq(outliers3)["drop_vs_fp32_pt"]) if qat else None
    cases = r.get("cases_run")
    then = f"; then `{cases['command']}` ({cases['seconds']:.0f} s), so QAT gets 10,000 images" if cases else ""
    lines = [para(f"`{r['command']}` ({r['seconds']:.0f} s){then}; the default run (`--default-run`) is a first "
                  "`edgecompress compress` with every default."), "",
             "| model | fp32 | ORT `quantize_static` defaults | ours (x86 scheme, bias correction, `auto`, fallback, "
             "QAT) |", "|---|---|---|---|",
             f"| {student_then} ({r['default_run']['student']}, "
             f"{r['default_run']['epochs']}-epoch distill) | "
             f"{pct(f['top1'])} | {pct(o['top1'])} ({-o['drop_vs_fp32_pt']:+.2f} pt), {o['latency_bs1_ms']:.3f} ms | "
             f"{pct(u['top1'])} ({-u['drop_vs_fp32_pt']:+.2f} pt), {u['latency_bs1_ms']:.3f} ms |",
             f"| same, mean over {len(seeds)} calibration seeds (stage defaults) | {pct(mean('fp32'))} | "
             f"{pct(mean('ort_defaults'), 3)} | {pct(mean('ours'), 3)}; without bias correction "
             f"{pct(mean('ours_without_bias_correction'), 3)} |",
             f"| same + one channel scaled 100x after a BatchNorm, compensated in the next conv | "
             f"{pct(outlier['fp32']['top1'])} | {pct(outlier['ort_defaults']['top1'])} "
             f"({-outlier['ort_defaults']['drop_vs_fp32_pt']:+.2f} pt) | {pct(outlier['ours']['top1'])} "
             f"({-outlier['ours']['drop_vs_fp32_pt']:+.2f} pt, {outlier['ours']['chosen']} "
             f"{outlier['ours']['calibration']}): first PTQ "
             f"{-first['drop_vs_fp32_pt']:+.2f} pt on the selection images ({first['calibration']}), float: "
             f"{float_nodes(outlier)} |",
             f"| same, outliers in all three stages, at most 1 float node | {pct(outliers3['fp32']['top1'])} | "
             f"{pct(outliers3['ort_defaults']['top1'])} | {pct(outliers3['ours']['top1'])} "
             f"({-outliers3['ours']['drop_vs_fp32_pt']:+.2f} pt, {outliers3['ours']['chosen']} "
             f"{outliers3['ours']['calibration']}): best PTQ "
             f"{-best_ptq(outliers3)['drop_vs_fp32_pt']:+.2f} pt ({best_ptq(outliers3)['calibration']})"
             + (f", fallback {-fallback3[-1]['drop_vs_fp32_pt']:+.2f} pt" if fallback3 else "")
             + (f"; QAT recovers {100 * recovered:.0f}% of the best PTQ drop" if recovered is not None else "")
             + " (tries' figures on the selection images) |"]
    ours, ort = drops("ours"), drops("ort_defaults")
    wins = sum(row["only_ours_right"] >= row["only_ort_defaults_right"] for row in seeds)
    db = [row["ours"]["probe_sqnr_db"] - row["ort_defaults"]["probe_sqnr_db"] for row in seeds]
    zoo = [s for s in r["students"] if s is not default]
    act = r["activation_latency"]
    lines += ["", para(
        f"Top-1 on the {r['eval_images']:,} test images, which choose nothing: our tries are judged on "
        f"{r['selection_images']:,} selection images from the training split. Over "
        f"{len(seeds)} calibration seeds (each drawing its own calibration, selection and probe images as the stage "
        f"does) ours loses {min(ours):.2f} to {max(ours):.2f} pt (mean {sum(ours) / len(ours):.3f}) and ORT's "
        f"defaults {min(ort):.2f} to {max(ort):.2f} pt (mean {sum(ort) / len(ort):.3f}); ours is at least as "
        f"accurate on {wins} of the {len(seeds)} seeds, and {sum(row['only_ours_right'] for row in seeds)} to "
        f"{sum(row['only_ort_defaults_right'] for row in seeds)} images only one of the two gets right in all; on "
        f"the probe images ours is {min(db):.2f}-{max(db):.2f} dB closer to fp32 (mean logit SQNR "
        f"{mean('ours', 'probe_sqnr_db'):.2f} against {mean('ort_defaults', 'probe_sqnr_db'):.2f} dB; "
        f"{mean('ours_without_bias_correction', 'probe_sqnr_db'):.2f} dB without bias correction). The "
        f"{len(zoo)} zoo students, briefly trained, lose at most "
        f"{max(s['ours']['drop_vs_fp32_pt'] for s in zoo):.2f} point with ours and at most "
        f"{max(s['ort_defaults']['drop_vs_fp32_pt'] for s in zoo):.2f} with ORT's defaults. ORT's defaults use "
        f"int8 activations, which run {act['int8']['bs1'] / act['uint8']['bs1']:.2f}x (bs1) and "
        f"{act['int8']['bs64'] / act['uint8']['bs64']:.2f}x (bs64) slower than uint8 here ({student_then}: "
        f"{act['uint8']['bs1']:.3f} vs {act['int8']['bs1']:.3f} ms at batch 1, {act['uint8']['bs64']:.1f} vs "
        f"{act['int8']['bs64']:.1f} ms at batch 64), so the x86 scheme keeps uint8.")]
    over = [c for c in (default, outlier, outliers3) if c["ours"]["drop_vs_fp32_pt"] > 0.3]
    if over:
        lines += ["", para(
            "Over the 0.3-pt budget on the test images although the selection images said it was met: "
            + "; ".join(f"{c['student'].replace('default student', student_then)} "
                        f"({c['ours']['drop_vs_fp32_pt']:.2f} pt)" for c in over)
            + ". The selection images are training images, which the student fits better than new ones, so a drop "
            "there understates the drop on new images; judged on the test images (before the selection split) the "
            "one-outlier case shipped a fallback 0.01 pt below fp32 (git history of "
            "benchmarks/results/quantization.json), a figure tuned on the images it reports.")]
    return "\n".join(lines)


def photos(results: Path) -> str:
    """Real photos at 224 px: indexing, decoding, streaming, a whole compress's memory, FKD replay."""
    r = load(results, "photos")
    rate = {row["workers"]: row["images_per_s"] for row in r["loader"]["rows"]}
    d, c, a = r["distill"], r["compress"], r["augment"]

    def top1s(rows: list[dict]) -> str:
        return " / ".join(f"{100 * row['top1']:.2f}" for row in rows) + "%"

    def epoch_s(rows: list[dict]) -> float:
        times = [t for row in rows for t in row["epoch_seconds"]]
        return sum(times) / len(times)

    def mean_top1(rows: list[dict]) -> float:
        return sum(row["top1"] for row in rows) / len(rows)

    same = all(v == 0 for v in a["top1_replay_minus_online"]["per_seed"])
    plain, crop = mean_top1(a["no_augment"]), mean_top1(a["online"])
    verdict = (": on a schedule this short augmentation costs accuracy, so the default stays `augment = \"none\"`; "
               "turn it on for long runs on few images, where KD overfits without it." if plain > crop else ".")
    return "\n".join([
        para(f"- indexing the {r['index']['first']['files']:,} files: {r['index']['first']['seconds']} s (no pixel "
             f"read); decoding into the packed file: {rate[0]:,.0f} images/s in the main process, {rate[1]:,.0f} with "
             f"one worker, {rate[2]:,.0f} with two (the default: one per core);", "  "),
        para(f"- a distillation step at 224 px reading its batches from the packed file: {d['streamed_median']:,.0f} "
             f"images/s, against {d['in_memory_median']:,.0f} from the same images as an in-memory tensor "
             f"({len(d['images_per_s']['streamed'])} alternating rounds): streaming costs "
             f"{d['streaming_cost_pct']:+.1f}%;", "  "),
        para(f"- a first `compress` on the whole 224 folder (`--epochs 1`, factory teacher and student for 224-px RGB "
             f"input, see the script): **peak resident memory of the whole process tree {c['peak_tree_rss_mib']:,} "
             f"MiB** ({c['peak_at_s']:.0f} s in), {c['seconds']:.0f} s (distill {c['stage_seconds']['distill']:.0f} s "
             "of it);", "  "),
        para(f"- crop-flip KD on {a['train_images']:,} of the images at 224 px, {a['epochs']} epochs, "
             f"{len(a['seeds'])} seeds, {a['teacher']}: epochs replayed from the FKD cache take "
             f"{epoch_s(a['fkd_replay']):.0f} s against {epoch_s(a['online']):.0f} s with the teacher online, "
             f"**{a['epoch_speedup_replay_vs_online']}x faster, with "
             f"{'exactly the same student' if same else 'a different student'}** (top-1 {top1s(a['fkd_replay'])} "
             f"replayed, {top1s(a['online'])} online);", "  "),
        para(f"- the same {a['epochs']} epochs without augmentation (cached logits): {top1s(a['no_augment'])} in "
             f"{epoch_s(a['no_augment']):.0f}-s epochs, {'above' if plain > crop else 'below'} crop-flip's "
             f"{top1s(a['online'])}{verdict}", "  ")])


def peers(results: Path) -> str:
    """The artifact against the alternatives a user would pick, from peers.json (benchmarks/peers.py)."""
    r = load(results, "peers")
    rows = {row["model"]: row for row in r["rows"]}
    ours = rows["edgecompress artifact, ONNX Runtime int8"]
    v = r["peer_versions"]
    lines = [para(f"Measured by `benchmarks/peers.py` on the default run ({r['eval_images']:,} test images, "
                  f"{r['threads']} thread, {r['rounds']} interleaved rounds of fresh sessions; OpenVINO "
                  f"{v['openvino']}, NNCF {v['nncf']}, ONNX Runtime {v['onnxruntime']}) on {host_words(r)}:"), "",
             "| model | top-1 | bs1 p50 | bs64 p50 | bs1 vs the artifact | bs64 vs the artifact |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {pct(row['top1'])} | {row['p50_ms']['bs1']:.3f} ms | "
                     f"{row['p50_ms']['bs64']:.2f} ms | {row['p50_ms']['bs1'] / ours['p50_ms']['bs1']:.2f}x | "
                     f"{row['p50_ms']['bs64'] / ours['p50_ms']['bs64']:.2f}x |")
    return "\n".join(lines) + "\n"


def conv_kernels(results: Path) -> str:
    """What ONNX Runtime's int8 convolutions gain over fp32, shape by shape, from conv_kernels.json."""
    r = load(results, "conv_kernels")
    rows = r["rows"]
    shapes = {(row["channels"], row["size"]) for row in rows}
    lines = [para(f"- The ceiling comes from the kernels, not the design. `benchmarks/conv_kernels.py` times each ONNX "
                  "Runtime convolution alone (results/conv_kernels.md; 3x3 conv, C channels in and out, SxS map, 1 "
                  f"thread, {len(shapes)} shapes) on {host_words(r)}:", "  ")]
    for batch in (1, 64):
        at = [row for row in rows if row["batch"] == batch]
        over = [f"{row['channels']}@{row['size']}" for row in at if row["ratio"] >= 3]
        lines.append(para(f"  - At bs{batch}, int8 is 3x or more faster for {len(over)} of {len(at)} shapes "
                          f"({', '.join(over) or 'none'}).", "    "))
    ours = {batch: [row for row in rows if row["batch"] == batch and row["in_default_student"]] for batch in (1, 64)}
    together = {b: sum(row["fp32_us"] for row in ours[b]) / sum(row["int8_us"] for row in ours[b]) for b in ours}
    fp32 = [row["fp32_gops"] for row in rows]
    int8_64 = [row["int8_gops"] for row in rows if row["batch"] == 64]
    layers = ", ".join(f"{row['channels']}@{row['size']}" for row in ours[1])
    lines.append(para(f"  - The square 3x3 layers of the default student ({r['student']}: {layers}) together reach "
                      f"{together[1]:.2f}x at bs1 and {together[64]:.2f}x at bs64, before any of its other "
                      "operators.", "    "))
    lines.append(para(f"  - fp32 convolutions run at {min(fp32):.0f}-{max(fp32):.0f} GOP/s; int8 at bs64 at "
                      f"{min(int8_64):.0f}-{max(int8_64):.0f} GOP/s.", "    "))
    return "\n".join(lines)


def compress_table(rows: list[dict], indent: str = "") -> list[str]:
    """student_designs.json's `compress` rows as a Markdown table (the README's block and student_designs.md)."""
    lines = [f"{indent}| student | fp32 top-1 | int8 top-1 | below the teacher | speed-up vs teacher (bs1) | "
             f"size ratio | compress |", f"{indent}|---|---|---|---|---|---|---|"]
    for row in rows:
        top = row["top1"]
        lines.append(f"{indent}| {row['student']} ({row['epochs']} epochs of {row['method']}) | "
                     f"{pct(top['student_fp32'])} | "
                     f"{pct(top['artifact'])} | {(top['teacher'] - top['artifact']) * 100:.2f} pt of "
                     f"{pct(top['teacher'])} | {row['speedup_vs_teacher']:.1f}x | {row['size_ratio']:.1f}x | "
                     f"{row['wall_s']:.0f} s |")
    return lines


def student_designs(results: Path) -> str:
    """The student design screen and the default students through compress, from student_designs.json."""
    r = load(results, "student_designs")
    rows = r["rows"]
    lines = [para(f"- Student designs, untrained (`benchmarks/student_designs.py`: {r['rounds']} alternating fresh "
                  "sessions per batch size, 1 thread, the x86-cpu scheme; results/student_designs.md):", "  "), "",
             "  | design | params | MMAC | fp32 / int8 bs1 ms | int8 vs fp32 bs1 | fp32 / int8 bs64 ms | "
             "int8 vs fp32 bs64 | train step ms |", "  |---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"  | {row['design']} | {row['params']:,} | {row['mmac']} | {row['bs1']['fp32_ms']:.3f} / "
                     f"{row['bs1']['int8_ms']:.3f} | {row['bs1']['ratio']:.2f}x | {row['bs64']['fp32_ms']:.1f} / "
                     f"{row['bs64']['int8_ms']:.1f} | {row['bs64']['ratio']:.2f}x | {row['train_step_ms']} |")
    best_ratio = max(rows, key=lambda row: row["bs1"]["ratio"])
    fastest = min(rows, key=lambda row: row["bs1"]["int8_ms"])
    lines += ["", para(f"  The largest int8 gain at bs1 is {best_ratio['design']}'s ({best_ratio['bs1']['ratio']:.2f}x), "
                       f"but its artifact takes {best_ratio['bs1']['int8_ms']:.3f} ms; the fastest int8 artifact at "
                       f"bs1 is {fastest['design']}'s ({fastest['bs1']['int8_ms']:.3f} ms, "
                       f"{fastest['bs1']['ratio']:.2f}x its fp32).", "  ")]
    if r.get("compress"):
        lines += ["", para("- The students named by `--compress` through a first `edgecompress compress` (every other "
                           "setting the default when they ran, the method named beside the student; one after "
                           "another, nothing else running; 10,000 test images):", "  "),
                  "", *compress_table(r["compress"], "  ")]
    return "\n".join(lines)


def shown(value) -> str:
    """An option's value as the tables write it: floats without trailing zeros."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def commits(runs: list[dict]) -> str:
    names = sorted({r["commit"] for r in runs})
    return f"commit{'s' if len(names) > 1 else ''} {', '.join(names)}"


def kd_methods(results: Path) -> str:
    """The distillation methods measured (kd_methods-<setting>.json) and how their defaults were tuned
    (kd_tuning-*.json), every setting found under results/."""
    lines = []
    tunings = sorted(results.glob("kd_tuning-*.json"))
    if tunings:
        from edgecompress.config import DistillConfig
        from edgecompress.distill import methods

        lines += [para("Tuned on the validation split only (5,000 training images held out; the test images are not "
                       "read): mean validation top-1 over the seeds, the best in bold, and the method's default now "
                       "(`hinton`'s temperature and alpha are `distill.temperature` and `distill.alpha`):", ""), "",
                  "| method | setting | options tried: validation top-1 | default now |", "|---|---|---|---|"]
        for path in tunings:
            t = json.loads(path.read_text())
            cells = []
            for row in t["grid"]:
                given = " ".join(f"{k}={v}" for k, v in row["options"].items()) or "(no options)"
                text = f"{given}: {pct(row['validation_top1'])}"
                if row["seeds"] < len(t["setting"]["seeds"]):
                    text += f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
                cells.append(f"**{text}**" if row["options"] == t["chosen"] else text)
            tuned = {key for row in t["grid"] for key in row["options"]}
            now = methods.method_options(DistillConfig(method=t["method"]))
            default = " ".join(f"{k}={shown(v)}" for k, v in now.items() if k in tuned)
            lr = t["setting"]["lr"]
            lines.append(f"| {t['method']} | {t['setting']['setting']}, seeds "
                         f"{', '.join(map(str, t['setting']['seeds']))}"
                         f"{f', lr {lr:g}' if lr != DistillConfig().lr else ''} | {'; '.join(cells)} | {default} |")
        lines.append("")
    for path in sorted(results.glob("kd_methods-*.json")):
        m = json.loads(path.read_text())
        s = m["setting"]
        lines += [para(f"`{s['setting']}` setting: teacher `{s['teacher']}` ({pct(s['teacher_test_top1'])} test "
                       f"top-1), "
                       f"student `{s['student']}`, every method {s['epochs']} epochs on the same "
                       f"{s['train_images']:,} training images, batch {s['batch']}, OneCycle SGD peak lr {s['lr']}, "
                       f"{clipping(s)}, {s['precision']}, seeds {', '.join(map(str, s['seeds']))} (each row's count in its own "
                       f"column); each method with its defaults. "
                       f"Test top-1 on {s['test_images']:,} images; gains paired by seed, mean [95% t-interval] in "
                       f"points (runs at {commits(m['runs'])}; "
                       f"{sum(r.get('run_seconds', 0) for r in m['runs']) / 60:.0f} min of training):", ""), "",
                  *methods_table(m["methods"])]
        lines += ["", *[para(f"- {note}", "  ") for note in m["notes"]], ""]
    if not lines:
        lines = ["Not measured yet on today's methods."]
    return "\n".join(lines).rstrip() + "\n"


def clipping(setting: dict) -> str:
    """How a methods table's runs clipped the gradient (settings recorded before the option ran without)."""
    norm = setting.get("max_grad_norm", 0.0)
    return f"gradient norm clipped at {norm:g}" if norm else "no gradient clipping"


def methods_table(rows: list[dict], agreement: bool = False) -> list[str]:
    """kd_methods' summary rows as a Markdown table (the README's block; kd_methods-<setting>.md adds the
    teacher agreement and why a method failed)."""
    extra = " agreement % |" if agreement else ""
    lines = [f"| method | family | seeds | test top-1 % (mean ± std) | vs baseline (pt) | vs hinton (pt) |{extra}",
             "|---|---|---|---|---|---|" + ("---|" if agreement else "")]
    for row in rows:
        if "test_top1" not in row:
            why = f": {'; '.join(row['failed'])[:100]}" if agreement else ""
            lines.append(f"| {row['method']} | {row['family']} | | failed{why} | | |" + (" |" if agreement else ""))
            continue
        base = "baseline" if row["method"] == "none" else interval(row.get("gain_vs_baseline"))
        if row.get("baseline", "none") != "none":
            base += f" (vs {row['baseline']})"
        top1 = row["test_top1"]
        lines.append(f"| {row['method']} | {row['family']} | {len(row['seeds'])} | {top1['mean'] * 100:.2f} ± "
                     f"{top1['std'] * 100:.2f} | {base} | {interval(row.get('gain_vs_hinton'))} |"
                     + (f" {row['test_agreement']['mean'] * 100:.2f} |" if agreement else ""))
    return lines


def interval(gain: dict | None) -> str:
    if not gain:
        return "-"
    ci = gain["ci95_pt"]
    return f"{gain['mean_pt']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{gain['mean_pt']:+.2f}"


def kernel_profile(results: Path) -> str:
    """Why the artifact is or is not 1.2x faster than NNCF-in-OpenVINO, kernel by kernel (kernel_profile.json)."""
    r = load(results, "kernel_profile")
    ours, nncf = "artifact, ONNX Runtime int8", "NNCF int8, OpenVINO"
    peak = r["onnxruntime_u8s8_gemm_peak_gops"]
    lines = [para(f"Kernel by kernel (`benchmarks/kernel_profile.py` on the same run, {r['threads']} thread, "
                  "results/kernel_profile.md: ONNX Runtime's session profiler and OpenVINO's per-layer counters on "
                  f"the same int8 student; ONNX Runtime's own u8 x s8 GEMM peak in the same run: {peak:.0f} GOP/s):")]
    for key in ("bs1", "bs64"):
        p, batch = r["profiles"][key], int(key[2:])
        convs = [row for row in r["layers"][key] if row["layer"].endswith("Conv")]
        conv_ops = sum(2 * row["mmac_per_image"] * 1e6 * batch for row in convs)
        conv_ms = {name: sum(row[name]["ms"] for row in convs) for name in (ours, nncf)}
        rates = {name: conv_ops / conv_ms[name] / 1e6 for name in (ours, nncf)}
        target = p[nncf]["wall_ms"] / 1.2
        other = p[ours]["wall_ms"] - conv_ms[ours]
        needed = conv_ops / (target - other) / 1e6 if target > other else float("inf")
        text = (f"- {key}: the artifact takes {p[ours]['wall_ms']:.3f} ms a call in ONNX Runtime, NNCF's IR "
                f"{p[nncf]['wall_ms']:.3f} ms in OpenVINO: the artifact is {p[nncf]['wall_ms'] / p[ours]['wall_ms']:.2f}x "
                f"as fast. Convolutions take {100 * conv_ms[ours] / p[ours]['kernel_sum_ms']:.0f}% of ONNX Runtime's "
                f"kernel time and {100 * conv_ms[nncf] / p[nncf]['kernel_sum_ms']:.0f}% of OpenVINO's, at "
                f"{rates[ours]:.0f} GOP/s (QLinearConv) against {rates[nncf]:.0f} GOP/s (oneDNN brgconv). ")
        if key == "bs1":
            text += (f"OpenVINO's kernels add up to {p[nncf]['kernel_sum_ms']:.3f} ms of its {p[nncf]['wall_ms']:.3f} ms: "
                     f"{p[nncf]['wall_ms'] - p[nncf]['kernel_sum_ms']:.3f} ms a call is its own work around them, "
                     "which is what the artifact wins on at batch 1 (ONNX Runtime's profiler adds its own timing to "
                     "every node, so its per-node times at batch 1 overstate the kernels).")
        else:
            gaps = sorted(convs, key=lambda row: row[nncf]["ms"] - row[ours]["ms"])[:2]
            text += ("The widest gaps: " + ", ".join(
                f"{row['layer'].removeprefix('/net/').removesuffix('/Conv')} {row[ours]['ms']:.2f} vs "
                f"{row[nncf]['ms']:.2f} ms" for row in gaps) + ". "
                     f"To be 1.2x faster than NNCF at {key} ({target:.2f} ms), the artifact's convolutions would have to "
                     f"run at {needed:.0f} GOP/s, {100 * needed / peak:.0f}% of ONNX Runtime's own u8 x s8 GEMM peak "
                     f"(a 1024^3 MatMulInteger, its best case); they already run at {100 * rates[ours] / peak:.0f}% "
                     "of it.")
        lines.append(para(text, "  "))
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[Path], str]] = {
    "students224-zoo": students224_zoo,
    "students224-distill": students224_distill,
    "gpu-h200": gpu_h200,
    "default-run": default_run,
    "perf": perf,
    "quantization": quantization,
    "photos": photos,
    "peers": peers,
    "conv-kernels": conv_kernels,
    "student-designs": student_designs,
    "kd-methods": kd_methods,
    "kernel-profile": kernel_profile,
}


def render(readme: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """README text with every block regenerated, and the names of the blocks that changed."""
    changed: list[str] = []
    seen: set[str] = set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"README.md has a results block {name!r} that benchmarks/readme.py does not know: "
                             f"known blocks are {', '.join(BLOCKS)}")
        seen.add(name)
        body = BLOCKS[name](results).rstrip("\n") + "\n"
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    text = BLOCK.sub(fill, readme)
    missing = set(BLOCKS) - seen
    if missing:
        raise SystemExit(f"README.md lacks the results blocks {', '.join(sorted(missing))}")
    return text, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs from its JSON")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text, changed = render(args.readme.read_text(), args.results)
    if args.check:
        for name in changed:
            print(f"README.md block {name} differs from benchmarks/results: run python benchmarks/readme.py",
                  file=sys.stderr)
        return 1 if changed else 0
    args.readme.write_text(text)
    print(f"rewrote {', '.join(changed) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
