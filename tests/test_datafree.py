"""Data-free distillation (DeepInversion): its losses, its resumable synthesis, and a distill stage that never reads
a training image or label, proven with a data set whose training split raises when touched."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from edgecompress import compress, distill
from edgecompress.distill import methods as distillers
from edgecompress.distill import datafree
from edgecompress import data as datasets
from edgecompress.cli import main
from edgecompress.config import RunConfig
from edgecompress.errors import BadInput
from edgecompress.models.loaders import load_teacher, load_factory
from edgecompress.progress import NoBar
from edgecompress.runner import RunContext, run_stage

from conftest import write_factory

TINY = {"images": 20, "batch": 10, "iterations": 3}  # seconds, not minutes: tests check plumbing, not quality


def no_bar(items, label, length=None):
    return NoBar(items)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """The shipped Fashion-MNIST teacher (BatchNorm throughout); its checkpoint records its normalisation."""
    model, _ = load_teacher("resnet18_half", "", "fashion-mnist", 1, 10, [0.5], [0.5])
    return model


NORMALISATION = ([0.286], [0.353])  # the teacher's, as its checkpoint records them (rounded)


def test_bn_statistics_loss_matches_hand_computed_value():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    net = nn.Sequential(nn.Identity(), bn)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[1.0, 3.0]], [[-2.0, 2.0]]]])  # (2, 2, 1, 2)
    stats = datafree.BatchNormStatistics(net, first_multiplier=3.0)
    net(x)
    # channel 0: values 1, 3, 1, 3 -> mean 2, var 1; channel 1: 0, 0, -2, 2 -> mean 0, var 2
    expected = 3.0 * (math.hypot(2 - 0.5, 0 + 1.0) + math.hypot(1 - 2.0, 2 - 0.5))
    assert stats.loss().item() == pytest.approx(expected, rel=1e-6)
    stats.remove()
    net(x)
    assert stats.terms == [], "removed hooks still record"


def test_total_variation_matches_hand_computed_value():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # vertical differences: (1 - 0), (1 - 1) -> mean of squares 0.5; horizontal: (1 - 0), (1 - 1) -> 0.5
    assert datafree.total_variation(x).item() == pytest.approx(1.0)


def test_teacher_without_batchnorm_is_refused():
    with pytest.raises(BadInput, match="no BatchNorm2d layer"):
        datafree.BatchNormStatistics(nn.Sequential(nn.Conv2d(1, 2, 3)), 1.0)


def test_synthesis_moves_images_towards_targets_and_bn_statistics(teacher):
    """DeepInversion's objective falls: the teacher comes to classify the images as their targets."""
    labels = torch.arange(10)
    conf = datafree.DataFreeConfig(iterations=1)
    _, first = datafree.synthesize_batch(teacher, labels, (1, 28, 28), NORMALISATION, conf,
                                               torch.Generator().manual_seed(0))
    conf = datafree.DataFreeConfig(iterations=15)
    images, last = datafree.synthesize_batch(teacher, labels, (1, 28, 28), NORMALISATION, conf,
                                               torch.Generator().manual_seed(0))
    assert images.dtype == torch.uint8 and images.shape == (10, 1, 28, 28)
    assert last["ce"] < first["ce"] and last["bn"] < first["bn"]
    assert last["teacher_top1_on_targets"] >= 0.8
    assert all(p.requires_grad for p in teacher.parameters()), "the teacher's parameters must be left as found"


def test_synthesis_resumes_from_cached_batches_with_the_same_images(teacher, tmp_path):
    conf = datafree.DataFreeConfig(images=25, batch=10, iterations=2)
    args = (teacher, (1, 28, 28), 10, NORMALISATION, conf, 7)
    x, y, records = datafree.synthesize(*args, tmp_path / "a", "key", no_bar, lambda _: None)
    assert x.shape == (25, 1, 28, 28) and len(records) == 3
    assert torch.equal(y, torch.arange(25) % 10), "target classes cycle evenly through all classes"
    # a run killed after its first batch: only batch 0 is on disk; the resumed set equals the straight one
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "batch_0000.pt").write_bytes((tmp_path / "a" / "batch_0000.pt").read_bytes())
    messages = []
    x2, y2, _ = datafree.synthesize(*args, tmp_path / "b", "key", no_bar, messages.append)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert any("1/3 synthetic batches already made" in m for m in messages)
    # a batch cached under another key (other teacher or settings) is remade, not trusted
    stale = torch.load(tmp_path / "b" / "batch_0001.pt", weights_only=True)
    torch.save({**stale, "key": "other", "images": torch.zeros_like(stale["images"])}, tmp_path / "b" / "batch_0001.pt")
    x3, _, _ = datafree.synthesize(*args, tmp_path / "b", "key", no_bar, lambda _: None)
    assert torch.equal(x, x3)


def test_centred_blobs_start_dark_at_the_border_and_bright_in_the_middle():
    x = datafree.centred_blobs(32, (1, 28, 28), torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert x[:, :, 12:16, 12:16].mean() > 0.3 and x[:, :, :2, :].mean() < 0.05


def test_augment_keeps_shape_and_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    out = datafree.augment(x, 2, True, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    shifted = datafree.augment(x, 2, False, gen)  # shifts and flips only: each image keeps its pixels
    assert not torch.equal(shifted, x)
    assert torch.allclose(datafree.augment(x, 0, False, torch.Generator().manual_seed(1)).sum((1, 2, 3)), x.sum((1, 2, 3)))


def test_options_are_typed_and_typos_refused():
    opts = distillers.resolve_options("datafree", {"images": "40", "mixup": "false"})
    assert opts["images"] == 40 and opts["mixup"] is False
    with pytest.raises(BadInput, match="did you mean 'iterations'"):
        distillers.resolve_options("datafree", {"iteratons": "3"})


class TrainingSplitRead(AssertionError):
    pass


class EvalOnly(datasets.Dataset):
    """Fashion-MNIST whose training images and labels raise when anything reads them."""

    def __getattribute__(self, name):
        if name in ("x_train", "y_train"):
            raise TrainingSplitRead(f"the training split was read ({name})")
        return super().__getattribute__(name)


@pytest.fixture(scope="module")
def eval_only(fashion_small, fashion_small_test) -> EvalOnly:
    x, y = fashion_small
    x_test, y_test = fashion_small_test
    return EvalOnly("fashion-mnist", torch.from_numpy(x)[:, None], torch.from_numpy(y),
                    torch.from_numpy(x_test)[:, None], torch.from_numpy(y_test), list(datasets.FASHION_MNIST_CLASSES))


def context(tmp_path, method: str, eval_only: EvalOnly, monkeypatch) -> RunContext:
    """A run whose data loader hands out the guarded data set."""
    monkeypatch.setattr(datasets, "load", lambda *args, **kwargs: eval_only)
    config = RunConfig()
    config.distill.method, config.distill.student = method, "resnet_slim_050"
    config.distill.epochs, config.distill.batch = 2, 10
    config.distill.method_opts = dict(TINY) if method == "datafree" else {}
    return RunContext(tmp_path / "run", config.validate(), quiet=True)


def test_data_free_distill_stage_never_reads_a_training_image_or_label(tmp_path, eval_only, monkeypatch):
    ctx = context(tmp_path, "datafree", eval_only, monkeypatch)
    compress.check_inputs(ctx)  # the pipeline's up-front checks: teacher, student, data fit together
    artifact = run_stage(ctx, distill.STAGE)
    saved = torch.load(artifact, weights_only=True)
    assert saved["spec"]["classes"] == datasets.FASHION_MNIST_CLASSES
    assert saved["spec"]["mean"] == pytest.approx([0.2857704], rel=1e-5), "normalisation from the teacher checkpoint"
    history = json.loads((ctx.out / "distill" / "history.json").read_text())
    assert history["training_images_read"] == 0 and len(history["epochs"]) == 2 and len(history["synthesis"]) == 2
    assert sorted(p.name for p in (ctx.out / "distill" / "synthetic").iterdir()) == ["batch_0000.pt", "batch_0001.pt"]
    assert (ctx.out / "distill" / "synthetic.png").is_file()
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in ctx.teacher[0].parameters()), "handed back"
    # the rerun is skipped by fingerprint, which does not hash the training data either
    rerun = context(tmp_path, "datafree", eval_only, monkeypatch)
    assert run_stage(rerun, distill.STAGE) == artifact
    assert rerun.timings == {}


def test_the_guard_catches_a_method_that_reads_the_training_split(tmp_path, eval_only, monkeypatch):
    """The same guarded data set stops ordinary distillation: the test above could fail."""
    ctx = context(tmp_path, "hinton", eval_only, monkeypatch)
    with pytest.raises(TrainingSplitRead):
        run_stage(ctx, distill.STAGE)


def test_teacher_without_recorded_normalisation_is_refused_in_one_line(tmp_path, capsys, small_npz):
    teacher = write_factory(tmp_path / "t" / "teacher.py", 10)
    weights = tmp_path / "t" / "w.pt"
    torch.save(load_factory(teacher).state_dict(), weights)  # a plain state dict: no recorded normalisation
    code = main(["compress", "--method", "datafree", "--teacher", teacher, "--teacher-weights", str(weights),
                 "--data", str(small_npz), "--student", "resnet_slim_050", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "records none" in err and "--teacher-weights" in err



def test_several_teachers_are_refused(tmp_path, eval_only, monkeypatch):
    ctx = context(tmp_path, "datafree", eval_only, monkeypatch)
    ctx.config.teacher.extra = ["resnet18_half"]
    with pytest.raises(BadInput, match="uses one teacher but 2 were given"):
        run_stage(ctx, distill.STAGE)
