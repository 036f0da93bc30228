"""Bad input to `edgecompress compress`: exit 2, one `error: ` line on stderr naming the problem, no traceback,
nothing written outside --out, and all of it before any distillation starts."""
from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompress.cli import main
from edgecompress.models import create

from conftest import write_factory

STUDENT = ["--student", "resnet_slim_050"]


@dataclass
class Where:
    tmp: Path     # the test's tmp_path
    inputs: Path  # files the test makes as input
    cwd: Path     # the working directory during the run: must stay empty
    out: Path     # --out


@pytest.fixture
def where(tmp_path, monkeypatch) -> Where:
    w = Where(tmp_path, tmp_path / "in", tmp_path / "cwd", tmp_path / "run")
    w.inputs.mkdir()
    w.cwd.mkdir()
    monkeypatch.chdir(w.cwd)
    return w


def tree(root: Path, exclude: Path) -> set[str]:
    """Every path under root except `exclude` and what lies in it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p != exclude and exclude not in p.parents}


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and err == lines[0] + "\n", f"stderr is not exactly one line:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    assert "Traceback" not in err
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def run_bad(where: Where, capsys, args: list[str], *needles: str) -> str:
    before = tree(where.tmp, where.out)
    code = main(["compress", *args, "--out", str(where.out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    line = assert_one_error_line(captured.err, *needles)
    assert "Traceback" not in captured.out
    assert captured.out == "", "bad input should print nothing on stdout"
    assert list(where.cwd.iterdir()) == [], "something was written to the working directory"
    assert tree(where.tmp, where.out) == before, "something was written outside --out"
    return line


# --- cases: each builds its input in `where.inputs` and returns (args, needles) -----------------------------

def case_missing_data_file(w, npz, teacher):
    return ["--data", str(w.inputs / "nothere.npz"), "--teacher", teacher, *STUDENT], ["data not found", "nothere.npz"]


def case_missing_data_folder(w, npz, teacher):
    return ["--data", str(w.inputs / "no-such-folder"), "--teacher", teacher, *STUDENT], \
        ["data not found", "no-such-folder"]


def case_unknown_target(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--target", "nope"], \
        ["unknown target 'nope'", "x86-cpu"]


def case_missing_target_toml(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--target", str(w.inputs / "mine.toml")], \
        ["unknown target", "mine.toml"]


def case_folder_with_empty_class_dirs(w, npz, teacher):
    folder = w.inputs / "images"
    for c in ("coat", "shirt"):
        (folder / c).mkdir(parents=True)
    return ["--data", str(folder), "--teacher", teacher, *STUDENT], ["no images in", str(folder)]


def case_folder_with_only_txt(w, npz, teacher):
    folder = w.inputs / "images"
    for c in ("coat", "shirt"):
        (folder / c).mkdir(parents=True)
        (folder / c / "readme.txt").write_text("not an image\n")
    return ["--data", str(folder), "--teacher", teacher, *STUDENT], ["no images in", str(folder)]


def case_folder_with_images_but_no_class_dirs(w, npz, teacher):
    from PIL import Image

    folder = w.inputs / "flat"
    folder.mkdir()
    x = np.load(npz)["x"]
    for i in range(4):
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    return ["--data", str(folder), "--teacher", teacher, *STUDENT], ["no images in", "one sub-folder per class"]


def case_teacher_class_count_mismatch(w, npz, teacher):
    spec = write_factory(w.inputs / "teacher5.py", 5)
    return ["--data", str(npz), "--teacher", spec, *STUDENT], ["teacher outputs 5 classes", "has 10"]


def case_teacher_input_shape_mismatch(w, npz, teacher):
    spec = w.inputs / "rgb_teacher.py"
    spec.write_text("from edgecompress.models import create\n\n\ndef build():\n    return create('resnet_slim_050', 3, 10)\n")
    return ["--data", str(npz), "--teacher", f"{spec}:build", *STUDENT], ["cannot take the data's images", "(1, 28, 28)",
                                                                       "declare --channels rgb"]


def case_factory_file_calling_sys_exit_on_import(w, npz, teacher):
    spec = w.inputs / "exits.py"
    spec.write_text("import sys\n\nsys.exit(0)\n\n\ndef build():\n    return None\n")
    return ["--data", str(npz), "--teacher", f"{spec}:build", *STUDENT], ["importing", "exits.py",
                                                                       "it called sys.exit(0)"]


def case_factory_raising_a_base_exception(w, npz, teacher):
    spec = w.inputs / "base.py"
    spec.write_text("class Stop(BaseException):\n    pass\n\n\ndef build():\n    raise Stop('from the factory')\n")
    return ["--data", str(npz), "--teacher", f"{spec}:build", *STUDENT], ["build() failed", "Stop: from the factory"]


def _photo_folder(w, npz, count=20):
    from PIL import Image

    x, y = np.load(npz)["x"], np.load(npz)["y"]
    for i in range(count):
        folder = w.inputs / "photos" / f"c{int(y[i * 10]) % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i * 10]).convert("RGB").save(folder / f"{i}.jpg")
    return w.inputs / "photos"


def case_no_readable_image_in_folder(w, npz, teacher):
    folder = _photo_folder(w, npz, 4)
    for f in folder.rglob("*.jpg"):
        f.write_bytes(b"\xff\xd8 not really a jpeg")
    return ["--data", str(folder), "--teacher", teacher, *STUDENT, "--skip-bad-images"], \
        ["no readable image among the 4 files"]


def case_teacher_too_small_for_the_size(w, npz, teacher):
    spec = w.inputs / "fixed.py"
    spec.write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    return ["--data", str(npz), "--teacher", f"{spec}:build", *STUDENT, "--input-size", "32"], \
        ["cannot take the data's images of shape (1, 32, 32)", "--input-size"]


def case_mean_of_the_wrong_length(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--mean", "0.5,0.5", "--std", "0.2,0.2"], \
        ["one value per channel (1 or 3)"]


def case_mean_for_rgb_on_grey_channels(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--channels", "grey", "--mean", "0.5,0.5,0.5",
            "--std", "0.2,0.2,0.2"], ["preprocess.mean has 3 values but channels = 'grey' has 1"]


def case_csv_naming_missing_files(w, npz, teacher):
    listing = w.inputs / "list.csv"
    listing.write_text("path,label\na/1.jpg,cat\na/2.jpg,dog\nb/3.jpg,cat\nb/4.jpg,dog\n")
    return ["--data", str(listing), "--teacher", teacher, *STUDENT], ["4 listed images do not exist", "a/1.jpg, a/2.jpg"]


def case_npz_with_an_object_array(w, npz, teacher):
    path = w.inputs / "objects.npz"
    np.savez(path, x=np.array([{"not": "pixels"}] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    return ["--data", str(path), "--teacher", teacher, *STUDENT], ["array x holds Python objects"]


def case_npz_label_of_a_billion(w, npz, teacher):
    arrays = np.load(npz)
    y = arrays["y"].copy()
    y[5] = 10**9
    path = w.inputs / "labels.npz"
    np.savez(path, x=arrays["x"], y=y)
    return ["--data", str(path), "--teacher", teacher, *STUDENT], ["label 1000000000", "more than 100000 classes"]


def case_npz_header_claiming_a_huge_shape(w, npz, teacher):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**13,)})
    path = w.inputs / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("y.npy", header.getvalue())
    return ["--data", str(path), "--teacher", teacher, *STUDENT], ["claims shape (10000000000000,)"]


def case_npz_with_a_bad_crc(w, npz, teacher):
    import zipfile

    path = w.inputs / "crc.npz"
    with zipfile.ZipFile(path, "w") as archive:  # stored, not compressed: the flipped byte stays a pixel byte
        for name in ("x", "y"):
            buffer = __import__("io").BytesIO()
            np.save(buffer, np.load(npz)[name])
            archive.writestr(f"{name}.npy", buffer.getvalue())
    raw = bytearray(path.read_bytes())
    raw[400] ^= 0xFF
    path.write_bytes(bytes(raw))
    return ["--data", str(path), "--teacher", teacher, *STUDENT], ["cannot read", "crc.npz"]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with no pixel data: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def case_decompression_bomb_png(w, npz, teacher):
    folder = _photo_folder(w, npz, 6)
    bomb = _png_header_only(sorted(folder.iterdir())[0] / "000-bomb.png", 30000, 30000)
    return ["--data", str(folder), "--teacher", teacher, *STUDENT, "--input-size", "28"], \
        [str(bomb), "30000x30000 pixels is over the limit"]


def case_first_image_too_large_without_a_size(w, npz, teacher):
    from PIL import Image

    folder = _photo_folder(w, npz, 6)
    first = sorted(folder.iterdir())[0] / "!large.png"  # sorts first in its class
    Image.new("RGB", (2000, 1500), (90, 90, 90)).save(first)
    spec = w.inputs / "rgb_teacher.py"  # a factory teacher: no recorded input size
    spec.write_text("from edgecompress.models import create\n\n\ndef build():\n    return create('resnet_slim_050', 3, 2)\n")
    return ["--data", str(folder), "--teacher", f"{spec}:build", *STUDENT], ["is 2000x1500", "--input-size 224"]


def case_bad_input_size(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--input-size", "224y160"], ["--input-size", "224x160"]


def case_truncated_onnx_teacher(w, npz, teacher):
    import torch

    path = w.inputs / "teacher.onnx"
    from edgecompress.models import create

    torch.onnx.export(create("resnet_slim_050", 1, 10).eval(), (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False)
    path.write_bytes(path.read_bytes()[:300])
    return ["--data", str(npz), "--teacher", str(path), *STUDENT], [str(path), "not a valid ONNX model"]


def case_config_key_typo(w, npz, teacher):
    conf = w.inputs / "c.toml"
    conf.write_text("[distill]\nepocs = 3\n")
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--config", str(conf)], \
        ["unknown key distill.epocs", "did you mean distill.epochs"]


def case_one_class_data(w, npz, teacher):
    x = np.load(npz)["x"]
    path = w.inputs / "one.npz"
    np.savez(path, x=x, y=np.zeros(len(x), dtype=np.int64))
    return ["--data", str(path), "--teacher", teacher, *STUDENT], ["1 class", "at least 2"]


def case_corrupt_image_in_folder(w, npz, teacher):
    from PIL import Image

    x, y = np.load(npz)["x"], np.load(npz)["y"]
    for i in range(40):
        folder = w.inputs / "images" / f"c{y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    bad = next((w.inputs / "images").rglob("*.png"))
    bad.write_bytes(b"\x89PNG broken")
    return ["--data", str(w.inputs / "images"), "--teacher", teacher, *STUDENT], [str(bad), "--skip-bad-images"]


def case_zoo_teacher_without_weights(w, npz, teacher):
    return ["--data", str(npz), "--teacher", "resnet18_half", *STUDENT], \
        ["resnet18_half", "no shipped weights", "--teacher-weights"]


def case_missing_factory_file(w, npz, teacher):
    return ["--data", str(npz), "--teacher", str(w.inputs / "nothere.py") + ":build", *STUDENT], \
        ["model file not found", "nothere.py"]


def case_factory_without_that_function(w, npz, teacher):
    spec = write_factory(w.inputs / "t.py", 10).replace(":build", ":nosuch")
    return ["--data", str(npz), "--teacher", spec, *STUDENT], ["no callable 'nosuch'"]


def case_torchscript_path_is_a_state_dict(w, npz, teacher):
    path = w.inputs / "teacher_sd.pt"
    torch.save(create("resnet_slim_050", 1, 10).state_dict(), path)
    return ["--data", str(npz), "--teacher", str(path), *STUDENT], ["not a TorchScript file", "--teacher-weights"]


def _weights(w, teacher, npz, name: str, write) -> tuple[list[str], Path]:
    path = w.inputs / name
    write(path)
    return ["--data", str(npz), "--teacher", teacher, "--teacher-weights", str(path), *STUDENT], path


def case_ckpt_list_of_ints(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "list.pt", lambda p: torch.save([1, 2, 3], p))
    return args, ["not a state dict", path.name]


def case_ckpt_dict_of_strings(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "strings.pt", lambda p: torch.save({"conv.weight": "abc"}, p))
    return args, ["not a state dict", path.name]


def case_ckpt_empty_dict(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "empty_dict.pt", lambda p: torch.save({}, p))
    return args, ["not a state dict", path.name]


def case_ckpt_random_bytes(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "random.pt", lambda p: p.write_bytes(random.Random(0).randbytes(1000)))
    return args, [path.name, "torch.save(model.state_dict(), path)"]


def case_ckpt_text_file(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "notes.pt", lambda p: p.write_text("hello world\n"))
    return args, [path.name]


def case_ckpt_empty_file(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "empty.pt", lambda p: p.write_bytes(b""))
    return args, [path.name]


def case_ckpt_meta_mean_is_a_string(w, npz, teacher):
    def write(p):
        torch.save({"state_dict": create("resnet_slim_050", 1, 10).state_dict(), "meta": {"mean": "0.5", "std": [1.0]}},
                   p)
    args, path = _weights(w, teacher, npz, "meta.pt", write)
    return args, [path.name, "meta.mean must be a list of numbers"]


def case_ckpt_tensors_on_the_meta_device(w, npz, teacher):
    def write(p):
        with torch.device("meta"):
            torch.save(create("resnet_slim_050", 1, 10).state_dict(), p)
    args, path = _weights(w, teacher, npz, "hollow.pt", write)
    return args, [path.name, "has no data (it lives on the meta device)"]


def case_ckpt_that_expands_to_hundreds_of_megabytes(w, npz, teacher):
    """A 200 KB zip whose one deflated entry unpacks to 200 MB: never a torch.save file."""
    import zipfile

    def write(p):
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("archive/data.pkl", b"\0" * (200 << 20))
    args, path = _weights(w, teacher, npz, "bomb.pt", write)
    return args, [path.name, "torch.save writes uncompressed entries"]


def case_onnx_teacher_with_sparse_external_data(w, npz, teacher):
    """A tiny ONNX file whose weight lives in a 3 GB external file that is all holes."""
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10, 784], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(3 << 30))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"],
                                                                                        transB=1)],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [weight])
    path = w.inputs / "teacher.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with open(w.inputs / "w.bin", "wb") as f:
        f.truncate(3 << 30)
    return ["--data", str(npz), "--teacher", str(path), *STUDENT], ["w.bin", "mostly holes"]


def case_class_folder_named_in_bytes_that_are_not_utf8(w, npz, teacher):
    from PIL import Image

    folder = w.inputs / "images"
    x = np.load(npz)["x"]
    for i, name in enumerate((b"coat", b"caf\xe9")):  # latin-1, not UTF-8
        sub = Path(os.fsdecode(bytes(folder) + b"/" + name))
        sub.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(x[3 * i + j]).save(sub / f"{j}.png")
    return ["--data", str(folder), "--teacher", teacher, *STUDENT], ["is not named in UTF-8", "rename the folder"]


def _truncated(p: Path) -> None:
    torch.save(create("resnet_slim_050", 1, 10).state_dict(), p)
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])


def case_ckpt_truncated(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "truncated.pt", _truncated)
    return args, ["not a readable PyTorch checkpoint", path.name]


def case_ckpt_wrong_architecture(w, npz, teacher):
    args, path = _weights(w, teacher, npz, "other.pt",
                          lambda p: torch.save(create("resnet_slim_100", 1, 10).state_dict(), p))
    return args, ["do not fit the model", "shape mismatch"]


def case_epochs_zero(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--epochs", "0"], ["--epochs must be > 0", "got 0"]


def case_epochs_negative(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--epochs", "-3"], ["--epochs must be > 0", "got -3"]


def case_epochs_not_a_number(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--epochs", "many"], ["--epochs", "many"]


def case_unknown_option(w, npz, teacher):
    return ["--data", str(npz), "--teacher", teacher, *STUDENT, "--bogus"], ["--bogus"]


CASES = [
    case_missing_data_file, case_missing_data_folder, case_unknown_target, case_missing_target_toml,
    case_folder_with_empty_class_dirs, case_folder_with_only_txt, case_folder_with_images_but_no_class_dirs,
    case_teacher_class_count_mismatch, case_zoo_teacher_without_weights, case_missing_factory_file,
    case_factory_without_that_function, case_torchscript_path_is_a_state_dict,
    case_ckpt_list_of_ints, case_ckpt_dict_of_strings, case_ckpt_empty_dict, case_ckpt_random_bytes,
    case_ckpt_text_file, case_ckpt_empty_file, case_ckpt_truncated, case_ckpt_wrong_architecture,
    case_epochs_zero, case_epochs_negative, case_epochs_not_a_number, case_unknown_option,
    case_teacher_input_shape_mismatch, case_truncated_onnx_teacher, case_config_key_typo, case_one_class_data,
    case_corrupt_image_in_folder, case_no_readable_image_in_folder, case_teacher_too_small_for_the_size,
    case_mean_of_the_wrong_length, case_mean_for_rgb_on_grey_channels, case_csv_naming_missing_files,
    case_bad_input_size, case_npz_with_an_object_array, case_npz_label_of_a_billion,
    case_npz_header_claiming_a_huge_shape, case_npz_with_a_bad_crc, case_decompression_bomb_png,
    case_first_image_too_large_without_a_size, case_factory_file_calling_sys_exit_on_import,
    case_factory_raising_a_base_exception, case_ckpt_meta_mean_is_a_string, case_ckpt_tensors_on_the_meta_device,
    case_ckpt_that_expands_to_hundreds_of_megabytes, case_onnx_teacher_with_sparse_external_data,
    case_class_folder_named_in_bytes_that_are_not_utf8,
]


def _case_id(case) -> str:
    return case.__name__.removeprefix("case_")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_exits_2_with_one_line(case, where, capsys, small_npz, teacher_spec):
    args, needles = case(where, small_npz, teacher_spec)
    run_bad(where, capsys, args, *needles)


# --- a malicious checkpoint must be refused without running its code --------------------------------------

class _Touch:
    """Unpickling this calls os.system("touch <marker>")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Open:
    """Unpickling this calls open(<marker>, "w"), creating the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _save(kind: str, obj, path: Path) -> None:
    if kind == "torch.save":
        torch.save({"conv.weight": obj}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"conv.weight": obj}, f, protocol=2 if kind == "pickle-2" else pickle.DEFAULT_PROTOCOL)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("payload", [_Touch, _Open], ids=["os.system", "open"])
@pytest.mark.parametrize("kind", ["torch.save", "pickle-2", "pickle-default"])
def test_malicious_checkpoint_is_refused_and_never_runs(kind, payload, where, capsys, small_npz, teacher_spec):
    # The payload is live: loading a twin of the file unsafely does create its marker.
    twin_marker, twin = where.tmp / "twin-marker", where.tmp / "twin.pt"
    _save(kind, payload(twin_marker), twin)
    with open(twin, "rb") as f:
        torch.load(f, weights_only=False) if kind == "torch.save" else pickle.load(f)
    assert twin_marker.exists()

    marker = where.inputs / "PWNED"
    ckpt = where.inputs / "evil.pt"
    _save(kind, payload(marker), ckpt)
    run_bad(where, capsys, ["--data", str(small_npz), "--teacher", teacher_spec, "--teacher-weights", str(ckpt),
                            *STUDENT], "refused", ckpt.name)
    assert not marker.exists(), "the checkpoint's code ran"


# --- through a real process -----------------------------------------------------------------------------

def _subprocess(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("edgecompress")
    assert exe, "the edgecompress console script is not installed"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env=env if env is not None else dict(os.environ))


def test_subprocess_teacher_mismatch_no_traceback(where, small_npz):
    spec = write_factory(where.inputs / "teacher5.py", 5)
    before = tree(where.tmp, where.out)
    proc = _subprocess(["compress", "--data", str(small_npz), "--teacher", spec, *STUDENT,
                        "--out", str(where.out)], where.cwd)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "teacher outputs 5 classes", "has 10")
    assert "Traceback" not in proc.stdout
    assert list(where.cwd.iterdir()) == []
    assert tree(where.tmp, where.out) == before


def test_subprocess_unknown_option_is_one_usage_line(where):
    proc = _subprocess(["compress", "--bogus"], where.cwd)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--bogus", "edgecompress compress --help")
    assert list(where.cwd.iterdir()) == []


def test_subprocess_malicious_plain_pickle_gives_one_line(where, small_npz, teacher_spec):
    marker, ckpt = where.inputs / "PWNED", where.inputs / "evil.pt"
    _save("pickle-default", _Open(marker), ckpt)
    proc = _subprocess(["compress", "--data", str(small_npz), "--teacher", teacher_spec,
                        "--teacher-weights", str(ckpt), *STUDENT, "--out", str(where.out)], where.cwd)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "refused")


def test_factory_teacher_writes_nothing_beside_the_factory_file(where, small_npz):
    factory_dir = where.inputs / "factory"
    spec = write_factory(factory_dir / "teacher5.py", 5)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = _subprocess(["compress", "--data", str(small_npz), "--teacher", spec, *STUDENT,
                        "--out", str(where.out)], where.cwd, env)
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in factory_dir.rglob("*")) == ["teacher5.py"]


def test_a_model_exiting_in_its_forward_is_one_line_not_a_silent_success(where, capsys, small_npz):
    """sys.exit() inside the teacher's forward (not at import): the run stops with one line and exit 1."""
    spec = where.inputs / "forward_exits.py"
    spec.write_text("import sys\n\nimport torch\n\n\nclass Net(torch.nn.Module):\n"
                    "    def forward(self, x):\n        sys.exit(0)\n\n\ndef build():\n    return Net()\n")
    code = main(["compress", "--data", str(small_npz), "--teacher", f"{spec}:build", *STUDENT, "--out", str(where.out)])
    err = capsys.readouterr().err
    assert code != 0
    assert_one_error_line(err, "sys.exit(0)")


@pytest.mark.parametrize("planted", [".lock", "verify", "export/x86-cpu", "data/images.u8"])
def test_a_symlink_planted_in_the_run_directory_is_refused_and_nothing_outside_changes(planted, where, capsys,
                                                                                      small_npz, teacher_spec):
    victim_file = where.inputs / "precious.txt"
    victim_file.write_text("keep me\n")
    victim_dir = where.inputs / "precious"
    victim_dir.mkdir()
    (victim_dir / "report.json").write_text("{}\n")
    link = where.out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim_dir if planted in ("verify", "export/x86-cpu") else victim_file)
    run_bad(where, capsys, ["--data", str(small_npz), "--teacher", teacher_spec, *STUDENT],
            "symbolic link", planted.split("/")[-1])
    assert victim_file.read_text() == "keep me\n" and (victim_dir / "report.json").read_text() == "{}\n"


@pytest.mark.parametrize("out", ["a-file/run", "/proc/edgecompress-run"], ids=["under-a-file", "read-only-fs"])
def test_an_out_that_cannot_be_created_is_one_line(out, where, capsys, small_npz, teacher_spec):
    (where.inputs / "a-file").write_text("")
    path = where.inputs / out if not out.startswith("/") else Path(out)
    code = main(["compress", "--data", str(small_npz), "--teacher", teacher_spec, *STUDENT, "--out", str(path)])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "cannot create the run directory", "give another --out")


@pytest.mark.parametrize("kind", ["factory", "torchscript"])
def test_a_run_directory_naming_code_is_refused_until_the_user_trusts_its_folder(kind, where, capsys, small_npz):
    """Someone else's run directory whose run.toml names code (a factory file planted inside it, or a
    TorchScript teacher, which is code too): a one-stage command refuses it with one line naming the file, and
    nothing of it runs; with --trust FOLDER it goes ahead (and here runs the planted code)."""
    run = where.out
    (run / "distill").mkdir(parents=True)
    marker = where.tmp / "it-ran"
    if kind == "factory":
        code = run / "distill" / "notes.py"
        code.write_text(f"open({str(marker)!r}, 'w').close()\n\n\ndef build():\n    raise SystemExit(3)\n")
        teacher = f"{code}:build"
    else:
        code = run / "distill" / "teacher.pt"
        torch.jit.save(torch.jit.script(create("resnet_slim_050", 1, 10).eval()), str(code))
        teacher = str(code)
    (run / "run.toml").write_text(f'data = "{small_npz}"\n[teacher]\nspec = "{teacher}"\n')
    assert main(["verify", str(run), "--quiet"]) == 2
    line = assert_one_error_line(capsys.readouterr().err, "run.toml names code this command would run",
                                 str(code), f"--trust {code.parent}")
    assert line and not marker.exists()
    if kind == "factory":
        assert main(["distill", str(run), "--quiet", "--trust", str(code.parent)]) == 2
        assert marker.exists()  # trusted: imported, and its factory's SystemExit(3) is one line


def test_docker_commands_vouch_for_the_code_of_the_users_own_run(where, small_npz, teacher_spec, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(where.out.parent / "no-tools"))  # no docker, podman or buildah: Docker's commands
    run = where.out
    run.mkdir()
    (run / "run.toml").write_text(f'data = "{small_npz}"\ntarget = "x86-cpu"\n[teacher]\nspec = "{teacher_spec}"\n')
    assert main(["docker", "x86-cpu", "--run-dir", str(run)]) == 0
    runs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("docker run")]
    folder = str(Path(teacher_spec.rpartition(":")[0]).resolve().parent)
    assert len(runs) == 2 and all(f"--trust {folder}" in line for line in runs)


def test_debug_adds_the_traceback_to_the_one_line(where, capsys):
    """Without --debug a failure is one line; with it, the same line after the traceback that led to it."""
    args = ["compress", "--data", str(where.inputs / "missing"), "--out", str(where.out), "--quiet"]
    assert main(args) == 2
    plain = capsys.readouterr().err.strip().splitlines()
    assert len(plain) == 1 and plain[0].startswith("error: data not found:")
    assert main(args + ["--debug"]) == 2
    debug = capsys.readouterr().err.strip().splitlines()
    assert debug[0] == "Traceback (most recent call last):" and debug[-1] == plain[0]
    assert any("BadInput" in line for line in debug[:-1])


def test_teacher_weights_pair_by_position_and_a_dash_means_none():
    from edgecompress.cli import teachers_from_flags

    pair = teachers_from_flags(("teacher.onnx", "resnet18_half"), ("-", "w.pt"))
    assert (pair.spec, pair.weights, pair.extra, pair.extra_weights) == ("teacher.onnx", "", ["resnet18_half"],
                                                                          ["w.pt"])
    pair = teachers_from_flags(("resnet18_half", "teacher.onnx"), ("w.pt", "-"))
    assert (pair.weights, pair.extra, pair.extra_weights) == ("w.pt", ["teacher.onnx"], [])
    assert teachers_from_flags(("a", "b"), ()).weights == ""


def test_teacher_weights_once_per_teacher_or_one_line(where, capsys):
    assert main(["compress", "--teacher", "resnet18_half", "--teacher", "resnet18_half", "--teacher-weights", "-",
                 "--out", str(where.out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 --teacher but 1 --teacher-weights" in err[0] and "'-' for a teacher" in err[0]
