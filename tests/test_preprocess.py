"""The preprocessing contract end to end: a teacher trained with its own preprocessing (64x64 RGB from photos of
other sizes, resize 72 + center crop, ImageNet mean/std) keeps its accuracy through edgecompress."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgecompress import config as cfg
from edgecompress.cli import main
from edgecompress.runner import RunContext, write_run_toml

from testkit import FAST_VERIFY, lenient_target, write_photo_folder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEACHER_CODE = '''
from torch import nn


def build():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))
'''


def plain_pixels(path) -> torch.Tensor:
    """The user's own eval preprocessing, written with PIL alone: shorter side to 72, center crop 64, [0, 1],
    then ImageNet normalisation."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        w2, h2 = (72, int(72 * h / w)) if w <= h else (int(72 * w / h), 72)
        im = im.resize((w2, h2), Image.BILINEAR)
        left, top = int(round((w2 - 64) / 2.0)), int(round((h2 - 64) / 2.0))
        x = torch.from_numpy(np.asarray(im.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def folder_tensors(root):
    files = sorted(root.rglob("*.jpg"))
    classes = sorted(p.name for p in root.iterdir())
    return torch.stack([plain_pixels(f) for f in files]), torch.tensor([classes.index(f.parent.name) for f in files])


@pytest.fixture(scope="module")
def photo_teacher(tmp_path_factory, fashion_raw):
    """Photos in train/ and test/ folders, and a teacher trained on them with its own preprocessing."""
    base = tmp_path_factory.mktemp("photos")
    classes = [f"c{i}" for i in range(10)]
    pick = lambda y, n, skip=0: np.concatenate([np.flatnonzero(y == c)[skip:skip + n] for c in range(10)])  # noqa
    tr, te = pick(fashion_raw["y_train"], 100), pick(fashion_raw["y_test"], 30)
    write_photo_folder(base / "data" / "train", fashion_raw["x_train"][tr], fashion_raw["y_train"][tr], classes)
    write_photo_folder(base / "data" / "test", fashion_raw["x_test"][te], fashion_raw["y_test"][te], classes, seed=1)
    (base / "teacher.py").write_text(TEACHER_CODE)
    namespace = {}
    exec(compile(TEACHER_CODE, "teacher.py", "exec"), namespace)  # the test's own copy of the user's file
    torch.manual_seed(0)
    net = namespace["build"]()
    x, y = folder_tensors(base / "data" / "train")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(20):
        for idx in torch.randperm(len(y)).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(net.state_dict(), base / "teacher.pt")
    x_test, y_test = folder_tensors(base / "data" / "test")
    with torch.no_grad():
        plain_top1 = (net.eval()(x_test).argmax(1) == y_test).float().mean().item()
    return base, plain_top1


DECLARED = ["--input-size", "64", "--resize", "72", "--mean", ",".join(map(str, MEAN)), "--std",
            ",".join(map(str, STD)), "--channels", "rgb"]


@pytest.mark.slow
def test_declared_preprocessing_gives_the_teachers_own_accuracy(photo_teacher, tmp_path):
    base, plain_top1 = photo_teacher
    assert plain_top1 > 0.5  # the teacher learned something, so a preprocessing mismatch would show
    (tmp_path / "c.toml").write_text(FAST_VERIFY)
    code = main(["compress", "--teacher", f"{base / 'teacher.py'}:build", "--teacher-weights", str(base / "teacher.pt"),
                 "--data", str(base / "data"), "--student", "resnet_slim_050", "--epochs", "1", *DECLARED,
                 "--target", str(lenient_target(tmp_path / "t.toml")), "--config", str(tmp_path / "c.toml"),
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "verify" / "report.json").read_text())
    assert report["data"]["eval_images"] == 300
    assert abs(report["teacher"]["accuracy"] - plain_top1) <= 0.001, (report["teacher"]["accuracy"], plain_top1)
    pre = report["data"]["preprocess"]
    assert pre["size"] == [64, 64] and pre["resize"] == 72 and pre["channels"] == "rgb"
    assert pre["mean"] == pytest.approx(MEAN) and pre["sources"]["mean"] == "the config"
    build = json.loads((tmp_path / "run" / "export" / "test-cpu" / "build.json").read_text())
    steps = " | ".join(build["preprocess"]["steps"])
    assert "shorter side is 72" in steps and "center crop to 64x64" in steps and "do not normalise" in steps
    run_toml = cfg.read_toml(tmp_path / "run" / "run.toml")
    assert run_toml["preprocess"]["resize"] == 72 and run_toml["preprocess_resolved"]["size"] == [64, 64]


def test_undeclared_preprocessing_is_printed_with_where_it_came_from(photo_teacher, tmp_path, capsys):
    base, _ = photo_teacher
    config = cfg.RunConfig(data=str(base / "data"))
    config.teacher = cfg.TeacherConfig(f"{base / 'teacher.py'}:build", str(base / "teacher.pt"))
    config.preprocess.channels = "rgb"
    ctx = RunContext(tmp_path / "run", config.resolve_paths().validate())
    write_run_toml(ctx)
    line = capsys.readouterr().err.strip()
    assert line.startswith("[data] preprocessing:")
    assert "size from the data's first image" in line and "mean from measured on the training images" in line
    first = sorted((base / "data" / "train" / "c0").iterdir())[0]
    with Image.open(first) as im:  # the data's size is its first image's, as stored
        assert ctx.preprocess.size == (im.size[1], im.size[0])
