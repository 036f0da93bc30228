"""`--student auto`: the choice rule, the refusals, and a real measurement of the zoo's students."""
from __future__ import annotations

import json

import pytest

from edgecompress import select
from edgecompress.cli import main
from edgecompress.config import RunConfig
from edgecompress.errors import StageFailed
from edgecompress.runner import RunContext

from conftest import write_factory


def candidate(name: str, params: int, p50: float) -> dict:
    return {"name": name, "params": params, "p50_ms": p50}


def test_the_largest_student_that_fits_is_chosen_the_faster_on_a_tie_and_none_when_nothing_fits():
    measured = [candidate("small", 10, 0.1), candidate("mid", 50, 0.2), candidate("mid_slow", 50, 0.25),
                candidate("big", 90, 0.5)]
    assert select.choose(measured, budget=0.3) == "mid"
    assert select.choose(measured, budget=0.5) == "big"
    assert select.choose(measured, budget=0.05) is None


def test_auto_without_a_latency_budget_is_refused_with_one_line(small_npz, teacher_spec, tmp_path, capsys):
    code = main(["compress", "--student", "auto", "--data", str(small_npz), "--teacher", teacher_spec,
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--max-latency-ms" in err[0]


def test_a_teacher_no_zoo_model_is_smaller_than_is_refused(small_npz, teacher_spec, tmp_path, capsys):
    code = main(["compress", "--student", "auto", "--max-latency-ms", "1", "--data", str(small_npz),
                 "--teacher", teacher_spec, "--out", str(tmp_path / "run"), "--quiet"])  # the teacher: resnet_slim_050
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "smaller than the teacher" in err[0]


@pytest.mark.slow
def test_every_candidate_is_timed_as_an_int8_artifact_and_the_measurement_is_reused(small_npz, inputs_dir,
                                                                                       tmp_path):
    teacher = write_factory(inputs_dir / "teacher_half" / "teacher.py", 10, arch="resnet18_half")
    config = RunConfig(data=str(small_npz), max_latency_ms=50.0)
    config.teacher.spec = teacher
    config.distill.student = "auto"
    ctx = RunContext(tmp_path / "run", config, quiet=True)
    record = select.select_student(ctx)
    names = [c["name"] for c in record["candidates"]]
    assert "resnet18_half" not in names and "resnet_slim_150" in names  # only models smaller than the teacher
    assert all(c["p50_ms"] > 0 and len(c["session_p50_ms"]) == select.TIMING_SESSIONS for c in record["candidates"])
    largest = max(record["candidates"], key=lambda c: c["params"])
    assert largest["fits"] and record["chosen"] == largest["name"] == ctx.config.distill.student
    saved = tmp_path / "run" / "select" / "selection.json"
    assert json.loads(saved.read_text())["chosen"] == record["chosen"]

    # another budget: the same measurements (not re-timed), a new choice. With the fastest candidate's own p50 as
    # the budget, that candidate is the only one that fits (the times differ), so the rule must pick it.
    fastest = min(record["candidates"], key=lambda c: c["p50_ms"])
    assert sum(c["p50_ms"] == fastest["p50_ms"] for c in record["candidates"]) == 1
    config.distill.student, config.max_latency_ms = "auto", fastest["p50_ms"]
    ctx = RunContext(tmp_path / "run", config, quiet=True)
    again = select.select_student(ctx)
    assert [c["p50_ms"] for c in again["candidates"]] == [c["p50_ms"] for c in record["candidates"]]
    assert [c["name"] for c in again["candidates"] if c["fits"]] == [fastest["name"]]
    assert again["chosen"] == fastest["name"] == ctx.config.distill.student != record["chosen"]
    config.distill.student, config.max_latency_ms = "auto", fastest["p50_ms"] / 1000
    with pytest.raises(StageFailed, match=f"the fastest, {fastest['name']}"):
        select.select_student(RunContext(tmp_path / "run", config, quiet=True))
