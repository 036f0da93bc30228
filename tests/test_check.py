"""`edgecompress check`: planted regressions exit 1, unchanged reruns exit 0, bad input exits 2 with one line."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from edgecompress import files
from edgecompress.check import Thresholds, compare
from edgecompress.cli import main

from testkit import small_run_dir


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    return small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)


@pytest.fixture(scope="module")
def baseline(small_run) -> dict:
    return json.loads((small_run / "verify" / "report.json").read_text())


def write(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report))
    return path


def run_check(capsys, new: Path, old: Path, *options: str) -> tuple[int, str, str]:
    code = main(["check", str(new), "--baseline", str(old), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_an_unchanged_report_passes_with_a_side_by_side_table(baseline, small_run, tmp_path, capsys):
    old = small_run / "verify" / "report.json"
    code, out, err = run_check(capsys, write(tmp_path / "new.json", baseline), old)
    assert code == 0, out
    assert "check passed" in out and "REGRESSION" not in out and err == ""
    header = out.splitlines()[0].split()
    assert header == ["baseline", "new", "change"]
    for label in ("teacher top-1", "student_fp32 top-1", "artifact top-1", "artifact bs1 p50 ms",
                  "artifact bs64 p50 ms", "teacher bs64 p50 ms", "artifact size", "artifact format"):
        assert label in out
    accuracy_row = next(line for line in out.splitlines() if line.startswith("artifact top-1"))
    assert accuracy_row.split()[2:5] == [f"{baseline['artifact']['accuracy'] * 100:.2f}%"] * 2 + ["+0.00"]


def test_an_artifact_two_points_less_accurate_is_a_regression(baseline, small_run, tmp_path, capsys):
    worse = copy.deepcopy(baseline)
    worse["artifact"]["accuracy"] -= 0.02
    code, out, _ = run_check(capsys, write(tmp_path / "new.json", worse), small_run / "verify" / "report.json")
    assert code == 1
    assert "REGRESSION: artifact top-1 fell 2.00 points" in out and "check failed: 1 regression(s)" in out
    # the threshold is the user's: 2 points pass when 2.5 are allowed, and half a point passes by default
    assert run_check(capsys, tmp_path / "new.json", small_run / "verify" / "report.json",
                     "--max-accuracy-drop", "2.5")[0] == 0
    worse["artifact"]["accuracy"] = baseline["artifact"]["accuracy"] - 0.005
    assert run_check(capsys, write(tmp_path / "new.json", worse), small_run / "verify" / "report.json")[0] == 0


def test_the_fp32_models_size_and_latency_where_the_artifact_was_is_a_regression(baseline, small_run, tmp_path,
                                                                                   capsys):
    old = small_run / "verify" / "report.json"
    swapped = copy.deepcopy(baseline)
    fp32 = baseline["student_fp32"]
    swapped["artifact"] |= {"size_bytes": fp32["size_bytes"], "latency_ms": fp32["latency_ms"]}
    code, out, _ = run_check(capsys, write(tmp_path / "new.json", swapped), old)
    assert code == 1
    assert "REGRESSION: artifact is 1.00x smaller than its fp32 student" in out
    swapped["artifact"]["format"] = fp32["format"]  # what verify reads from an fp32 graph
    code, out, _ = run_check(capsys, write(tmp_path / "new.json", swapped), old)
    assert code == 1 and "REGRESSION: artifact format changed: onnx-int8 -> onnx-fp32" in out

    grown = copy.deepcopy(baseline)  # growth alone is enough, even when the fp32 student grew alike
    for name in ("student_fp32", "artifact"):
        grown[name]["size_bytes"] = baseline[name]["size_bytes"] * 2.5
    code, out, _ = run_check(capsys, write(tmp_path / "new.json", grown), old)
    assert code == 1 and out.count("REGRESSION:") == 1 and "REGRESSION: artifact file grew 2.5x" in out


def test_a_real_fp32_model_in_the_artifacts_place_is_caught_and_a_real_unchanged_rerun_passes(small_run, tmp_path,
                                                                                              capsys, teacher_spec):
    """Rerun `edgecompress verify` twice on copies of the small run: once unchanged, once with student.fp32.onnx
    copied over the int8 artifact. Latency noise on a shared test machine is not this test's business (tests
    assert no timings; the false-alarm rate is measured separately), so the unchanged rerun is judged with a
    latency threshold no noise reaches; accuracy, format and size must pass exactly."""
    baseline_report = small_run / "verify" / "report.json"
    unchanged = shutil.copytree(small_run, tmp_path / "unchanged")
    trust = ["--trust", str(Path(teacher_spec.rpartition(":")[0]).parent)]  # the run's factory teacher
    assert main(["verify", str(unchanged), "--force", "--quiet", *trust]) == 0
    code, out, _ = run_check(capsys, unchanged / "verify" / "report.json", baseline_report,
                             "--max-latency-increase", "100000")
    assert code == 0, out

    # an export that wrote the fp32 model: the artifact and export's record of it (done.json) both say so
    swapped = shutil.copytree(small_run, tmp_path / "swapped")
    export = swapped / "export" / "test-cpu"
    shutil.copy(swapped / "quantize" / "student.fp32.onnx", export / "model.onnx")
    done = json.loads((export / "done.json").read_text())
    (export / "done.json").write_text(json.dumps(done | {"sha256": files.sha256(export / "model.onnx")}))
    assert main(["verify", str(swapped), "--quiet", *trust]) == 0  # the artifact's hash changed: verify reruns
    report = json.loads((swapped / "verify" / "report.json").read_text())
    assert report["artifact"]["format"] == "onnx-fp32" and report["artifact"]["runtime"] == "onnxruntime-fp32"
    code, out, _ = run_check(capsys, swapped / "verify" / "report.json", baseline_report)
    assert code == 1
    assert "REGRESSION: artifact format changed: onnx-int8 -> onnx-fp32" in out


def latency_report(baseline: dict, p50: float, interval: tuple[float, float] | None, fastest: float = 0.95) -> dict:
    report = copy.deepcopy(baseline)
    entry = report["artifact"]["latency_ms"]["bs1"]
    entry["p50"], entry["min"] = p50, fastest
    if interval is None:
        entry.pop("p50_ci95")
    else:
        entry["p50_ci95"] = list(interval)
    return report


@pytest.mark.parametrize("new_p50, new_interval, new_fastest, regression", [
    (1.25, (1.20, 1.30), 1.18, True),    # +25%, +16.5% between the intervals' nearest ends, fastest run +24%
    (1.25, (1.20, 1.30), 0.96, False),   # the same p50s, but the fastest run is as fast as before: a busy machine
    (1.15, (1.12, 1.18), 1.10, False),   # +15%, but only +8.7% between the intervals' nearest ends: noise
    (1.15, (1.02, 1.30), 1.00, False),   # +15%, the intervals overlap: noise
    (1.08, (1.07, 1.09), 1.05, False),   # beyond the noise, but under the 10% threshold
    (0.80, (0.79, 0.81), 0.77, False),   # faster
])
def test_latency_is_a_regression_only_beyond_both_the_threshold_and_the_noise(baseline, new_p50, new_interval,
                                                                                new_fastest, regression):
    old = latency_report(baseline, 1.0, (0.97, 1.03), fastest=0.95)
    outcome = compare(latency_report(baseline, new_p50, new_interval, new_fastest), old, Thresholds())
    flagged = [r for r in outcome.regressions if r.startswith("artifact bs1")]
    assert bool(flagged) == regression, outcome.text()
    assert outcome.passed == (not regression)
    if new_p50 == 1.15:
        assert any("within the measured noise, not a regression" in n for n in outcome.notes)
    # a stricter threshold catches the +15% whose intervals are apart, never the overlapping one
    strict = compare(latency_report(baseline, new_p50, new_interval, new_fastest), old,
                     Thresholds(max_latency_increase_pct=5))
    assert strict.passed == (new_interval[0] <= 1.03 * 1.05 or new_fastest <= 0.95 * 1.05)


def test_reports_without_latency_intervals_are_judged_by_their_p50s(baseline):
    old = latency_report(baseline, 1.0, None)
    outcome = compare(latency_report(baseline, 1.2, (1.0, 1.4)), old, Thresholds())
    assert not outcome.passed and any("judged by its p50 alone" in n for n in outcome.notes)
    assert compare(latency_report(baseline, 1.05, (1.0, 1.1)), old, Thresholds()).passed


def test_a_batch_size_missing_from_the_new_report_is_a_regression(baseline):
    new = copy.deepcopy(baseline)
    del new["artifact"]["latency_ms"]["bs64"]
    outcome = compare(new, baseline)
    assert outcome.regressions == ["artifact bs64 latency is in the baseline but missing from the new report"]


def test_reports_from_another_cpu_target_or_data_pass_with_notes(baseline):
    other = copy.deepcopy(baseline)
    other["host"]["cpu"] = "Some Other CPU"
    other["target"] = "x86-cpu"
    other["data"] = "malformed: informational sections never fail the check"
    outcome = compare(other, baseline)
    assert outcome.passed
    assert len(outcome.notes) == 3 and any("different CPUs" in n for n in outcome.notes)
    assert compare(copy.deepcopy(baseline), baseline).notes == []


@pytest.mark.parametrize("content, needle", [
    (None, "report not found"),
    ("{not json", "is not JSON"),
    (json.dumps([1, 2]), "a JSON object is expected"),
    (json.dumps({"schema": 2}), "schema 2"),
])
def test_bad_input_exits_2_with_one_line(baseline, small_run, tmp_path, capsys, content, needle):
    new = tmp_path / "new.json"
    if content is not None:
        new.write_text(content)
    code, out, err = run_check(capsys, new, small_run / "verify" / "report.json")
    assert code == 2 and out == ""
    assert needle in assert_one_error_line(err)


@pytest.mark.parametrize("field, value, needle", [
    ("artifact", None, "field artifact is missing"),
    ("accuracy", 93.1, "artifact.accuracy must be a fraction in [0, 1]"),
    ("accuracy", "0.9", "artifact.accuracy must be a fraction"),
    ("latency_ms", {}, "artifact.latency_ms is missing or empty"),
    ("p50", None, "artifact.latency_ms.bs1.p50 must be a positive number"),
    ("format", None, "artifact.format is missing"),
])
def test_a_report_that_breaks_the_schema_exits_2(baseline, small_run, tmp_path, capsys, field, value, needle):
    broken = copy.deepcopy(baseline)
    if field == "artifact":
        del broken["artifact"]
    elif field == "p50":
        del broken["artifact"]["latency_ms"]["bs1"]["p50"]
    elif value is None:
        del broken["artifact"][field]
    else:
        broken["artifact"][field] = value
    # as the baseline too: either side is checked
    code, _, err = run_check(capsys, small_run / "verify" / "report.json", write(tmp_path / "old.json", broken))
    assert code == 2 and needle in assert_one_error_line(err)


def test_bad_usage_exits_2(small_run, capsys):
    report = str(small_run / "verify" / "report.json")
    assert main(["check", report]) == 2
    assert "--baseline" in assert_one_error_line(capsys.readouterr().err)
    assert main(["check", report, "--baseline", report, "--max-latency-increase", "-5"]) == 2
    assert "--max-latency-increase must be a number >= 0" in assert_one_error_line(capsys.readouterr().err)
