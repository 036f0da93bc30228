"""Verify's statistics on known cases, and what a real small run writes: report.json, latency.json, plots."""
from __future__ import annotations

import json
import math
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompress import stats, verify
from edgecompress.config import RunConfig
from edgecompress.runner import RunContext
from edgecompress.backends.common import onnx_format
from edgecompress.verify import (MAX_TIMED_RUNS, MIN_TIMED_SECONDS, WARMUP_WINDOW, accuracy_metrics, confusion_matrix,
                                 per_class_accuracy, time_runs, top_k_hits)

from testkit import PNG_SIGNATURE, small_run_dir



# --- the interval math on known cases -----------------------------------------------------------------------

def test_all_correct_gives_the_interval_1_1():
    means = stats.paired_bootstrap_means(np.ones((1, 500), bool), 1000, seed=0)
    assert stats.percentile_interval(means[:, 0]) == (1.0, 1.0)


def test_half_correct_gives_an_interval_of_the_binomial_width_around_one_half():
    n = 2000
    hits = np.zeros((1, n), bool)
    hits[0, ::2] = True
    low, high = stats.percentile_interval(stats.paired_bootstrap_means(hits, 2000, seed=3)[:, 0])
    normal_width = 2 * 1.959964 * math.sqrt(0.25 / n)  # the Wald interval's width: 0.0438
    assert low < 0.5 < high
    assert abs((low + high) / 2 - 0.5) < 0.004
    assert high - low == pytest.approx(normal_width, rel=0.1)


def test_a_paired_difference_of_identical_predictions_is_exactly_0_0():
    rng = np.random.default_rng(1)
    hits = rng.random(1000) < 0.8
    means = stats.paired_bootstrap_means(np.stack([hits, hits]), 1000, seed=0)
    assert stats.percentile_interval(means[:, 0] - means[:, 1]) == (0.0, 0.0)
    assert stats.percentile_interval(means[:, 0])[0] < 0.8 < stats.percentile_interval(means[:, 0])[1]


def test_pairing_narrows_the_difference_of_two_models_that_err_on_the_same_images():
    """Two models that share 95% of their errors: the paired interval of the difference is far narrower than
    the one from resampling each model independently, which is why verify resamples them together."""
    rng = np.random.default_rng(2)
    a = rng.random(3000) < 0.85
    b = a.copy()
    flip = rng.choice(3000, 150, replace=False)
    b[flip] = ~b[flip]
    paired = stats.paired_bootstrap_means(np.stack([a, b]), 1000, seed=0)
    independent = (stats.paired_bootstrap_means(a[None], 1000, seed=0)[:, 0]
                   - stats.paired_bootstrap_means(b[None], 1000, seed=1)[:, 0])
    paired_width = np.subtract(*stats.percentile_interval(paired[:, 0] - paired[:, 1])[::-1])
    independent_width = np.subtract(*stats.percentile_interval(independent)[::-1])
    assert paired_width < independent_width / 2


def test_the_bootstrap_is_reproducible_from_its_seed_and_changes_with_it():
    hits = np.random.default_rng(0).random((2, 400)) < 0.7
    first = stats.paired_bootstrap_means(hits, 200, seed=5)
    np.testing.assert_array_equal(first, stats.paired_bootstrap_means(hits, 200, seed=5))
    assert not np.array_equal(first, stats.paired_bootstrap_means(hits, 200, seed=6))


def test_median_interval_of_constant_timings_is_a_point_and_covers_the_median_otherwise():
    assert stats.median_interval(np.full(50, 2.5)) == (2.5, 2.5)
    timings = np.random.default_rng(4).lognormal(0.0, 0.1, 300)
    low, high = stats.median_interval(timings, seed=0)
    assert low < np.median(timings) < high
    assert high - low < 0.1


def test_block_bootstrap_widens_the_median_interval_when_slow_runs_come_in_bursts():
    """Timings with 30-run bursts at +20%: consecutive runs are not independent, and Efron's iid resampling
    (block 1) understates how much the median of another such series would move; blocks keep the bursts."""
    rng = np.random.default_rng(5)
    timings = 1.0 + rng.normal(0, 0.01, 300)
    for start in rng.choice(np.arange(0, 270, 30), 4, replace=False):
        timings[start:start + 30] *= 1.2
    iid = np.subtract(*stats.median_interval(timings, seed=0, block=1)[::-1])
    blocks = np.subtract(*stats.median_interval(timings, seed=0, block=30)[::-1])
    assert blocks > 1.5 * iid
    assert stats.block_length(300) == 7 and stats.block_length(1) == 1


def test_median_absolute_deviation():
    assert stats.median_absolute_deviation(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == 1.0


# --- the timing loop ------------------------------------------------------------------------------------------

class RecordingRunner:
    """A real callable model stand-in for the timing loop: records the sum of every input it was given."""

    def __init__(self, delay_s=lambda call: 0.0):
        self.seen: list[float] = []
        self.delay_s = delay_s

    def __call__(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s(len(self.seen)))
        self.seen.append(float(x.sum()))
        return x.reshape(len(x), -1)[:, :10]


def quiet_progress(tmp_path):
    quiet = RunContext(tmp_path, RunConfig(), quiet=True)
    return lambda length: quiet.progress(None, "timing", length)


def test_each_session_gets_a_fresh_runner_and_times_its_share_of_real_rotating_batches(fashion_raw, tmp_path):
    images = torch.from_numpy(fashion_raw["x_test"][:40, None].copy())
    made: list[RecordingRunner] = []

    def make_runner() -> RecordingRunner:
        made.append(RecordingRunner())
        return made[-1]

    sessions = time_runs(make_runner, images, 4, warmup=3, runs=20, min_seconds=0.0,
                         progress=quiet_progress(tmp_path), sessions=2)
    assert len(made) == 2 and [len(s) for s in sessions] == [10, 10]
    assert all((s > 0).all() for s in sessions)
    for runner in made:
        timed = runner.seen[-10:]
        assert len(runner.seen) >= 10 + 2 * WARMUP_WINDOW  # warmed up by at least two windows first
        assert len(set(timed[:8])) == 8 and timed[:2] == timed[8:]  # 8 distinct real batches, in turn


def test_timing_lasts_at_least_the_minimum_time_and_stops_at_the_run_cap(fashion_raw, tmp_path):
    images = torch.from_numpy(fashion_raw["x_test"][:40, None].copy())
    progress = quiet_progress(tmp_path)
    started = time.perf_counter()
    sessions = time_runs(lambda: RecordingRunner(lambda call: 0.002), images, 4, warmup=0, runs=5,
                         min_seconds=0.3, progress=progress, sessions=3)
    assert time.perf_counter() - started >= 0.3 and 5 < sum(map(len, sessions)) < 160
    # a call of microseconds stops at MAX_TIMED_RUNS, however long the minimum time
    sessions = time_runs(RecordingRunner, images, 4, warmup=0, runs=5, min_seconds=60.0, progress=progress,
                         sessions=4)
    assert sum(map(len, sessions)) == MAX_TIMED_RUNS


def test_warm_up_goes_on_until_the_time_per_call_settles(fashion_raw, monkeypatch):
    # The runner's call durations are made exact with a clock that only the runner advances.
    clock = [0.0]
    monkeypatch.setattr(verify, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def runner_taking(ms_of_call):
        calls = []

        def runner(x: np.ndarray) -> np.ndarray:
            clock[0] += ms_of_call(len(calls)) / 1e3
            calls.append(x)
            return x
        return runner

    inputs = [fashion_raw["x_test"][:4, None].astype(np.float32)]
    # 40, 35, ..., 10 ms and then 10 ms: window medians 30, 10, 10 ms, settled after the third window
    assert verify.warm_up(runner_taking(lambda call: max(10, 40 - 5 * call)), inputs, min_calls=1) == 15
    # a runner that settles at once still gets its minimum number of calls
    assert verify.warm_up(runner_taking(lambda call: 1.0), inputs, min_calls=23) == 25
    # one that never settles (every window 10% faster than the last) stops after WARMUP_MAX_SECONDS, at the
    # call that passes it: 100, 100, 100 ms
    calls = verify.warm_up(runner_taking(lambda call: 100 * 0.9 ** (call // WARMUP_WINDOW)), inputs, min_calls=1)
    assert clock[0] > verify.WARMUP_MAX_SECONDS and calls == 3
    # a call of seconds (a 224-px teacher at batch 64 on one thread) is made once, not a window's worth of times
    assert verify.warm_up(runner_taking(lambda call: 1500.0), inputs, min_calls=4) == 1


def test_a_slow_model_is_timed_within_the_time_budget_with_two_calls_per_session(fashion_raw, tmp_path,
                                                                                 monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(verify, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def make_runner():
        def runner(x: np.ndarray) -> np.ndarray:
            clock[0] += 1.5
            return x
        return runner

    images = torch.from_numpy(fashion_raw["x_test"][:64, None].copy())
    capped = time_runs(make_runner, images, 8, warmup=20, runs=30, min_seconds=1.0, progress=quiet_progress(tmp_path),
                       sessions=6, max_seconds=10.0)
    assert [len(s) for s in capped] == [2] * 6 and clock[0] == pytest.approx(6 * 3 * 1.5)
    clock[0] = 0.0  # without the budget: 5 timed calls in each session
    full = time_runs(make_runner, images, 8, warmup=20, runs=30, min_seconds=1.0, progress=quiet_progress(tmp_path),
                     sessions=6)
    assert [len(s) for s in full] == [5] * 6


def test_the_median_interval_spans_the_spread_between_sessions():
    rng = np.random.default_rng(0)
    fast, slow = 0.175 + rng.normal(0, 0.001, 500), 0.24 + rng.normal(0, 0.001, 500)
    entry = verify.latency_summary([fast, slow, fast], batch=1, resamples=200, seed=0)
    low, high = entry["p50_ci95"]
    assert low < 0.176 and high > 0.239  # each session's interval alone is about +/-0.0001 ms wide
    assert entry["session_p50"] == pytest.approx([0.175, 0.24, 0.175], abs=2e-4)
    assert entry["runs"] == 1500 and entry["min"] == pytest.approx(min(fast.min(), slow.min()), abs=1e-4)


# --- accuracy statistics on hand-made predictions ------------------------------------------------------------

def test_top_k_per_class_and_confusion_matrix_on_a_hand_made_case():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 2, 1, 2])
    np.testing.assert_array_equal(top_k_hits(logits, labels, 1), [True, False, False, True])
    np.testing.assert_array_equal(top_k_hits(logits, labels, 2), [True, True, True, True])
    predictions = logits.argmax(1)  # [0, 1, 0, 2]
    assert per_class_accuracy(predictions, labels, 4) == [1.0, 0.0, 0.5, None]
    assert confusion_matrix(labels, predictions, 3) == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_accuracy_metrics_pair_the_models_on_the_same_images():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 10, 1000)
    teacher = rng.normal(size=(1000, 10))
    teacher[np.arange(1000)[:900], labels[:900]] += 10  # right on 90%
    student = teacher.copy()
    student[:20] = rng.normal(size=(20, 10))  # differs from the teacher on at most 20 images
    metrics, differences = accuracy_metrics({"teacher": teacher, "student_fp32": student, "artifact": teacher},
                                            labels, 10, 500, seed=0)
    assert metrics["teacher"]["accuracy"] == pytest.approx(np.mean(teacher.argmax(1) == labels))
    assert metrics["artifact"]["agreement"] == 1.0 and metrics["artifact"]["agreement_ci95"] == [1.0, 1.0]
    assert differences["artifact_minus_teacher"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    diff = differences["artifact_minus_student_fp32"]
    assert diff["ci95"][0] <= diff["value"] <= diff["ci95"][1] and diff["ci95"][1] - diff["ci95"][0] < 0.03
    for name in ("teacher", "student_fp32", "artifact"):
        m = metrics[name]
        assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
        assert m["accuracy"] <= m["top5"] and m["top5_ci95"][0] <= m["top5"] <= m["top5_ci95"][1]
    matrix = np.array(metrics["artifact"]["confusion_matrix"])
    assert matrix.sum() == 1000 and np.trace(matrix) / 1000 == metrics["artifact"]["accuracy"]
    top5_free, _ = accuracy_metrics({n: teacher[:, :5] for n in ("teacher", "student_fp32", "artifact")},
                                    labels % 5, 5, 100, seed=0)
    assert "top5" not in top5_free["artifact"]  # top-5 of 5 classes is always 1: not reported


# --- a real small run, shared by test_report.py and test_check.py ---------------------------------------------

@pytest.fixture(scope="session")
def small_run(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    return small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)


def test_report_json_keeps_the_design_fields_and_adds_intervals(small_run):
    report = json.loads((small_run / "verify" / "report.json").read_text())
    for key in ("schema", "target", "teacher", "student_fp32", "artifact", "speedup_vs_teacher", "size_ratio",
                "accuracy_drop_pt", "budgets", "unverified"):
        assert key in report
    assert report["schema"] == 1 and report["data"]["eval_images"] == 200
    assert report["data"]["eval_per_class"] == [20] * 10 and len(report["data"]["classes"]) == 10
    # the exported artifact is ONNX Runtime's offline-optimised graph: int8 operators (QLinearConv, QGemm), no Q/DQ
    assert report["artifact"]["format"] == "onnx-int8" and report["artifact"]["runtime"] == "onnxruntime-int8"
    assert report["student_fp32"]["format"] == "onnx-fp32"
    for name in ("teacher", "student_fp32", "artifact"):
        m = report[name]
        for metric in ("accuracy", "top5") + (("agreement",) if name != "teacher" else ()):
            assert 0 <= m[f"{metric}_ci95"][0] <= m[metric] <= m[f"{metric}_ci95"][1] <= 1
        classes = np.array(m["per_class_accuracy"])
        assert classes.mean() == pytest.approx(m["accuracy"])  # 20 images in every class
        for batch, entry in m["latency_ms"].items():
            assert entry["p50_ci95"][0] <= entry["p50"] <= entry["p50_ci95"][1]
            assert entry["min"] <= entry["p50"] <= entry["p90"] <= entry["p99"] and entry["mad"] >= 0
            assert entry["runs"] >= (60 if batch == "bs1" else 8)  # and at least latency_min_seconds of runs
    matrix = np.array(report["artifact"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum(axis=1).tolist() == [20] * 10
    assert np.diag(matrix) / 20 == pytest.approx(report["artifact"]["per_class_accuracy"])
    drop = report["accuracy_differences"]["artifact_minus_teacher"]
    assert drop["value"] * -100 == pytest.approx(report["accuracy_drop_pt"], abs=1e-3)
    assert drop["ci95"][0] <= drop["value"] <= drop["ci95"][1]
    assert report["statistics"]["resamples"] == stats.RESAMPLES and report["statistics"]["seed"] == 0
    assert report["statistics"]["latency_min_seconds"] == MIN_TIMED_SECONDS


def test_latency_json_holds_every_timed_run_that_the_summary_was_made_from(small_run):
    report = json.loads((small_run / "verify" / "report.json").read_text())
    timings = json.loads((small_run / "verify" / "latency.json").read_text())["timings"]
    assert set(timings) == {"teacher", "student_fp32", "artifact"}
    for name, by_batch in timings.items():
        assert set(by_batch) == set(report[name]["latency_ms"])
        for batch, values in by_batch.items():
            entry = report[name]["latency_ms"][batch]
            assert len(values) == entry["runs"]
            assert np.median(values) == pytest.approx(entry["p50"], abs=2e-4)
            assert min(values) == pytest.approx(entry["min"], abs=2e-4)
            per_session = json.loads((small_run / "verify" / "latency.json").read_text())["runs_per_session"]
            counts = per_session[name][batch]
            assert sum(counts) == len(values) and len(counts) == report["statistics"]["latency_sessions"]
            bounds = np.cumsum([0, *counts])
            medians = [np.median(values[a:b]) for a, b in zip(bounds, bounds[1:])]
            assert medians == pytest.approx(entry["session_p50"], abs=2e-4)


def test_plots_are_written_as_png_files(small_run):
    for stem in ("tradeoff", "per_class", "latency"):
        png = (small_run / "verify" / "plots" / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert not list((small_run / "verify").rglob("*.tmp"))


def test_onnx_format_is_read_from_the_graph(small_run):
    assert onnx_format(small_run / "quantize" / "student.int8.onnx") == "onnx-qdq-int8"
    assert onnx_format(small_run / "export" / "test-cpu" / "model.onnx") == "onnx-int8"
    assert onnx_format(small_run / "quantize" / "student.fp32.onnx") == "onnx-fp32"


def test_a_missed_budget_exits_1_with_one_line_naming_it(small_run, tmp_path, capsys):
    """`verify` (as `compress`) fails when a budget is missed: exit 1, one line naming the budget and the report,
    and report.json records it (every other end-to-end test uses budgets that cannot be missed)."""
    import shutil

    from edgecompress import config as cfg
    from edgecompress.cli import main

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    config = cfg.read_toml(run / "run.toml")
    config["max_latency_ms"] = 1e-6  # a batch-1 p50 no model meets
    (run / "run.toml").write_text(cfg.to_toml(config))
    teacher_folder = Path(config["teacher"]["spec"].rpartition(":")[0]).parent  # a factory-file teacher
    assert main(["verify", str(run), "--quiet", "--trust", str(teacher_folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: budget missed for test-cpu: bs1 p50 ")
    assert "max_latency_ms 1e-06" in err[0]
    assert str(run / "verify" / "report.md") in err[0]
    budgets = json.loads((run / "verify" / "report.json").read_text())["budgets"]
    assert budgets["passed"] is False and budgets["max_latency_ms"] == 1e-6 and len(budgets["failed"]) == 1


@pytest.mark.parametrize("fraction_of_artifact", [0.99, 1.01])
def test_max_size_mb_fails_an_artifact_just_over_it_and_passes_one_just_under(small_run, tmp_path, capsys,
                                                                              fraction_of_artifact):
    """The size budget (phones care about app size): a limit 1% under the artifact's file misses (exit 1, the
    line names the file, its size and the budget); 1% over it passes, and report.json records the budget."""
    import shutil

    from edgecompress import config as cfg
    from edgecompress.cli import main

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    config = cfg.read_toml(run / "run.toml")
    size_mb = (run / "export" / "test-cpu" / "model.onnx").stat().st_size / 1e6
    limit = round(size_mb * fraction_of_artifact, 6)
    target = tmp_path / "sized.toml"
    target.write_text(Path(config["target"]).read_text() + f"max_size_mb = {limit}\n")  # [budgets] is the last table
    config["target"] = str(target)
    (run / "run.toml").write_text(cfg.to_toml(config))
    teacher_folder = Path(config["teacher"]["spec"].rpartition(":")[0]).parent
    code = main(["verify", str(run), "--quiet", "--trust", str(teacher_folder)])
    budgets = json.loads((run / "verify" / "report.json").read_text())["budgets"]
    assert budgets["max_size_mb"] == limit
    err = capsys.readouterr().err.strip().splitlines()
    if fraction_of_artifact < 1:
        assert code == 1 and len(err) == 1 and budgets["passed"] is False
        assert f"artifact export/test-cpu/model.onnx is {size_mb:.3f} MB > max_size_mb {limit}" in err[0]
    else:
        assert code == 0 and budgets["passed"] is True and budgets["failed"] == []
