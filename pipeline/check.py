"""`edgecompress check`: compare a new report.json with a baseline one, as a CI gate.

Regressions (any one fails the check):
- accuracy: the artifact's top-1 fell by more than `max_accuracy_drop_pt` points;
- latency, per batch size of the baseline: the artifact's p50 rose by more than `max_latency_increase_pct`
  percent even between the nearest ends of the two p50s' 95% intervals, i.e. from the baseline interval's
  high end to the new interval's low end, AND its fastest run (`min`) rose by more than that too. The nearest
  ends' rise is smaller than the rise of the p50s themselves and negative when the intervals overlap; the
  intervals span several fresh sessions (verify.py), so a flagged rise exceeds both the threshold and the
  measured noise within and between sessions. The fastest run is what a slower model cannot hide and what
  other work on a shared machine barely moves (it needs only one undisturbed call), so requiring it too keeps
  a busy CI runner from failing an unchanged artifact. A report without intervals or minimums (written before
  they existed) is judged by its p50 alone, and the output says so;
- a batch size the baseline timed is missing from the new report;
- the artifact itself changed kind: its format differs, its file grew more than `max_size_growth` times, or
  its compression against the fp32 student of the same report (student_fp32.size_bytes / artifact.size_bytes)
  fell more than `max_compression_loss` times (e.g. the fp32 model shipped where the int8 artifact was: on a
  tiny model int8 QDQ is only ~1.8x smaller than fp32, so the growth rule alone would miss it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput

SCHEMA = 1  # report.json's schema (DESIGN.md): bumped when a field changes meaning; `validate` reads it
SUBJECTS = ("teacher", "student_fp32", "artifact")


@dataclass(frozen=True)
class Thresholds:
    max_accuracy_drop_pt: float = 1.0
    max_latency_increase_pct: float = 10.0
    max_size_growth: float = 2.0
    max_compression_loss: float = 1.5

    def validate(self) -> "Thresholds":
        for name, value in (("--max-accuracy-drop", self.max_accuracy_drop_pt),
                            ("--max-latency-increase", self.max_latency_increase_pct)):
            if not math.isfinite(value) or value < 0:
                raise BadInput(f"{name} must be a number >= 0, got {value}")
        return self


@dataclass
class Outcome:
    """The side-by-side table, the regressions found (empty: passed) and notes that do not fail the check."""
    table: str
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.regressions

    def text(self) -> str:
        lines = [self.table, ""]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"REGRESSION: {r}" for r in self.regressions]
        lines.append("check passed" if self.passed else f"check failed: {len(self.regressions)} regression(s)")
        return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(report, where: str) -> dict:
    """The fields `check` reads, as DESIGN.md's report.json schema 1 defines them; BadInput naming the first bad one."""
    if not isinstance(report, dict):
        raise BadInput(f"{where}: not a report.json (a JSON object is expected)")
    if report.get("schema") != SCHEMA:
        raise BadInput(f"{where}: report schema {report.get('schema')!r}, this edgecompress reads schema {SCHEMA}")
    if not isinstance(report.get("target"), str):
        raise BadInput(f"{where}: field target is missing or not a string")
    for name in SUBJECTS:
        m = report.get(name)
        if not isinstance(m, dict):
            raise BadInput(f"{where}: field {name} is missing or not an object")
        if not _is_number(m.get("accuracy")) or not 0 <= m["accuracy"] <= 1:
            raise BadInput(f"{where}: {name}.accuracy must be a fraction in [0, 1], got {m.get('accuracy')!r}")
        if not _is_number(m.get("size_bytes")) or m["size_bytes"] <= 0:
            raise BadInput(f"{where}: {name}.size_bytes must be a positive number, got {m.get('size_bytes')!r}")
        latency = m.get("latency_ms")
        if not isinstance(latency, dict) or not latency:
            raise BadInput(f"{where}: {name}.latency_ms is missing or empty")
        for batch, entry in latency.items():
            if not isinstance(entry, dict) or not _is_number(entry.get("p50")) or entry["p50"] <= 0:
                raise BadInput(f"{where}: {name}.latency_ms.{batch}.p50 must be a positive number")
            interval = entry.get("p50_ci95")
            if interval is not None and not (isinstance(interval, list) and len(interval) == 2
                                             and all(_is_number(v) for v in interval)):
                raise BadInput(f"{where}: {name}.latency_ms.{batch}.p50_ci95 must be [low, high]")
    if not isinstance(report["artifact"].get("format"), str):
        raise BadInput(f"{where}: artifact.format is missing or not a string")
    return report


def load_report(path: Path) -> dict:
    """Read and validate a report.json; BadInput (exit 2) when it is missing, not JSON or not schema 1."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BadInput(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    try:
        report = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"{path} is not JSON ({exc})") from None
    return validate(report, str(path))


def _section(report: dict, key: str) -> dict:
    """An informational section (data, host) of a report, or {} when it is absent or malformed."""
    value = report.get(key)
    return value if isinstance(value, dict) else {}


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


def _latency(entry: dict | None) -> str:
    if entry is None:
        return "-"
    interval = entry.get("p50_ci95")
    return f"{entry['p50']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _size(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def _table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("", "baseline", "new", "change", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def smallest_increase_pct(before: dict, after: dict) -> float | None:
    """The smallest p50 rise (%) that both 95% intervals allow: from the baseline interval's high end to the new
    interval's low end (negative when they overlap); None when a report has no intervals."""
    if not (before.get("p50_ci95") and after.get("p50_ci95")):
        return None
    return (after["p50_ci95"][0] / before["p50_ci95"][1] - 1) * 100


def floor_increase_pct(before: dict, after: dict) -> float | None:
    """The rise (%) of the fastest timed run; None when a report has no `min`."""
    if not (_is_number(before.get("min")) and _is_number(after.get("min")) and before["min"] > 0):
        return None
    return (after["min"] / before["min"] - 1) * 100


def _batch_order(name: str) -> tuple[int, str]:
    digits = name[2:] if name.startswith("bs") else ""
    return (int(digits) if digits.isdigit() else 1 << 30, name)


def compare(new: dict, old: dict, thresholds: Thresholds = Thresholds()) -> Outcome:
    """Compare two validated reports (see the module docstring for the rules)."""
    thresholds.validate()
    rows, regressions, notes = [], [], []

    for name in SUBJECTS:
        before, after = old[name]["accuracy"], new[name]["accuracy"]
        change = (after - before) * 100
        drop = -change
        flagged = name == "artifact" and drop > thresholds.max_accuracy_drop_pt
        if flagged:
            regressions.append(f"artifact top-1 fell {drop:.2f} points ({_pct(before)} -> {_pct(after)}), more than "
                               f"the {thresholds.max_accuracy_drop_pt:g} allowed by --max-accuracy-drop")
        verdict = ("REGRESSION" if flagged else "ok") if name == "artifact" else ""
        rows.append((f"{name} top-1", _pct(before), _pct(after), f"{change:+.2f} pt", verdict))

    for name in SUBJECTS:
        batches = sorted(set(old[name]["latency_ms"]) | set(new[name]["latency_ms"]), key=_batch_order)
        for batch in batches:
            before, after = old[name]["latency_ms"].get(batch), new[name]["latency_ms"].get(batch)
            label = f"{name} {batch} p50 ms [95% CI]"
            if before is None or after is None:
                missing = name == "artifact" and after is None
                if missing:
                    regressions.append(f"artifact {batch} latency is in the baseline but missing from the new report")
                rows.append((label, _latency(before), _latency(after), "-", "REGRESSION" if missing else ""))
                continue
            increase = (after["p50"] / before["p50"] - 1) * 100
            verdict = ""
            if name == "artifact":
                threshold = thresholds.max_latency_increase_pct
                least, floor = smallest_increase_pct(before, after), floor_increase_pct(before, after)
                if least is None or floor is None:
                    notes.append(f"artifact {batch}: no p50 interval or fastest run in one of the reports, so its "
                                 f"latency is judged by its p50 alone")
                    least = floor = increase
                verdict = "ok"
                if least > threshold and floor > threshold:
                    verdict = "REGRESSION"
                    regressions.append(f"artifact {batch} p50 rose {increase:.1f}% ({before['p50']:.3f} -> "
                                       f"{after['p50']:.3f} ms), {least:.1f}% between the 95% intervals' nearest "
                                       f"ends, and its fastest run {floor:.1f}%: more than the {threshold:g}% "
                                       "allowed by --max-latency-increase")
                elif increase > threshold:
                    verdict = "noise"
                    notes.append(f"artifact {batch} p50 rose {increase:.1f}%, but {least:.1f}% between the 95% "
                                 f"intervals' nearest ends and {floor:.1f}% in its fastest run: within the "
                                 "measured noise, not a regression")
            rows.append((label, _latency(before), _latency(after), f"{increase:+.1f}%", verdict))

    a_old, a_new = old["artifact"], new["artifact"]
    growth = a_new["size_bytes"] / a_old["size_bytes"]
    size_flagged = growth > thresholds.max_size_growth
    if size_flagged:
        regressions.append(f"artifact file grew {growth:.1f}x ({_size(a_old['size_bytes'])} -> "
                           f"{_size(a_new['size_bytes'])}): is it still the {a_old['format']} model?")
    rows.append(("artifact size", _size(a_old["size_bytes"]), _size(a_new["size_bytes"]), f"x{growth:.2f}",
                 "REGRESSION" if size_flagged else "ok"))
    compression_old = old["student_fp32"]["size_bytes"] / a_old["size_bytes"]
    compression_new = new["student_fp32"]["size_bytes"] / a_new["size_bytes"]
    compression_flagged = compression_new * thresholds.max_compression_loss < compression_old
    if compression_flagged:
        regressions.append(f"artifact is {compression_new:.2f}x smaller than its fp32 student, against "
                           f"{compression_old:.2f}x in the baseline: quantization was lost or undone")
    rows.append(("artifact compression vs fp32", f"{compression_old:.2f}x", f"{compression_new:.2f}x",
                 f"x{compression_new / compression_old:.2f}", "REGRESSION" if compression_flagged else "ok"))
    format_flagged = a_new["format"] != a_old["format"]
    if format_flagged:
        regressions.append(f"artifact format changed: {a_old['format']} -> {a_new['format']}")
    rows.append(("artifact format", a_old["format"], a_new["format"], "changed" if format_flagged else "same",
                 "REGRESSION" if format_flagged else "ok"))

    if new["target"] != old["target"]:
        notes.append(f"the reports are for different targets: {old['target']} (baseline), {new['target']} (new)")
    evaluated_on = [{k: _section(r, "data").get(k) for k in ("name", "eval_images")} for r in (new, old)]
    if evaluated_on[0] != evaluated_on[1]:
        notes.append("the reports were evaluated on different data; accuracies may not be comparable")
    old_cpu, new_cpu = _section(old, "host").get("cpu"), _section(new, "host").get("cpu")
    if old_cpu != new_cpu:
        notes.append(f"the reports were timed on different CPUs ({old_cpu} / {new_cpu}); latencies may not be "
                     "comparable")
    return Outcome(_table(rows), regressions, notes)


def check(new_path: Path, baseline_path: Path, thresholds: Thresholds = Thresholds()) -> Outcome:
    """Load both reports (BadInput when either is unusable) and compare them."""
    thresholds.validate()
    return compare(load_report(new_path), load_report(baseline_path), thresholds)
