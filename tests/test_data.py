"""edgecompress.data: Fashion-MNIST, IDX folders, image folders and .npz files, on real Fashion-MNIST images."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgecompress import data
from edgecompress.errors import BadInput

from conftest import write_idx

# Fashion-MNIST label ids of the classes the image-folder tests use, by folder name
FOLDER_CLASSES = {"bag": 8, "coat": 4, "sandal": 5}


@pytest.fixture(scope="module")
def fashion_ds():
    return data.load("fashion-mnist")


def _keys(x: torch.Tensor) -> list[bytes]:
    return [img.contiguous().numpy().tobytes() for img in x]


def _bytes_by_label(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter(zip(_keys(x), y.tolist()))


def write_pngs(folder: Path, images: dict[str, np.ndarray], rgb: bool = False) -> None:
    for name, xs in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(xs):
            if rgb:  # three different channels, so a channel mix-up shows
                img = np.stack([img, 255 - img, img // 2], axis=-1)
            Image.fromarray(img).save(folder / name / f"{i:03d}.png")


def _class_images(x: np.ndarray, y: np.ndarray, count: int) -> dict[str, np.ndarray]:
    return {name: x[y == label][:count] for name, label in FOLDER_CLASSES.items()}


# --- Fashion-MNIST ------------------------------------------------------------------------------------------

def test_fashion_mnist_loads_whole(fashion_ds, fashion_raw):
    ds = fashion_ds
    assert ds.name == "fashion-mnist"
    assert (len(ds.y_train), len(ds.y_eval)) == (60000, 10000)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_eval.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.x_eval.dtype == torch.uint8
    assert ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10 and ds.classes == data.FASHION_MNIST_CLASSES
    # the same pixels and labels as an independent reader of the IDX files, in the same order
    assert np.array_equal(ds.x_train[:, 0].numpy(), fashion_raw["x_train"])
    assert np.array_equal(ds.y_eval.numpy(), fashion_raw["y_test"])
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_eval).tolist() == [1000] * 10


# --- IDX folders --------------------------------------------------------------------------------------------

@pytest.fixture
def idx_folder(tmp_path, fashion_raw) -> Path:
    folder = tmp_path / "mini-idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", fashion_raw["x_train"][:120])
    write_idx(folder / "train-labels-idx1-ubyte.gz", fashion_raw["y_train"][:120])
    write_idx(folder / "t10k-images-idx3-ubyte", fashion_raw["x_test"][:40])
    write_idx(folder / "t10k-labels-idx1-ubyte", fashion_raw["y_test"][:40])
    return folder


def test_idx_folder_loads(idx_folder, fashion_raw):
    ds = data.load(str(idx_folder))
    assert ds.name == "mini-idx"
    assert np.array_equal(ds.x_train[:, 0].numpy(), fashion_raw["x_train"][:120])
    assert np.array_equal(ds.y_eval.numpy(), fashion_raw["y_test"][:40])
    assert ds.classes == [str(i) for i in range(10)]


def test_truncated_idx_file_is_bad_input(idx_folder):
    path = idx_folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BadInput, match="truncated"):
        data.load(str(idx_folder))


def test_truncated_gzip_idx_file_is_bad_input(idx_folder):
    path = idx_folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadInput, match="cannot read IDX file .*train-images-idx3-ubyte.gz"):
        data.load(str(idx_folder))


def test_idx_file_cut_inside_its_header_is_bad_input(idx_folder):
    path = idx_folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(BadInput, match="t10k-images-idx3-ubyte"):
        data.load(str(idx_folder))


def test_idx_images_and_labels_must_match(idx_folder, fashion_raw):
    write_idx(idx_folder / "t10k-labels-idx1-ubyte", fashion_raw["y_test"][:39])
    with pytest.raises(BadInput, match="40 images but 39 labels"):
        data.load(str(idx_folder))


def test_idx_folder_missing_a_file(idx_folder):
    (idx_folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(BadInput, match="missing t10k-labels-idx1-ubyte"):
        data.load(str(idx_folder))


# --- image folders ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rgb", [False, True], ids=["grayscale", "rgb"])
def test_image_folder_with_class_subfolders(tmp_path, fashion_small, rgb):
    x, y = fashion_small
    images = _class_images(x, y, 12)
    write_pngs(tmp_path / "shop", images, rgb=rgb)
    ds = data.load(str(tmp_path / "shop"), seed=0)

    assert ds.name == "shop"
    assert ds.classes == ["bag", "coat", "sandal"]
    channels = 3 if rgb else 1
    assert ds.input_shape == (channels, 28, 28) and ds.x_train.dtype == torch.uint8
    # no test/ folder: EVAL_FRACTION of the images, stratified, are held out
    assert (len(ds.y_train), len(ds.y_eval)) == (30, 6)
    assert torch.bincount(ds.y_eval).tolist() == [2, 2, 2]
    # every image comes back under the label of the folder it was in, pixels intact
    expected = Counter()
    for label, name in enumerate(ds.classes):
        for img in images[name]:
            if rgb:
                img = np.stack([img, 255 - img, img // 2])
            expected[(np.ascontiguousarray(img.reshape(channels, 28, 28)).tobytes(), label)] += 1
    got = _bytes_by_label(ds.x_train, ds.y_train) + _bytes_by_label(ds.x_eval, ds.y_eval)
    assert got == expected


@pytest.mark.parametrize("eval_name", ["test", "val"])
def test_image_folder_with_train_and_test_subfolders(tmp_path, fashion_small, fashion_small_test, eval_name):
    train, test = _class_images(*fashion_small, 10), _class_images(*fashion_small_test, 4)
    write_pngs(tmp_path / "shop" / "train", train)
    write_pngs(tmp_path / "shop" / eval_name, test)
    ds = data.load(str(tmp_path / "shop"))

    assert ds.classes == ["bag", "coat", "sandal"]
    assert (len(ds.y_train), len(ds.y_eval)) == (30, 12)
    expected_eval = Counter((img.tobytes(), label) for label, name in enumerate(ds.classes) for img in test[name])
    assert _bytes_by_label(ds.x_eval, ds.y_eval) == expected_eval
    expected_train = Counter((img.tobytes(), label) for label, name in enumerate(ds.classes) for img in train[name])
    assert _bytes_by_label(ds.x_train, ds.y_train) == expected_train


def test_eval_folder_with_a_class_train_lacks(tmp_path, fashion_small):
    x, y = fashion_small
    write_pngs(tmp_path / "shop" / "train", {"bag": x[y == 8][:4], "coat": x[y == 4][:4]})
    write_pngs(tmp_path / "shop" / "test", {"bag": x[y == 8][4:6], "shirt": x[y == 6][:2]})
    with pytest.raises(BadInput, match="shirt"):
        data.load(str(tmp_path / "shop"))


def test_corrupt_png_is_bad_input_naming_the_file(tmp_path, fashion_small):
    write_pngs(tmp_path / "shop", _class_images(*fashion_small, 4))
    bad = tmp_path / "shop" / "coat" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    with pytest.raises(BadInput, match="cannot read image") as info:
        data.load(str(tmp_path / "shop"))
    assert str(bad) in str(info.value)


def test_truncated_png_is_bad_input_naming_the_file(tmp_path, fashion_small):
    write_pngs(tmp_path / "shop", _class_images(*fashion_small, 4))
    bad = tmp_path / "shop" / "sandal" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(BadInput) as info:
        data.load(str(tmp_path / "shop"))
    assert str(bad) in str(info.value)


def test_corrupt_first_png_is_bad_input_naming_the_file(tmp_path, fashion_small):
    write_pngs(tmp_path / "shop", _class_images(*fashion_small, 4))
    bad = tmp_path / "shop" / "bag" / "000.png"  # the first file of the first class
    bad.write_bytes(b"not an image at all")
    with pytest.raises(BadInput) as info:
        data.load(str(tmp_path / "shop"))
    assert str(bad) in str(info.value)


def test_one_class_image_folder_is_bad_input(tmp_path, fashion_small):
    x, y = fashion_small
    write_pngs(tmp_path / "shop", {"coat": x[y == 4][:12]})
    with pytest.raises(BadInput, match="1 class"):
        data.load(str(tmp_path / "shop"))


# --- .npz ---------------------------------------------------------------------------------------------------

def test_npz_without_test_split_is_split_stratified(small_npz, fashion_small):
    x, y = fashion_small
    ds = data.load(str(small_npz), seed=0)
    assert ds.name == "fmnist-small"
    assert ds.input_shape == (1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.num_classes == 10
    assert len(ds.y_eval) == int(len(y) * data.EVAL_FRACTION) == 50
    assert len(ds.y_train) + len(ds.y_eval) == len(y)
    assert torch.bincount(ds.y_eval, minlength=10).tolist() == [5] * 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [25] * 10
    # train and eval partition the file's images, labels kept
    original = Counter(zip((img.tobytes() for img in x[:, None]), y.tolist()))
    assert _bytes_by_label(ds.x_train, ds.y_train) + _bytes_by_label(ds.x_eval, ds.y_eval) == original


def test_npz_split_is_fixed_by_seed(small_npz):
    a, b, c = data.load(str(small_npz), seed=0), data.load(str(small_npz), seed=0), data.load(str(small_npz), seed=1)
    assert torch.equal(a.x_eval, b.x_eval) and torch.equal(a.y_train, b.y_train)
    assert a.sha256_16 == b.sha256_16
    assert not torch.equal(a.x_eval, c.x_eval)
    assert a.sha256_16 != c.sha256_16
    assert torch.bincount(c.y_eval, minlength=10).tolist() == [5] * 10


def test_npz_with_its_own_test_split(tmp_path, fashion_small, fashion_small_test):
    (x, y), (xt, yt) = fashion_small, fashion_small_test
    path = tmp_path / "own.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    ds = data.load(str(path), seed=3)
    assert np.array_equal(ds.x_train[:, 0].numpy(), x) and np.array_equal(ds.y_train.numpy(), y)
    assert np.array_equal(ds.x_eval[:, 0].numpy(), xt) and np.array_equal(ds.y_eval.numpy(), yt)


@pytest.mark.parametrize("layout", ["NHWC1", "NHWC3", "NCHW3"])
def test_npz_channel_layouts(tmp_path, fashion_small, layout):
    x, y = fashion_small
    rgb = np.stack([x, 255 - x, x // 2], axis=1)  # N, 3, H, W
    arr = {"NHWC1": x[..., None], "NHWC3": rgb.transpose(0, 2, 3, 1), "NCHW3": rgb}[layout]
    np.savez(tmp_path / "d.npz", x=arr, y=y, x_test=arr[:20], y_test=y[:20])
    ds = data.load(str(tmp_path / "d.npz"))
    channels = 1 if layout == "NHWC1" else 3
    assert ds.input_shape == (channels, 28, 28)
    expected = x[:, None] if channels == 1 else rgb
    assert np.array_equal(ds.x_train.numpy(), expected)


def test_npz_without_x_and_y_names_what_it_found(tmp_path, fashion_small):
    np.savez(tmp_path / "d.npz", images=fashion_small[0], labels=fashion_small[1])
    with pytest.raises(BadInput, match="`x` and `y`.*found: images, labels"):
        data.load(str(tmp_path / "d.npz"))


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_text("x,y\n1,2\n")
    with pytest.raises(BadInput, match="cannot read"):
        data.load(str(tmp_path / "d.npz"))


def test_data_file_of_another_kind(tmp_path):
    (tmp_path / "d.txt").write_text("x,y\n1,2\n")
    with pytest.raises(BadInput, match="unsupported data file"):
        data.load(str(tmp_path / "d.txt"))


def test_npz_images_and_labels_must_match(tmp_path, fashion_small):
    x, y = fashion_small
    np.savez(tmp_path / "d.npz", x=x, y=y[:-7])
    with pytest.raises(BadInput, match="300 images but 293 labels"):
        data.load(str(tmp_path / "d.npz"))


def test_one_class_npz_is_bad_input(tmp_path, fashion_small):
    x, _ = fashion_small
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(len(x), dtype=np.int64))
    with pytest.raises(BadInput, match="1 class"):
        data.load(str(tmp_path / "d.npz"))


def test_npz_with_one_distinct_label_is_bad_input(tmp_path, fashion_small):
    x, _ = fashion_small
    np.savez(tmp_path / "d.npz", x=x, y=np.full(len(x), 3, dtype=np.int64))
    with pytest.raises(BadInput, match="class"):
        data.load(str(tmp_path / "d.npz"))


def test_npz_with_negative_labels_is_bad_input(tmp_path, fashion_small):
    x, y = fashion_small
    np.savez(tmp_path / "d.npz", x=x, y=y - 1)
    with pytest.raises(BadInput, match="label"):
        data.load(str(tmp_path / "d.npz"))


def test_npz_test_images_and_labels_must_match(tmp_path, fashion_small, fashion_small_test):
    (x, y), (xt, yt) = fashion_small, fashion_small_test
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt[:20], y_test=yt[:10])
    with pytest.raises(BadInput, match="20 images but 10 labels"):
        data.load(str(tmp_path / "d.npz"))


def test_npz_test_images_must_have_the_training_shape(tmp_path, fashion_small, fashion_small_test):
    (x, y), (xt, yt) = fashion_small, fashion_small_test
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=np.pad(xt, ((0, 0), (2, 2), (2, 2))), y_test=yt)
    with pytest.raises(BadInput, match="shape"):
        data.load(str(tmp_path / "d.npz"))


# --- stratified_sample --------------------------------------------------------------------------------------

def test_stratified_sample_covers_every_class_equally(fashion_small):
    y = torch.from_numpy(fashion_small[1])
    idx = data.stratified_sample(y, 50, seed=0)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(y[idx], minlength=10).tolist() == [5] * 10
    assert torch.equal(idx, data.stratified_sample(y, 50, seed=0))
    assert not torch.equal(idx, data.stratified_sample(y, 50, seed=1))


def test_stratified_sample_on_the_whole_training_set(fashion_ds):
    idx = data.stratified_sample(fashion_ds.y_train, 512, seed=0)
    assert torch.bincount(fashion_ds.y_train[idx], minlength=10).tolist() == [51] * 10


def test_stratified_sample_takes_what_a_small_class_has():
    labels = torch.tensor([0] * 20 + [1] * 3 + [2] * 20)
    idx = data.stratified_sample(labels, 30, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10, 3, 10]


def test_skip_bad_images_leaves_unreadable_files_out_and_lists_them(tmp_path, fashion_small):
    write_pngs(tmp_path / "shop", _class_images(*fashion_small, 4))
    bad = tmp_path / "shop" / "bag" / "000.png"  # the very first file: the probe must look further
    bad.write_bytes(b"not an image")
    with pytest.raises(BadInput, match="--skip-bad-images"):
        data.load(str(tmp_path / "shop"))
    ds = data.load(str(tmp_path / "shop"), skip_bad_images=True)
    assert list(ds.skipped) == [str(bad)] and "UnidentifiedImageError" in ds.skipped[str(bad)]
    assert len(ds.y_train) + len(ds.y_eval) == 4 * len(ds.classes) - 1
    assert ds.describe()["skipped_images"] == 1


def test_an_in_memory_source_takes_the_contracts_resize_crop_and_channels(small_npz):
    """Reference written here: grey repeated to RGB, shorter side to 36, center crop 32 (torch bilinear)."""
    import torch.nn.functional as F

    raw = data.load(str(small_npz))
    ds = data.load(str(small_npz), geometry=data.Geometry((32, 32), 36, "bilinear", "rgb"))
    x = raw.x_train[:5].float().expand(-1, 3, -1, -1)
    big = F.interpolate(x, size=(36, 36), mode="bilinear", antialias=True, align_corners=False)
    expected = big[:, :, 2:34, 2:34].round().clamp(0, 255).to(torch.uint8)
    assert ds.input_shape == (3, 32, 32) and torch.equal(ds.x_train[:5], expected)
