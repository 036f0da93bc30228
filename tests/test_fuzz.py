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

def loaded_or_refused(load, source):
    """`load(source)`'s result, or None when it refused the file with a one-line BadInput (anything else fails)."""
    try:
        return load(source)
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


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
    loaded = loaded_or_refused(lambda p: targets.load(str(p)), path)
    assert loaded is None or (loaded.name and loaded.threads >= 1)


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
    loaded = loaded_or_refused(lambda r: cfg.from_dict(r, "fuzz.toml"), raw)
    assert loaded is None or (loaded.distill.epochs > 0 and 0 <= loaded.distill.alpha <= 1)


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
    loaded = loaded_or_refused(read_checkpoint, path)
    assert loaded is None or all(isinstance(v, torch.Tensor) for v in loaded[0].values())


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
    teacher = loaded_or_refused(lambda p: OnnxTeacher(p, [0.5], [0.25]), path)
    assert teacher is None or teacher.sessions
