"""Human-readable forms of report.json: report.md, a self-contained report.html and plots/*.png.

The HTML embeds its plots as base64 PNG data URIs and its style inline, so the one file can be mailed or archived
as it is. Every number it shows sits in a `<span data-key="path.in.report.json" data-value=... data-scale=...>`,
so a reader (or a test) can tell exactly which report.json value each displayed number is.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from . import files

SUBJECTS = (("teacher", "teacher"), ("student_fp32", "student fp32"), ("artifact", "artifact"))
COLOURS = {"teacher": "#4c72b0", "student_fp32": "#dd8452", "artifact": "#55a868"}
MAX_CLASSES_PLOTTED = 30  # beyond this many classes, the per-class plot shows the artifact's weakest ones
MAX_CLASSES_TABULATED = 20  # the confusion matrix is tabulated up to this many classes


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _pct_ci(interval: list[float]) -> str:
    return f"[{interval[0] * 100:.2f}, {interval[1] * 100:.2f}]"


def _batches(r: dict) -> list[str]:
    return list(r["artifact"]["latency_ms"])


def _class_names(r: dict) -> list[str]:
    return r["data"]["classes"]


MARKDOWN_SPECIAL = "\\`*_[]|~"  # what changes a table cell's meaning; `-`, `#`, `.` only matter at a line's start


def md(text: str) -> str:
    """`text` shown literally in Markdown (a class or folder name): its special characters backslash-escaped,
    HTML's `<`, `>` and `&` as entities, line breaks as spaces (a table row is one line)."""
    text = " ".join(str(text).split("\n")).replace("\r", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIAL else c for c in text)


def _preprocess_line(r: dict) -> list[str]:
    p = r["data"].get("preprocess")
    if not p:
        return []
    h, w = p["size"]
    crop = f"resize {p['resize']} + center crop {h}x{w}" if p["resize"] else f"{h}x{w}"
    skipped = r["data"].get("skipped_images", 0)
    return ["", f"Preprocessing: {crop}, {p['interpolation']}, {p['channels']}, mean {p['mean']}, std {p['std']} "
            f"(size from {p['sources'].get('size', '?')}; mean/std from {p['sources'].get('mean', '?')})."
            + (f" {skipped} unreadable images left out." if skipped else "")]


def markdown(r: dict) -> str:
    """report.md: the summary table with intervals, per-class accuracy, confusion matrix and plots."""
    batches = _batches(r)
    has_top5 = "top5" in r["artifact"]
    head = ("| model | runtime | format | top-1 [95% CI] | " + ("top-5 [95% CI] | " if has_top5 else "")
            + "agreement [95% CI] | params | size | "
            + " | ".join(f"{b} p50 [95% CI] / p90 / p99 (ms)" for b in batches) + " |")
    lines = [f"# edgecompress report: {r['target']}", "",
             f"Data: {md(r['data']['name'])}, {r['data']['eval_images']} eval images. "
             f"Host: {r['host']['cpu']} ({', '.join(r['host']['cpu_flags'])}).", *_preprocess_line(r), "",
             head, "|" + "---|" * (7 + has_top5 + len(batches))]
    for name, title in SUBJECTS:
        m = r[name]
        lat = " | ".join(f"{m['latency_ms'][b]['p50']:.3f} [{m['latency_ms'][b]['p50_ci95'][0]:.3f}, "
                         f"{m['latency_ms'][b]['p50_ci95'][1]:.3f}] / {m['latency_ms'][b]['p90']:.3f} / "
                         f"{m['latency_ms'][b]['p99']:.3f}" for b in batches)
        top5 = f"{_pct(m['top5'])} {_pct_ci(m['top5_ci95'])} | " if has_top5 else ""
        agreement = f"{_pct(m['agreement'])} {_pct_ci(m['agreement_ci95'])}" if "agreement" in m else "-"
        lines.append(f"| {title} | {m['runtime']} | {m.get('format', '-')} | {_pct(m['accuracy'])} "
                     f"{_pct_ci(m['accuracy_ci95'])} | {top5}{agreement} | {m['params']:,} | "
                     f"{_mb(m['size_bytes'])} | {lat} |")
    b = r["budgets"]
    lines += ["", f"- Speedup vs teacher ({batches[0]} p50): **{r['speedup_vs_teacher']:.1f}x**",
              f"- Size ratio: **{r['size_ratio']:.1f}x**",
              f"- Accuracy drop vs teacher: **{r['accuracy_drop_pt']:.2f} points**"]
    for key, diff in r["accuracy_differences"].items():
        lines.append(f"- {key.replace('_', ' ')}: {diff['value'] * 100:+.2f} points, 95% CI "
                     f"[{diff['ci95'][0] * 100:+.2f}, {diff['ci95'][1] * 100:+.2f}]")
    max_latency = f"{b['max_latency_ms']} ms" if b["max_latency_ms"] else "none"
    min_speedup = f"{b['min_speedup']}x" if b["min_speedup"] else "none"
    max_size = f"{b['max_size_mb']} MB" if b.get("max_size_mb") else "none"
    lines += [f"- Budgets (max drop {b['max_accuracy_drop']} pt, max latency {max_latency}, "
              f"min speedup {min_speedup}, max size {max_size}): **{'passed' if b['passed'] else 'FAILED'}**"]
    lines += [f"  - {f}" for f in b["failed"]]
    k = r["artifact"].get("kernels")
    if k:
        leftovers = ", ".join(k["float_compute_layers"]) or "none"
        lines.append(f"- Int8 kernels in ONNX Runtime's optimised graph: {k['int8_compute_layers']} compute layers "
                     f"fused to int8; left in float: {leftovers}")
        dequantized = ", ".join(f"{op} x{n}" for op, n in k.get("dequantized_ops", {}).items())
        if dequantized:
            lines.append(f"- Run in float between int8 kernels (ONNX Runtime has no int8 kernel for them; each is a "
                         f"dequantize-requantize round trip): {dequantized}")
    selection = r.get("student_selection")
    if selection:
        lines += ["", f"## Student chosen for a {selection['max_latency_ms']} ms {selection['batch']} budget", "",
                  "| candidate | params | int8 p50 ms | fits |", "|---|---|---|---|"]
        lines += [f"| {c['name']}{' (chosen)' if c['name'] == selection['chosen'] else ''} | {c['params']:,} | "
                  f"{c['p50_ms']:.3f} | {'yes' if c['fits'] else 'no'} |" for c in selection["candidates"]]
        lines.append(f"\n{selection['rule']}")
    if r["unverified"]:
        lines += ["", "Not verified on this host:"] + [f"- {u}" for u in r["unverified"]]
    q = r.get("quantization")
    if q:
        lines += ["", f"## Quantization tries ({q['scheme']}; try {q['chosen_try']} shipped)", ""]
        if q.get("selection"):
            lines += [f"Top-1 on {q['selection_images']} selection images: {q['selection']}.", ""]
        lines += ["| try | kind | calibration | nodes kept in float | selection top-1 | vs fp32 (pt) "
                  "| bs1 ms (quick) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['try']} | {t['kind']} | {t.get('calibration', '-')} | "
                  f"{', '.join(t['excluded_nodes']) or '-'} | {_pct(t['selection_top1'])} | "
                  f"{t['drop_vs_fp32_pt']:+.2f} | {t['latency_bs1_ms']:.3f} |"
                  for t in q["tries"] if "latency_bs1_ms" in t]
        fold = q.get("input_fold")
        if fold:
            lines.append(f"\nInput normalisation (mean {fold['mean']:.4f}, std {fold['std']:.4f}) folded into the "
                         f"input's quantization: pixels quantized with scale 1/255, the first layer reads zero point "
                         f"{fold['normalized_zero_point']}.")

    lines += ["", "## Per-class top-1", "", "| class | eval images | teacher | student fp32 | artifact |",
              "|---|---|---|---|---|"]
    for c, name in enumerate(_class_names(r)):
        lines.append(f"| {md(name)} | {r['data']['eval_per_class'][c]} | "
                     + " | ".join(_pct(r[s]["per_class_accuracy"][c]) for s, _ in SUBJECTS) + " |")
    if len(_class_names(r)) <= MAX_CLASSES_TABULATED:
        lines += ["", "## Confusion matrix of the artifact (rows: true class, columns: predicted)", "",
                  "| true \\ predicted | " + " | ".join(map(md, _class_names(r))) + " |",
                  "|---|" + "---|" * len(_class_names(r))]
        for name, row in zip(_class_names(r), r["artifact"]["confusion_matrix"]):
            lines.append(f"| {md(name)} | " + " | ".join(str(v) for v in row) + " |")
    s = r["statistics"]
    lines += ["", "## Plots", "", "![accuracy vs latency vs size](plots/tradeoff.png)", "",
              "![per-class accuracy](plots/per_class.png)", "", "![latency of every timed run](plots/latency.png)",
              "", f"Intervals: {s['level']:.0%}, {s['resamples']} resamples, seed {s['seed']}; accuracy: "
              f"{s['accuracy']}; latency p50: {s['latency_p50']}. Every timed run is in latency.json."]
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _log_scale(ax, which: str) -> None:
    """Make `ax`'s x or y axis logarithmic, ticked at 1, 2 and 5 times powers of ten, labelled plainly (0.5, 2, 50)."""
    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plot_tradeoff(r: dict) -> bytes:
    """Top-1 against batch-1 p50 latency (log scale), bubble area proportional to size, with 95% intervals."""
    batch = _batches(r)[0]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    largest = max(r[s]["size_bytes"] for s, _ in SUBJECTS)
    for name, title in SUBJECTS:
        m = r[name]
        lat, acc = m["latency_ms"][batch], m["accuracy"] * 100
        ax.errorbar(lat["p50"], acc, fmt="none", ecolor="#333333", capsize=3,
                    xerr=[[lat["p50"] - lat["p50_ci95"][0]], [lat["p50_ci95"][1] - lat["p50"]]],
                    yerr=[[acc - m["accuracy_ci95"][0] * 100], [m["accuracy_ci95"][1] * 100 - acc]])
        ax.scatter(lat["p50"], acc, s=60 + 2400 * m["size_bytes"] / largest, alpha=0.55, color=COLOURS[name],
                   edgecolors="black", label=f"{title}: {_mb(m['size_bytes'])}")
        ax.annotate(title, (lat["p50"], acc), textcoords="offset points", xytext=(8, 8), fontsize=9)
    _log_scale(ax, "x")
    ax.set_xlabel(f"{batch} p50 latency (ms, log scale; bars: 95% CI)")
    ax.set_ylabel("top-1 accuracy (%; bars: 95% CI)")
    ax.set_title(f"Accuracy vs latency vs size (bubble area) on {r['target']}")
    ax.legend(loc="best", fontsize=8, markerscale=0.4)
    ax.margins(0.25)
    ax.grid(alpha=0.3)
    return _png(fig)


def plotted_classes(r: dict) -> list[int]:
    """Class indices the per-class plot shows: all, or the artifact's weakest MAX_CLASSES_PLOTTED."""
    accuracy = r["artifact"]["per_class_accuracy"]
    indices = [c for c, a in enumerate(accuracy) if a is not None]
    if len(indices) <= MAX_CLASSES_PLOTTED:
        return indices
    return sorted(sorted(indices, key=lambda c: accuracy[c])[:MAX_CLASSES_PLOTTED])


def plot_per_class(r: dict) -> bytes:
    """Grouped bars: per-class top-1 of the three models."""
    shown = plotted_classes(r)
    names = [_class_names(r)[c] for c in shown]
    fig = Figure(figsize=(max(7.0, 0.6 * len(shown) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(SUBJECTS)
    for i, (name, title) in enumerate(SUBJECTS):
        values = [r[name]["per_class_accuracy"][c] * 100 for c in shown]
        offset = (i - (len(SUBJECTS) - 1) / 2) * width
        ax.bar(np.arange(len(shown)) + offset, values, width, label=title, color=COLOURS[name])
    ax.set_xticks(np.arange(len(shown)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    weakest = f" ({len(shown)} weakest of the artifact's classes)" if len(shown) < len(_class_names(r)) else ""
    ax.set_title(f"Per-class accuracy{weakest}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_latency(r: dict, timings: dict[str, dict[str, list[float]]]) -> bytes:
    """Per batch size: the distribution of every timed run (box and points) and the runs in the order timed."""
    batches = _batches(r)
    fig = Figure(figsize=(11, 3.2 * len(batches)))
    axes = fig.subplots(len(batches), 2, squeeze=False)
    rng = np.random.default_rng(0)  # jitter of the points only
    for row, batch in enumerate(batches):
        spread, sequence = axes[row]
        series = [np.asarray(timings[name][batch]) for name, _ in SUBJECTS]
        labels = [f"{title}\n{len(values)} runs" for values, (_, title) in zip(series, SUBJECTS)]
        spread.boxplot(series, orientation="horizontal", tick_labels=labels, showfliers=False, widths=0.5)
        for i, (values, (name, _)) in enumerate(zip(series, SUBJECTS)):
            spread.scatter(values, i + 1 + rng.uniform(-0.18, 0.18, len(values)), s=6, alpha=0.5,
                           color=COLOURS[name])
            sequence.plot(np.arange(1, len(values) + 1), values, ".-", ms=3, lw=0.6, color=COLOURS[name],
                          label=SUBJECTS[i][1])
        _log_scale(spread, "x")
        spread.set_xlabel(f"{batch} latency per batch (ms, log scale)")
        spread.set_title(f"{batch}: every timed run")
        _log_scale(sequence, "y")
        sequence.set_xlabel("timed run")
        sequence.set_ylabel("ms (log scale)")
        sequence.set_title(f"{batch}: in the order timed")
        sequence.legend(fontsize=7, loc="upper right")
        for ax in (spread, sequence):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plots(r: dict, timings: dict[str, dict[str, list[float]]]) -> dict[str, bytes]:
    """The three plots as PNG bytes, by file stem."""
    return {"tradeoff": plot_tradeoff(r), "per_class": plot_per_class(r), "latency": plot_latency(r, timings)}


def lookup(r: dict, key: str):
    """report.json's value at a dotted path such as `artifact.latency_ms.bs1.p50_ci95.0`."""
    value = r
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _number(r: dict, key: str, decimals: int = 2, scale: float = 1.0, signed: bool = False) -> str:
    """A span showing report.json's value at dotted `key`, times `scale`, with its exact value in data-value."""
    value = lookup(r, key)
    if value is None:
        return "-"
    if isinstance(value, int) and scale == 1 and decimals == 0:
        text = f"{value:,}"
    else:
        text = f"{value * scale:{'+' if signed else ''}.{decimals}f}"
    return (f'<span class="n" data-key="{key}" data-value="{html.escape(json.dumps(value))}" '
            f'data-scale="{scale:g}">{text}</span>')


def _percent(r: dict, key: str, signed: bool = False) -> str:
    return _number(r, key, 2, 100.0, signed)


def _percent_ci(r: dict, key: str, signed: bool = False) -> str:
    return f"[{_percent(r, key + '.0', signed)}, {_percent(r, key + '.1', signed)}]"


def _size(r: dict, key: str) -> str:
    return f"{_number(r, key, 2, 1e-6)} MB" if lookup(r, key) >= 1e5 else f"{_number(r, key, 1, 1e-3)} kB"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.ci { color: #666; font-size: 0.85em; } .pass { color: #1a7f37; font-weight: bold; }
.fail { color: #c62828; font-weight: bold; } img { max-width: 100%; display: block; margin: 0.8em 0; }
.small { color: #555; font-size: 0.85em; }
"""


def html_report(r: dict, images: dict[str, bytes]) -> str:
    """report.html: every table of report.md plus the plots, inline, with no external reference."""
    esc = html.escape
    batches = _batches(r)
    has_top5 = "top5" in r["artifact"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>edgecompress report: {esc(r['target'])}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>edgecompress report: {esc(r['target'])}</h1>",
           f"<p>Data: {esc(r['data']['name'])}, {_number(r, 'data.eval_images', 0)} eval images. "
           f"Host: {esc(r['host']['cpu'])} ({esc(', '.join(r['host']['cpu_flags']))}).</p>",
           "<h2>Summary</h2><table><tr><th>model</th><th>runtime</th><th>format</th><th>top-1 %</th>"
           + ("<th>top-5 %</th>" if has_top5 else "") + "<th>agreement %</th><th>params</th><th>size</th>"
           + "".join(f"<th>{b} p50 ms [95% CI]</th><th>{b} p90 / p99 ms</th><th>{b} images/s</th>"
                     for b in batches) + "</tr>"]
    for name, title in SUBJECTS:
        m = r[name]
        cells = [esc(title), esc(m["runtime"]), esc(m.get("format", "-")),
                 f"{_percent(r, name + '.accuracy')} <span class=ci>{_percent_ci(r, name + '.accuracy_ci95')}</span>"]
        if has_top5:
            cells.append(f"{_percent(r, name + '.top5')} <span class=ci>{_percent_ci(r, name + '.top5_ci95')}</span>")
        cells.append(f"{_percent(r, name + '.agreement')} <span class=ci>"
                     f"{_percent_ci(r, name + '.agreement_ci95')}</span>" if "agreement" in m else "-")
        cells += [_number(r, f"{name}.params", 0), _size(r, f"{name}.size_bytes")]
        for b in batches:
            key = f"{name}.latency_ms.{b}"
            cells += [f"{_number(r, key + '.p50', 3)} <span class=ci>[{_number(r, key + '.p50_ci95.0', 3)}, "
                      f"{_number(r, key + '.p50_ci95.1', 3)}]</span>",
                      f"{_number(r, key + '.p90', 3)} / {_number(r, key + '.p99', 3)}",
                      _number(r, key + ".throughput_ips", 1)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")

    b = r["budgets"]
    verdict = '<span class="pass">passed</span>' if b["passed"] else '<span class="fail">FAILED</span>'
    out += ["<ul>", f"<li>Speedup vs teacher ({esc(batches[0])} p50): <b>{_number(r, 'speedup_vs_teacher')}x</b></li>",
            f"<li>Size ratio: <b>{_number(r, 'size_ratio')}x</b></li>",
            f"<li>Accuracy drop vs teacher: <b>{_number(r, 'accuracy_drop_pt')} points</b></li>"]
    for key in r["accuracy_differences"]:
        path = f"accuracy_differences.{key}"
        out.append(f"<li>{esc(key.replace('_', ' '))}: {_percent(r, path + '.value', True)} points, 95% CI "
                   f"{_percent_ci(r, path + '.ci95', True)}</li>")
    max_latency = f"{_number(r, 'budgets.max_latency_ms', 3)} ms" if b["max_latency_ms"] else "none"
    min_speedup = f"{_number(r, 'budgets.min_speedup', 1)}x" if b["min_speedup"] else "none"
    max_size = f"{_number(r, 'budgets.max_size_mb', 3)} MB" if b.get("max_size_mb") else "none"
    out.append(f"<li>Budgets (max drop {_number(r, 'budgets.max_accuracy_drop')} pt, max latency {max_latency}, "
               f"min speedup {min_speedup}, max size {max_size}): {verdict}"
               + ("<ul>" + "".join(f"<li>{esc(f)}</li>" for f in b["failed"]) + "</ul>" if b["failed"] else "")
               + "</li></ul>")
    if r["unverified"]:
        out.append("<p>Not verified on this host:</p><ul>" + "".join(f"<li>{esc(u)}</li>" for u in r["unverified"])
                   + "</ul>")

    captions = {"tradeoff": "Accuracy vs latency vs size", "per_class": "Per-class accuracy",
                "latency": "Latency of every timed run"}
    out.append("<h2>Plots</h2>")
    for stem, caption in captions.items():
        data = base64.b64encode(images[stem]).decode("ascii")
        out.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                   f"<figcaption class=small>{esc(caption)}</figcaption></figure>")

    out.append("<h2>Per-class top-1 %</h2><table><tr><th>class</th><th>eval images</th><th>teacher</th>"
               "<th>student fp32</th><th>artifact</th></tr>")
    for c, name in enumerate(_class_names(r)):
        out.append(f"<tr><td>{esc(name)}</td><td>{_number(r, f'data.eval_per_class.{c}', 0)}</td>"
                   + "".join(f"<td>{_percent(r, f'{s}.per_class_accuracy.{c}')}</td>" for s, _ in SUBJECTS)
                   + "</tr>")
    out.append("</table>")
    if len(_class_names(r)) <= MAX_CLASSES_TABULATED:
        out.append("<h2>Confusion matrix of the artifact</h2><p class=small>Rows: true class; columns: predicted."
                   "</p><table><tr><th>true \\ predicted</th>"
                   + "".join(f"<th>{esc(n)}</th>" for n in _class_names(r)) + "</tr>")
        for i, name in enumerate(_class_names(r)):
            out.append(f"<tr><td>{esc(name)}</td>" + "".join(
                f"<td>{_number(r, f'artifact.confusion_matrix.{i}.{j}', 0)}</td>"
                for j in range(len(_class_names(r)))) + "</tr>")
        out.append("</table>")

    s = r["statistics"]
    versions = ", ".join(f"{esc(k)} {esc(str(v))}" for k, v in r["versions"].items())
    out += ["<h2>Method</h2>",
            f"<p class=small>Intervals: {s['level']:.0%}, {s['resamples']} resamples, seed {s['seed']}. "
            f"Accuracy: {esc(s['accuracy'])}. Latency p50: {esc(s['latency_p50'])}. Every timed run is in "
            f"latency.json beside this file.</p>", f"<p class=small>Versions: {versions}.</p>", "</body></html>"]
    return "\n".join(out) + "\n"


def write(out_dir: Path, r: dict, timings: dict[str, dict[str, list[float]]]) -> None:
    """report.md, plots/*.png and report.html in `out_dir`, each written atomically."""
    files.write_text(out_dir / "report.md", markdown(r))
    images = plots(r, timings)
    for stem, png in images.items():
        with files.atomic_path(out_dir / "plots" / f"{stem}.png") as tmp:
            tmp.write_bytes(png)
    files.write_text(out_dir / "report.html", html_report(r, images))
