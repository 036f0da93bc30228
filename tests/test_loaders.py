"""edgecompress.models.loaders: checkpoints, state dicts, factory files and TorchScript teachers."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from edgecompress.errors import BadInput
from edgecompress.models import Normalized, create
from edgecompress.models.loaders import apply_state_dict, build_model, load_factory, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

MEAN, STD = [0.286], [0.353]  # Fashion-MNIST's pixel statistics


@pytest.fixture(scope="module")
def images(fashion_small) -> torch.Tensor:
    """Eight real Fashion-MNIST images as [0, 1] floats, (8, 1, 28, 28)."""
    return torch.from_numpy(fashion_small[0][::37][:8]).unsqueeze(1).float() / 255


def _model(arch: str = "resnet_slim_050", seed: int = 0, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create(arch, 1, classes)
    # give BatchNorm statistics something other than their defaults, so a lost buffer would show
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- read_checkpoint ------------------------------------------------------------------------------------------

def test_read_checkpoint_bare_state_dict(tmp_path):
    state = _model().state_dict()
    torch.save(state, tmp_path / "sd.pt")
    got, meta = read_checkpoint(tmp_path / "sd.pt")
    assert _same_state(got, state)
    assert meta == {}


def test_read_checkpoint_wrapped_with_meta(tmp_path):
    state = _model().state_dict()
    meta = {"mean": MEAN, "std": STD, "command": "train_teacher resnet_slim_050"}
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "ckpt.pt")
    got, got_meta = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert _same_state(got, state)
    assert got_meta == meta | {"checkpoint_key": "state_dict"}


def test_read_checkpoint_wrapped_without_a_meta_dict(tmp_path):
    state = _model().state_dict()
    torch.save({"state_dict": state, "meta": "not a dict"}, tmp_path / "ckpt.pt")
    got, meta = read_checkpoint(tmp_path / "ckpt.pt")
    assert _same_state(got, state) and meta == {"checkpoint_key": "state_dict"}


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# The layouts training scripts write: DDP's `module.` prefix, torch.compile's `_orig_mod.`, torchvision's
# reference script ({"model", "model_ema" of an AveragedModel, "args": Namespace, ...}) and timm's train.py
# ({"state_dict", "state_dict_ema", "args": Namespace, "metric", ...}).
LAYOUTS = {
    "ddp-prefix": lambda sd, ema: _prefixed(sd, "module."),
    "compiled-ddp": lambda sd, ema: _prefixed(sd, "module._orig_mod."),
    "torchvision-reference": lambda sd, ema: {
        "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "epoch": 89,
        "args": argparse.Namespace(model="resnet_slim_050", lr=0.5, epochs=90),
        "model_ema": {**_prefixed(ema, "module."), "n_averaged": torch.tensor(7)}},
    "timm-train": lambda sd, ema: {
        "epoch": 299, "arch": "resnet_slim_050", "state_dict": sd, "state_dict_ema": ema, "version": 2,
        "args": argparse.Namespace(model="resnet_slim_050", lr=0.05), "metric": 91.2},
    "ema-only": lambda sd, ema: {"model_ema": {**_prefixed(ema, "module."), "n_averaged": torch.tensor(7)}},
}
LAYOUT_KEYS = {"ddp-prefix": None, "compiled-ddp": None, "torchvision-reference": "model",
               "timm-train": "state_dict", "ema-only": "model_ema"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_checkpoint_takes_the_training_scripts_layouts(tmp_path, layout):
    state, ema = _model(seed=0).state_dict(), _model(seed=1).state_dict()
    torch.save(LAYOUTS[layout](state, ema), tmp_path / "ckpt.pt")
    got, meta = read_checkpoint(tmp_path / "ckpt.pt")
    assert _same_state(got, ema if layout == "ema-only" else state)
    assert meta.get("checkpoint_key") == LAYOUT_KEYS[layout]


def test_read_checkpoint_still_refuses_other_objects_beside_the_weights(tmp_path):
    torch.save({"state_dict": _model().state_dict(), "args": Path("/etc/passwd")}, tmp_path / "ckpt.pt")
    with pytest.raises(BadInput, match="refused: it holds more than tensors"):
        read_checkpoint(tmp_path / "ckpt.pt")


def test_read_checkpoint_makes_half_precision_float32_and_keeps_integers(tmp_path):
    state = _model().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pt")
    got, _ = read_checkpoint(tmp_path / "half.pt")
    for k, v in got.items():
        assert v.dtype == (torch.float32 if state[k].is_floating_point() else state[k].dtype), k
    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert tracked and all(got[k].dtype == torch.int64 for k in tracked)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"w": "abc"}, {}, {"state_dict": {}}, torch.zeros(3)],
                         ids=["list", "dict-of-strings", "empty", "empty-wrapped", "tensor"])
def test_read_checkpoint_refuses_what_is_not_a_state_dict(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(BadInput, match="not a state dict"):
        read_checkpoint(tmp_path / "x.pt")


def test_read_checkpoint_missing_file(tmp_path):
    with pytest.raises(BadInput, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nothere.pt")


# --- apply_state_dict -----------------------------------------------------------------------------------------

def test_apply_state_dict_loads_a_fitting_state(images):
    source, target = _model(seed=0), _model(seed=1)
    assert not torch.allclose(source(images), target(images))
    apply_state_dict(target, source.state_dict(), "src.pt")
    assert _same_state(target.state_dict(), source.state_dict())
    assert torch.equal(target(images), source(images))


def test_apply_state_dict_reports_missing():
    state = _model().state_dict()
    gone = next(iter(state))
    del state[gone]
    with pytest.raises(BadInput, match=rf"weights src.pt do not fit the model: missing 1 \(e.g. {gone}\)"):
        apply_state_dict(_model(seed=1), state, "src.pt")


def test_apply_state_dict_reports_unexpected():
    state = _model().state_dict()
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(BadInput, match=r"unexpected 1 \(e.g. extra.weight\)"):
        apply_state_dict(_model(seed=1), state, "src.pt")


def test_apply_state_dict_reports_shape_mismatch():
    own = _model(classes=10)
    state = _model(classes=5).state_dict()  # same layers, a 5-way head
    with pytest.raises(BadInput) as info:
        apply_state_dict(own, state, "src.pt")
    message = str(info.value)
    assert "shape mismatch in" in message and "(5" in message and "(10" in message
    assert "missing" not in message and "unexpected" not in message


def test_apply_state_dict_leaves_the_model_alone_when_refused(images):
    model = _model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _model(seed=0).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(BadInput):
        apply_state_dict(model, state, "src.pt")
    assert _same_state(model.state_dict(), before)


# --- load_factory ---------------------------------------------------------------------------------------------

def test_load_factory_runs_only_the_named_file_and_function(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    (folder / "sibling.py").write_text(f"open({str(marks / 'sibling')!r}, 'w').close()\n")
    (folder / "__init__.py").write_text(f"open({str(marks / 'package')!r}, 'w').close()\n")
    (folder / "factory.py").write_text(
        "from edgecompress.models import create\n"
        f"open({str(marks / 'factory-module')!r}, 'w').close()\n\n"
        "def other():\n"
        f"    open({str(marks / 'other')!r}, 'w').close()\n\n"
        "def build():\n"
        f"    open({str(marks / 'build')!r}, 'w').close()\n"
        "    return create('resnet_slim_050', 1, 7)\n")
    model = load_factory(f"{folder / 'factory.py'}:build")
    assert isinstance(model, torch.nn.Module)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert sorted(p.name for p in marks.iterdir()) == ["build", "factory-module"]


@pytest.mark.parametrize("source, match", [
    ("raise RuntimeError('boom')\n", "importing .* failed: RuntimeError: boom"),
    ("def build():\n    raise ValueError('no')\n", r"build\(\) failed: ValueError: no"),
    ("def build():\n    return 42\n", "returned int, not a torch.nn.Module"),
    ("build = 3\n", "has no callable 'build'"),
], ids=["import-fails", "factory-fails", "not-a-module", "not-callable"])
def test_load_factory_turns_user_failures_into_bad_input(tmp_path, source, match):
    (tmp_path / "f.py").write_text(source)
    with pytest.raises(BadInput, match=match):
        load_factory(f"{tmp_path / 'f.py'}:build")


def test_load_factory_missing_file(tmp_path):
    with pytest.raises(BadInput, match="model file not found"):
        load_factory(f"{tmp_path / 'nothere.py'}:build")


# --- build_model ----------------------------------------------------------------------------------------------

def test_torchscript_teacher_gives_the_eager_logits(tmp_path, images):
    eager = _model()
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(eager), str(path))
    model, info = build_model(str(path), "", 1, 10, MEAN, STD, "teacher")
    assert info["kind"] == "torchscript"
    assert not model.training
    expected = Normalized(eager, MEAN, STD).eval()
    with torch.inference_mode():
        got, want = model(images), expected(images)
    assert got.shape == (8, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, eager(images)), "the normalisation was not applied"


def test_torchscript_teacher_refuses_separate_weights(tmp_path):
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(_model()), str(path))
    torch.save(_model().state_dict(), tmp_path / "w.pt")
    with pytest.raises(BadInput, match="carries its weights"):
        build_model(str(path), str(tmp_path / "w.pt"), 1, 10, MEAN, STD, "teacher")


def test_zoo_model_with_weights_gives_the_source_logits_and_meta_normalisation(tmp_path, images):
    source = _model(seed=3)
    meta = {"mean": [0.5], "std": [0.25], "command": "train"}
    torch.save({"state_dict": source.state_dict(), "meta": meta}, tmp_path / "w.pt")
    model, info = build_model("resnet_slim_050", str(tmp_path / "w.pt"), 1, 10, MEAN, STD, "teacher")
    assert info["kind"] == "zoo" and info["mean"] == [0.5] and info["std"] == [0.25]
    with torch.inference_mode():
        torch.testing.assert_close(model(images), Normalized(source, [0.5], [0.25]).eval()(images))


def test_factory_model_with_weights(tmp_path, images):
    (tmp_path / "f.py").write_text("from edgecompress.models import create\n"
                                   "def build():\n    return create('resnet_slim_050', 1, 10)\n")
    source = _model(seed=4)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model, info = build_model(f"{tmp_path / 'f.py'}:build", str(tmp_path / "w.pt"), 1, 10, MEAN, STD, "teacher")
    assert info["kind"] == "factory"
    with torch.inference_mode():
        torch.testing.assert_close(model(images), Normalized(source, MEAN, STD).eval()(images))


def test_unknown_spec_names_the_zoo(tmp_path):
    with pytest.raises(BadInput, match="--student 'resnet_nope' is neither a zoo model.*resnet_slim_050"):
        build_model("resnet_nope", "", 1, 10, MEAN, STD, "student")


def test_state_dict_given_as_torchscript_points_to_weights_option(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(BadInput, match="not a TorchScript file.*--teacher-weights"):
        build_model(str(tmp_path / "sd.pt"), "", 1, 10, MEAN, STD, "teacher")
