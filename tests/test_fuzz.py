"""Fuzzing the parsers users feed: target TOML, run config, checkpoints, ONNX files.

Each may be accepted or refused with BadInput (exit 2, one line); nothing else may escape.
A fixed example budget and derandomised search keep CI deterministic.
"""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompress import config as cfg
from edgecompress import targets
from edgecompress.errors import BadInput
from edgecompress.models import create
from edgecompress.models.loaders import OnnxTeacher, read_checkpoint

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 100), max_size=3),
                    st.lists(st.text(max_size=6), max_size=3))
target_keys = st.sampled_from([f.name for f in __import__("dataclasses").fields(targets.Target)] + ["bogus", "thread"])
budget_keys = st.sampled_from(["max_accuracy_drop", "max_latency_ms", "min_speedup", "max_drop"])


@FUZZ
@given(st.dictionaries(target_keys, scalars, max_size=12), st.dictionaries(budget_keys, scalars, max_size=4))
def test_target_toml_is_loaded_or_refused_with_one_message(tmp_path, table, budgets):
    text = cfg.to_toml({**table, "budgets": budgets})
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    try:
        loaded = targets.load(str(path))
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert loaded.name and loaded.threads >= 1


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_as_target_toml(tmp_path, text):
    path = tmp_path / "text.toml"
    path.write_text(text)
    with pytest.raises(BadInput):
        targets.load(str(path))


config_tables = st.dictionaries(
    st.sampled_from(["data", "target", "seed", "teacher", "distill", "quantize", "verify", "extra"]),
    st.one_of(scalars, st.dictionaries(
        st.sampled_from(["spec", "weights", "student", "epochs", "lr", "alpha", "batch", "temperature", "method",
                         "precision", "calibration_size", "calibration_method", "warmup_runs", "eval_batch", "epoc"]),
        scalars, max_size=5)),
    max_size=6)


@FUZZ
@given(config_tables)
def test_run_config_is_loaded_or_refused_with_one_message(raw):
    try:
        loaded = cfg.from_dict(raw, "fuzz.toml")
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert loaded.distill.epochs > 0 and 0 <= loaded.distill.alpha <= 1


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(create("resnet_slim_050", 1, 10).state_dict(), path)
    return path.read_bytes()


mutations = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8)


def mutate(blob: bytes, edits, cut: int) -> bytes:
    data = bytearray(blob[: max(1, len(blob) - cut)])
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data)


@FUZZ
@given(mutations, st.integers(0, 4000))
def test_mutated_checkpoint_is_loaded_or_refused(tmp_path, checkpoint_bytes, edits, cut):
    path = tmp_path / "mutated.pt"
    path.write_bytes(mutate(checkpoint_bytes, edits, cut))
    try:
        state, _ = read_checkpoint(path)
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(create("resnet_slim_050", 1, 10).eval(), (torch.zeros(1, 1, 28, 28),), str(path),
                          dynamo=False, input_names=["input"], output_names=["logits"])
    return path.read_bytes()


@FUZZ
@given(mutations, st.integers(0, 20000))
def test_mutated_onnx_teacher_is_loaded_or_refused(tmp_path, onnx_bytes, edits, cut):
    path = tmp_path / "mutated.onnx"
    path.write_bytes(mutate(onnx_bytes, edits, cut))
    try:
        teacher = OnnxTeacher(path, [0.5], [0.25])
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert teacher.sessions
