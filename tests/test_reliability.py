"""Killed runs resume and reach the same result; numerical faults stop with a clear message."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testkit import config_file, lenient_target, subset_npz, write_photo_folder

from edgecompress import data

pytestmark = pytest.mark.slow  # real subprocess runs, killed and resumed

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    fashion = data.load("fashion-mnist")
    npz = subset_npz(fashion, root / "fmnist.npz", 4000, 500)
    factory = root / "teacher.py"
    factory.write_text("import torch\nfrom edgecompress.models import create\n\n\n"
                       "def build():\n    torch.manual_seed(1)\n    return create('resnet_slim_050', 1, 10)\n")
    target, conf = lenient_target(root / "t.toml"), config_file(root / "c.toml", 4)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "edgecompress", "compress", "--teacher", f"{factory}:build", "--data", str(npz),
                "--student", "resnet_slim_100", "--target", str(target), "--config", str(conf), "--out", str(out)]

    straight = subprocess.run(command(root / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    return command, root / "straight"


def final_metrics(run: Path) -> tuple:
    history = json.loads((run / "distill" / "history.json").read_text())["epochs"]
    report = json.loads((run / "verify" / "report.json").read_text())
    return len(history), history[-1]["train_top1"], report["student_fp32"]["accuracy"], report["artifact"]["accuracy"]


def kill_when(command: list[str], appears: Path) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not appears.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun_matches(command, run: Path, straight: Path, expected_in_log: str) -> None:
    """Rerun the same command on `run`: it must finish, say `expected_in_log`, and end as the straight run did."""
    rerun = subprocess.run(command(run), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert expected_in_log in rerun.stderr
    assert final_metrics(run) == final_metrics(straight)


def test_sigkill_during_distillation_resumes_from_the_last_epoch_and_matches(setup, tmp_path):
    command, straight = setup
    run = tmp_path / "killed"
    kill_when(command(run), run / "distill" / "last.ckpt")
    assert not (run / "distill" / "student.pt").exists()
    assert not (run / "distill" / "done.json").exists()
    rerun_matches(command, run, straight, "resuming after epoch")


def test_sigkill_during_quantization_leaves_nothing_trusted_and_the_rerun_matches(setup, tmp_path):
    command, straight = setup
    run = tmp_path / "killed"
    kill_when(command(run), run / "quantize")
    assert (run / "distill" / "done.json").exists()
    assert not (run / "quantize" / "done.json").exists()
    assert not list(run.glob("export/*/done.json"))
    rerun_matches(command, run, straight, "[distill] up to date, skipped")


def test_a_diverging_loss_stops_with_a_clear_message(setup, tmp_path):
    command, _ = setup
    args = command(tmp_path / "nan")
    conf = tmp_path / "nan.toml"
    conf.write_text("[distill]\nepochs = 2\nlr = 1e30\n")
    args[args.index("--config") + 1] = str(conf)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the distillation loss became") and "lower the learning rate" in last
    assert "Traceback" not in proc.stderr


def test_sigint_stops_with_one_line_and_the_rerun_resumes(setup, tmp_path):
    command, straight = setup
    run = tmp_path / "interrupted"
    # Ctrl-C as in a terminal: a test process started in the background (nohup, `&` in a script) has SIGINT
    # ignored, which its children would inherit, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(command(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "distill" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: finished stages and epochs are kept")
    assert "Traceback" not in err
    rerun_matches(command, run, straight, "resuming after epoch")


@pytest.fixture(scope="module")
def photo_setup(tmp_path_factory, fashion_raw):
    """A streamed photo folder (JPEGs of mixed sizes, train/ and test/) distilled with crop-flip augmentation
    and the FKD soft-label cache."""
    root = tmp_path_factory.mktemp("photo-reliability")
    classes = [f"c{i}" for i in range(10)]
    for split, per_class in (("train", 120), ("test", 30)):
        x, y = fashion_raw[f"x_{split}"], fashion_raw[f"y_{split}"]
        idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        write_photo_folder(root / "photos" / split, x[idx], y[idx], classes, sizes=(36, 56))
    factory = root / "teacher.py"
    factory.write_text("import torch\nfrom edgecompress.models import create\n\n\n"
                       "def build():\n    torch.manual_seed(1)\n    return create('resnet_slim_050', 3, 10)\n")
    target = lenient_target(root / "t.toml")
    conf = config_file(root / "c.toml", 3)
    conf.write_text(conf.read_text() + 'augment = "crop-flip"\n')

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "edgecompress", "compress", "--teacher", f"{factory}:build", "--data",
                str(root / "photos"), "--input-size", "32", "--resize", "36", "--student", "resnet_slim_050",
                "--target", str(target), "--config", str(conf), "--out", str(out)]

    straight = subprocess.run(command(root / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    return command, root / "straight"


def test_sigkill_during_a_streamed_augmented_epoch_resumes_and_matches(photo_setup, tmp_path):
    command, straight = photo_setup
    history = json.loads((straight / "distill" / "history.json").read_text())["epochs"]
    assert [e["teacher"] for e in history] == ["online"] * 3  # recorded into the FKD cache as it ran
    run = tmp_path / "killed"
    kill_when(command(run), run / "distill" / "last.ckpt")  # the kill lands in epoch 2
    assert (run / "distill" / "soft_labels" / "epoch-1").is_dir()
    assert not (run / "distill" / "student.pt").exists()
    rerun_matches(command, run, straight, "resuming after epoch")


def test_sigkill_while_decoding_the_folder_leaves_no_pack_and_the_rerun_matches(photo_setup, tmp_path):
    command, straight = photo_setup
    run = tmp_path / "killed"
    kill_when(command(run), run / "data")
    assert not list((run / "data").glob("images-*.u8"))  # only a temporary file, if anything
    rerun_matches(command, run, straight, "[distill] running")
