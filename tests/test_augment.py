"""Augmentation on batches (data/augment.py) and the FKD soft-label cache (data/softlabels.py)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecompress import data
from edgecompress.data import augment
from edgecompress.data.softlabels import SoftLabelCache
from edgecompress.models.loaders import WEIGHTS_DIR


def real_batch(fashion_small, count=8):
    x = torch.from_numpy(fashion_small[0][:count]).float().div(255).unsqueeze(1)
    return x.expand(-1, 3, -1, -1).contiguous()


def test_crop_params_are_fixed_by_seed_and_epoch_and_follow_random_resized_crop():
    a = augment.crop_params(5000, 64, 48, "crop-flip", (0.35, 1.0), seed=3, epoch=2)
    assert torch.equal(a, augment.crop_params(5000, 64, 48, "crop-flip", (0.35, 1.0), seed=3, epoch=2))
    assert not torch.equal(a, augment.crop_params(5000, 64, 48, "crop-flip", (0.35, 1.0), seed=3, epoch=3))
    top, left, h, w, flip = a.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = h * w / (64 * 48)
    assert area.min() > 0.3 and area.max() <= 1.0  # 0.35 of the area, less the rounding of each side
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert 0.45 < flip.mean() < 0.55
    flips = augment.crop_params(100, 28, 28, "flip", (0.35, 1.0), 0, 0)
    assert (flips[:, 2] == 28).all() and (flips[:, 3] == 28).all() and set(flips[:, 4].tolist()) == {0.0, 1.0}


def test_a_flip_is_the_mirror_image(fashion_small):
    x = real_batch(fashion_small)
    params = torch.zeros(len(x), 5)
    params[:, 2:4] = 28
    params[::2, 4] = 1
    out = augment.apply(x, params)
    assert torch.equal(out[::2], x[::2].flip(3)) and torch.equal(out[1::2], x[1::2])


def test_a_crop_is_the_region_resized_to_the_input_size(fashion_small):
    """Independent reference: slice the box, resize it with F.interpolate (bilinear, align_corners=False), as
    torchvision's RandomResizedCrop does on tensors."""
    x = real_batch(fashion_small, 4)
    boxes = torch.tensor([[4., 6., 14., 14., 0.], [0., 0., 28., 28., 0.], [10., 2., 16., 20., 1.], [3., 5., 21., 7., 0.]])
    out = augment.apply(x, boxes)
    for i, (top, left, h, w, flip) in enumerate(boxes.tolist()):
        region = x[i:i + 1, :, int(top):int(top + h), int(left):int(left + w)]
        expected = F.interpolate(region, size=(28, 28), mode="bilinear", align_corners=False)
        if flip:
            expected = expected.flip(3)
        assert torch.allclose(out[i], expected[0], atol=1e-6)


def test_soft_labels_replay_exactly_with_every_class_kept(tmp_path):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 10, generator=gen) * 4
    cache = SoftLabelCache(tmp_path, "k1", 50, 10, teachers=2, topk=16)
    assert not cache.ready(0)
    epoch = cache.create(0)
    params = torch.rand(50, 5, generator=gen)
    for idx in torch.randperm(50, generator=gen).split(16):
        epoch.record(idx, params[idx], logits[:, idx])
    epoch.finish()
    assert cache.ready(0) and not cache.ready(1)
    assert not SoftLabelCache(tmp_path, "another key", 50, 10, 2).ready(0)
    replay = cache.open(0)
    idx = torch.tensor([7, 3, 49, 0])
    assert torch.equal(replay.logits(idx), logits[:, idx])  # bit-exact: replayed training is online training
    assert np.array_equal(np.asarray(replay.params)[idx.numpy()], params[idx].numpy())


def test_soft_labels_with_top_k_spread_the_rest_evenly_as_fkd(tmp_path):
    """FKD's marginal smoothing, written from the paper: the top-k probabilities kept, the remaining mass
    1 - sum(top-k) shared equally by the other C - k classes."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 20, 100, generator=gen) * 3
    cache = SoftLabelCache(tmp_path, "k", 20, 100, teachers=1, topk=5)
    epoch = cache.create(0)
    epoch.record(torch.arange(20), torch.zeros(20, 5), logits)
    epoch.finish()
    replayed = cache.open(0).logits(torch.arange(20)).softmax(-1)
    p = logits.softmax(-1)
    top = p.topk(5, dim=-1)
    expected = ((1 - top.values.sum(-1, keepdim=True)) / 95).expand(-1, -1, 100).clone()
    expected.scatter_(-1, top.indices, top.values)
    assert torch.allclose(replayed, expected, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(replayed.sum(-1).mean()), 1.0, rel_tol=1e-5)


def test_a_killed_epoch_leaves_no_cache_behind(tmp_path):
    cache = SoftLabelCache(tmp_path, "k", 10, 10, teachers=1)
    epoch = cache.create(0)
    epoch.record(torch.arange(5), torch.zeros(5, 5), torch.randn(1, 5, 10))
    assert epoch.missing().tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="5 images have no soft labels"):
        epoch.finish()
    del epoch  # killed before finish()
    assert not cache.ready(0)
    again = cache.create(0)  # the next run starts the epoch again
    again.record(torch.arange(10), torch.zeros(10, 5), torch.randn(1, 10, 10))
    again.finish()
    assert cache.ready(0)


def test_distill_records_the_fkd_cache_then_replays_it_without_the_teacher(small_npz, tmp_path):
    from edgecompress import config as cfg
    from edgecompress import distill
    from edgecompress.data import augment as aug
    from edgecompress.runner import RunContext, run_stage

    config = cfg.RunConfig(data=str(small_npz))
    config.distill.student, config.distill.epochs, config.distill.batch = "resnet_slim_050", 2, 50
    config.distill.augment, config.distill.precision = "crop-flip", "fp32"
    config.teacher = cfg.TeacherConfig("resnet18_half", str(WEIGHTS_DIR / "resnet18_half-fashion-mnist.pt"))
    ctx = RunContext(tmp_path / "run", config.validate(), quiet=True)
    run_stage(ctx, distill.STAGE)
    first = json.loads((tmp_path / "run" / "distill" / "history.json").read_text())["epochs"]
    assert [e["teacher"] for e in first] == ["online", "online"]  # recorded while the teacher ran

    cache = SoftLabelCache(tmp_path / "run" / "distill" / "soft_labels", distill.soft_label_key(ctx),
                           len(ctx.data.y_train), 10, 1)
    assert cache.ready(0) and cache.ready(1)
    replay = cache.open(1)
    idx = torch.tensor([0, 17, 99, 249])
    views = torch.from_numpy(np.array(replay.params))[idx]
    x = data.to_float(aug.apply(ctx.data.x_train[idx], views))  # as the batches are made: uint8, then float
    with torch.no_grad():
        expected = ctx.teacher[0](x)
    assert torch.allclose(replay.logits(idx)[0], expected, atol=1e-4)  # the teacher's answers on those very views

    rerun = RunContext(tmp_path / "run", config, quiet=True, force=True)
    run_stage(rerun, distill.STAGE)
    second = json.loads((tmp_path / "run" / "distill" / "history.json").read_text())["epochs"]
    assert [e["teacher"] for e in second] == ["fkd cache", "fkd cache"]
    assert second[-1]["train_top1"] == first[-1]["train_top1"]  # replay is exact: the same training


def test_views_of_uint8_images_round_the_float_ones(fashion_small):
    """The batch source crops and resizes uint8 pixels (half the cost): within one grey level of float pixels."""
    x = torch.from_numpy(fashion_small[0][:16]).unsqueeze(1)
    params = augment.crop_params(16, 28, 28, "crop-flip", (0.35, 1.0), seed=0, epoch=0)
    from_uint8 = augment.apply(x, params)
    from_float = augment.apply(x.float(), params)
    assert from_uint8.dtype == torch.uint8 and (from_uint8.float() - from_float).abs().max() <= 1.0
