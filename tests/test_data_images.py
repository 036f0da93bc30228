"""edgecompress.data on real image files: the formats photos come in (truncated, CMYK, 16-bit, RGBA, EXIF-rotated,
palette with transparency), CSV/TSV lists, the packed store, the cache fingerprint, non-regular files, and the
Resize + CenterCrop arithmetic. Every image is a real Fashion-MNIST image written with PIL."""
from __future__ import annotations

import os
import pickle
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgecompress import data
from edgecompress.data import images
from edgecompress.data.packed import PackedImages
from edgecompress.data.preprocess import Geometry
from edgecompress.errors import BadInput

from test_cli_bad_input import STUDENT, run_bad, where  # noqa: F401  (where: the fixture)
from testkit import write_photo_folder

# --- helpers ----------------------------------------------------------------------------------------------


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (no pytest-timeout here)."""
    def _fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _keys(x) -> list[bytes]:
    return [np.ascontiguousarray(img.numpy()).tobytes() for img in x]


def _by_label(ds) -> Counter:
    """(image bytes, label) pairs of both splits, whatever the random split did."""
    return Counter(zip(_keys(ds.x_train), ds.y_train.tolist())) + Counter(zip(_keys(ds.x_eval), ds.y_eval.tolist()))


def _tint(img: np.ndarray, tint=(1.0, 0.8, 0.6)) -> np.ndarray:
    """A grey image as RGB with three different channels, so a channel mix-up shows."""
    return (img.astype(np.float32)[..., None] * np.asarray(tint, np.float32)).round().clip(0, 255).astype(np.uint8)


def _png_folder(root: Path, x: np.ndarray, y: np.ndarray, classes: dict[int, str]) -> dict[Path, tuple]:
    """Grey 28x28 PNGs, root/<class>/<i>.png; returns file -> (pixels, class name)."""
    written = {}
    for i, (img, label) in enumerate(zip(x, y)):
        if int(label) not in classes:
            continue
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        written[folder / f"{i:03d}.png"] = (img, classes[int(label)])
    return written


def _truncate_in_scan(path: Path) -> None:
    """Cut a JPEG halfway through its entropy-coded data: the header still reads, the pixels do not."""
    blob = path.read_bytes()
    sos = blob.index(b"\xff\xda")
    path.write_bytes(blob[:sos + (len(blob) - sos) // 2])


def _truncate_in_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _images_of(fashion_small, label: int, count: int, skip: int = 0) -> np.ndarray:
    x, y = fashion_small
    return x[y == label][skip:skip + count]


# --- 1. the formats photos come in ------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [_truncate_in_scan, _truncate_in_header], ids=["in-scan-data", "in-header"])
def test_truncated_jpeg_in_the_middle_of_a_class_folder(tmp_path, fashion_small, cut):
    x, y = fashion_small
    pick = np.concatenate([np.flatnonzero(y == 4)[:9], np.flatnonzero(y == 8)[:9]])
    root = write_photo_folder(tmp_path / "photos", x[pick], (y[pick] == 8).astype(int), ["coat", "bag"])
    files = sorted((root / "coat").glob("*.jpg"))
    bad = files[len(files) // 2]
    cut(bad)
    cache = tmp_path / "cache"

    with pytest.raises(BadInput) as info:
        data.load(str(root), cache_dir=cache, workers=2)  # real DataLoader worker processes
    message = str(info.value)
    assert "\n" not in message
    assert str(bad) in message and "--skip-bad-images" in message
    assert message.count(str(root)) == 1, "one file is named, once"
    # a failed pack leaves nothing half-written to be mistaken for a cache
    assert not list(cache.glob("images-*")) and not list(cache.glob(".*.tmp"))

    ds = data.load(str(root), skip_bad_images=True, cache_dir=cache, workers=2)
    assert list(ds.skipped) == [str(bad)] and ds.skipped[str(bad)]
    assert len(ds.y_train) + len(ds.y_eval) == 17
    assert ds.classes == ["bag", "coat"] and torch.bincount(torch.cat([ds.y_train, ds.y_eval])).tolist() == [9, 8]
    # the kept images are the readable files, decoded as the first file sets the size
    first = Image.open(sorted((root / "bag").glob("*.jpg"))[0])
    assert ds.input_shape == (3, first.size[1], first.size[0])
    geometry = Geometry((first.size[1], first.size[0]), channels="rgb")
    expected = Counter()
    for label, name in enumerate(ds.classes):
        for f in sorted((root / name).glob("*.jpg")):
            if f != bad:
                expected[(images.decode(f, geometry).tobytes(), label)] += 1
    assert _by_label(ds) == expected


def test_skipped_pack_in_the_cache_does_not_excuse_a_later_strict_load(tmp_path, fashion_small):
    """A run with --skip-bad-images then one without, same cache: the second must still refuse the bad file."""
    x, y = fashion_small
    files = _png_folder(tmp_path / "shop", x, y, {4: "coat", 8: "bag"})
    bad = sorted(files)[3]
    bad.write_bytes(bad.read_bytes()[:60])
    cache = tmp_path / "cache"
    ds = data.load(str(tmp_path / "shop"), skip_bad_images=True, cache_dir=cache, workers=1)
    assert list(ds.skipped) == [str(bad)]
    with pytest.raises(BadInput, match="--skip-bad-images") as info:
        data.load(str(tmp_path / "shop"), cache_dir=cache, workers=1)
    assert str(bad) in str(info.value)


def test_cmyk_jpeg(tmp_path, fashion_small):
    upright = _tint(_images_of(fashion_small, 4, 1)[0])
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(upright, "RGB").convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    rgb = images.decode(path, Geometry((28, 28), channels="rgb"))
    assert rgb.shape == (3, 28, 28) and rgb.dtype == np.uint8
    diff = np.abs(rgb.transpose(1, 2, 0).astype(int) - upright.astype(int))
    assert diff.mean() < 3 and diff.max() < 48, (diff.mean(), diff.max())  # JPEG error only, no inversion
    grey = images.decode(path, Geometry((28, 28), channels="grey"))
    luma = np.asarray(Image.fromarray(upright, "RGB").convert("L"), dtype=int)
    assert grey.shape == (1, 28, 28) and np.abs(grey[0].astype(int) - luma).mean() < 3


def _sixteen_bit(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """A real image at 16 bits with low bits of its own, spanning 0..65535."""
    rng = np.random.default_rng(seed)
    v = img.astype(np.int64) * 257 + rng.integers(-128, 129, size=img.shape)
    v = v.clip(0, 65535)
    v.flat[0], v.flat[1] = 0, 65535
    return v.astype(np.uint16)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, fashion_small):
    v16 = _sixteen_bit(_images_of(fashion_small, 0, 1)[0])
    path = tmp_path / "g16.png"
    Image.fromarray(v16).save(path)
    assert Image.open(path).mode == "I;16" and Image.open(path).getextrema() == (0, 65535)
    expected = np.rint(v16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    clipped = np.asarray(Image.open(path).convert("L"))  # what PIL alone gives: nearly all white
    assert (clipped != expected).mean() > 0.2, "the test image must tell scaling from clipping"

    grey = images.decode(path, Geometry((28, 28), channels="grey"))
    assert grey.shape == (1, 28, 28) and np.array_equal(grey[0], expected)
    rgb = images.decode(path, Geometry((28, 28), channels="rgb"))
    assert rgb.shape == (3, 28, 28) and all(np.array_equal(c, expected) for c in rgb)

    # through load: a folder of 16-bit PNGs settles on greyscale and keeps the scaled values
    pairs = Counter()
    for label, name in enumerate(["coat", "shirt"]):
        (tmp_path / "scans" / name).mkdir(parents=True)
        for i, img in enumerate(_images_of(fashion_small, (4, 6)[label], 4)):
            v = _sixteen_bit(img, seed=i)
            Image.fromarray(v).save(tmp_path / "scans" / name / f"{i}.png")
            pairs[(np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8).tobytes(), label)] += 1
    ds = data.load(str(tmp_path / "scans"), cache_dir=tmp_path / "cache", workers=1)
    assert ds.input_shape == (1, 28, 28)
    assert _by_label(ds) == pairs


def test_dark_sixteen_bit_png_is_scaled_like_any_other(tmp_path, fashion_small):
    """A 16-bit scan whose values all lie below 256 is nearly black, not an 8-bit image: the scale is the
    format's, not guessed from the pixels (else one pixel above 255 would change every other pixel's value)."""
    v16 = (_images_of(fashion_small, 0, 1)[0].astype(np.uint16) // 2) * 2  # 0..254 out of 65535
    assert 0 < v16.max() <= 255
    path = tmp_path / "dark16.png"
    Image.fromarray(v16).save(path)
    assert Image.open(path).mode == "I;16"
    grey = images.decode(path, Geometry((28, 28), channels="grey"))
    assert np.array_equal(grey[0], np.rint(v16.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert grey.max() <= 1


def test_rgba_png_drops_alpha(tmp_path, fashion_small):
    rgb = _tint(_images_of(fashion_small, 8, 1)[0])
    alpha = _images_of(fashion_small, 5, 1)[0]  # another real image as the alpha channel, 0 and 255 included
    alpha = alpha.copy()
    alpha.flat[0], alpha.flat[1] = 0, 255
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    got = images.decode(path, Geometry((28, 28), channels="rgb"))
    assert got.shape == (3, 28, 28) and np.array_equal(got.transpose(1, 2, 0), rgb)
    grey = images.decode(path, Geometry((28, 28), channels="grey"))
    assert np.array_equal(grey[0], np.asarray(Image.fromarray(rgb, "RGB").convert("L")))


def test_palette_png_with_transparency(tmp_path, fashion_small):
    rgb = _tint(_images_of(fashion_small, 7, 1)[0], (0.9, 1.0, 0.5))
    pal = Image.fromarray(rgb, "RGB").quantize(colors=48)
    path = tmp_path / "palette.png"
    pal.save(path, transparency=0)
    reread = Image.open(path)
    assert reread.mode == "P" and "transparency" in reread.info
    indices = np.asarray(reread)
    palette = np.asarray(reread.getpalette(), dtype=np.uint8).reshape(-1, 3)
    expected = palette[indices]  # the palette's colours; the transparent index keeps its colour, alpha dropped
    assert (indices == 0).any() and (indices != 0).any()

    with _no_warning():  # nor a warning from PIL about the transparency
        got = images.decode(path, Geometry((28, 28), channels="rgb"))
    assert got.shape == (3, 28, 28) and np.array_equal(got.transpose(1, 2, 0), expected)
    assert np.abs(expected.astype(int) - rgb.astype(int)).mean() < 6  # the palette is close to the image


@contextmanager
def _no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _upright_photo(fashion_small) -> np.ndarray:
    """A real image 40 high, 28 wide (portrait), RGB."""
    img = _tint(_images_of(fashion_small, 3, 1)[0])
    return np.asarray(Image.fromarray(img, "RGB").resize((28, 40), Image.BICUBIC))


def _stored_sideways(upright: np.ndarray, orientation: int) -> Image.Image:
    """What a phone writes: the sensor's pixels, with the EXIF tag saying how to turn them upright."""
    # orientation 6: display = stored turned 90 degrees clockwise, so stored = upright turned counter-clockwise
    stored = Image.fromarray(upright, "RGB").rotate(90 if orientation == 6 else -90, expand=True)
    return stored


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_rotated_image_is_decoded_upright(tmp_path, fashion_small, orientation, suffix):
    upright = _upright_photo(fashion_small)
    stored = _stored_sideways(upright, orientation)
    assert stored.size == (40, 28)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{suffix}"
    stored.save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    plain = tmp_path / f"upright{suffix}"  # the same picture written upright, decoded by the same code
    Image.fromarray(upright, "RGB").save(plain, **({"quality": 95} if suffix == ".jpg" else {}))

    geometry = Geometry((40, 28), channels="rgb")
    got = images.decode(path, geometry).astype(int)
    assert got.shape == (3, 40, 28)
    if suffix == ".png":
        assert np.array_equal(got.transpose(1, 2, 0), upright)
    else:
        want = images.decode(plain, geometry).astype(int)
        assert np.abs(got - want).mean() < 4
        # and far from the other way round
        wrong = np.asarray(Image.fromarray(upright, "RGB").rotate(180)).transpose(2, 0, 1).astype(int)
        assert np.abs(got - wrong).mean() > 4 * np.abs(got - want).mean()


def test_exif_rotated_first_image_gives_the_upright_size(tmp_path, fashion_small):
    """Size and channels left open are the first image's: its upright size, not the sensor's."""
    upright = _upright_photo(fashion_small)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("a", "b"):
        (tmp_path / "phone" / name).mkdir(parents=True)
    _stored_sideways(upright, 6).save(tmp_path / "phone" / "a" / "0.png", exif=exif)
    for i in range(1, 6):
        for name in ("a", "b"):
            Image.fromarray(upright, "RGB").save(tmp_path / "phone" / name / f"{i}.png")
    ds = data.load(str(tmp_path / "phone"), cache_dir=tmp_path / "cache", workers=1)
    assert ds.input_shape == (3, 40, 28)
    # every image, the rotated one included, comes back exactly upright
    for x in (ds.x_train, ds.x_eval):
        for img in x:
            assert np.array_equal(img.numpy().transpose(1, 2, 0), upright)


def test_mixed_formats_load_together(tmp_path, fashion_small):
    """A folder of all of the above (but the truncated file) loads whole, each image as decoded by hand."""
    train = tmp_path / "mixed" / "train"
    for name in ("a", "b"):
        (train / name).mkdir(parents=True)
        (tmp_path / "mixed" / "test" / name).mkdir(parents=True)
    expected = {}  # file -> (28, 28, 3) pixels, tolerance
    src = iter(_images_of(fashion_small, 2, 12))

    rgb = _tint(next(src))
    Image.fromarray(rgb, "RGB").convert("CMYK").save(train / "a" / "0_cmyk.jpg", quality=95)
    expected[train / "a" / "0_cmyk.jpg"] = (rgb, 3.0)

    v16 = _sixteen_bit(next(src))
    Image.fromarray(v16).save(train / "a" / "1_g16.png")
    scaled = np.rint(v16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    expected[train / "a" / "1_g16.png"] = (np.repeat(scaled[..., None], 3, 2), 0)

    upright = _tint(next(src))
    exif = Image.Exif()
    exif[0x0112] = 8
    _stored_sideways(upright, 8).save(train / "a" / "2_exif.png", exif=exif)
    expected[train / "a" / "2_exif.png"] = (upright, 0)

    rgb = _tint(next(src), (0.5, 0.7, 1.0))
    Image.fromarray(np.dstack([rgb, next(src)]), "RGBA").save(train / "b" / "0_rgba.png")
    expected[train / "b" / "0_rgba.png"] = (rgb, 0)

    pal = Image.fromarray(_tint(next(src)), "RGB").quantize(colors=32)
    pal.save(train / "b" / "1_palette.png", transparency=1)
    reread = Image.open(train / "b" / "1_palette.png")
    expected[train / "b" / "1_palette.png"] = (
        np.asarray(reread.getpalette(), dtype=np.uint8).reshape(-1, 3)[np.asarray(reread)], 0)

    la = next(src)
    Image.fromarray(np.dstack([la, next(src)]), "LA").save(train / "b" / "2_la.png")
    expected[train / "b" / "2_la.png"] = (np.repeat(la[..., None], 3, 2), 0)

    for name in ("a", "b"):
        img = _tint(next(src))
        Image.fromarray(img, "RGB").save(tmp_path / "mixed" / "test" / name / "0.png")

    ds = data.load(str(tmp_path / "mixed"), geometry=Geometry((28, 28), channels="rgb"),
                   cache_dir=tmp_path / "cache", workers=1)
    assert ds.skipped == {}
    assert ds.x_train.shape == (6, 3, 28, 28) and ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    for got, (path, (want, tol)) in zip(ds.x_train, expected.items()):  # folder order: class, then name
        diff = np.abs(got.numpy().transpose(1, 2, 0).astype(int) - want.astype(int))
        assert diff.mean() <= tol, (path.name, diff.mean())


# --- 2. through the CLI ---------------------------------------------------------------------------------

def test_cli_truncated_jpeg_is_one_error_line_before_training(where, capsys, fashion_small, teacher_spec):
    x, y = fashion_small
    for i, (img, label) in enumerate(zip(x, y)):
        if i % 10 < 3:  # 3 per class: 30 grey 28x28 JPEGs of 10 classes, what the teacher takes
            folder = where.inputs / "photos" / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=90)
    files = sorted((where.inputs / "photos" / "c4").glob("*.jpg"))
    assert len(files) >= 3
    bad = files[len(files) // 2]
    _truncate_in_scan(bad)
    with deadline(120):
        line = run_bad(where, capsys, ["--data", str(where.inputs / "photos"), "--teacher", teacher_spec, *STUDENT,
                                       "--epochs", "1"], str(bad), "--skip-bad-images")
    assert line.count(".jpg") == 1
    assert not [p for p in where.out.rglob("*") if p.suffix in (".pt", ".onnx")], "a model was written"


# --- 3. CSV / TSV lists ----------------------------------------------------------------------------------

LIST_CLASSES = {4: "coat", 8: "bag", 5: "sandal"}


def _list_images(root: Path, fashion_small, per_class: int = 6) -> list[tuple[str, np.ndarray, str]]:
    """(path relative to root, pixels, class name), in a shuffled order, the files under root/imgs/."""
    (root / "imgs" / "deep").mkdir(parents=True)
    rows = []
    for label, name in LIST_CLASSES.items():
        for i, img in enumerate(_images_of(fashion_small, label, per_class)):
            rel = f"imgs/{'deep/' if i % 2 else ''}{name}-{i}.png"
            Image.fromarray(img).save(root / rel)
            rows.append((rel, img, name))
    order = np.random.default_rng(1).permutation(len(rows))
    return [rows[i] for i in order]


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_list_with_header_relative_paths_and_string_labels(tmp_path, fashion_small, suffix, sep):
    rows = _list_images(tmp_path, fashion_small)
    listing = tmp_path / f"shop{suffix}"
    listing.write_text(f"path{sep}label\n" + "".join(f"{rel}{sep}{name}\n" for rel, _, name in rows))
    ds = data.load(str(listing), cache_dir=tmp_path / "cache", workers=1)
    assert ds.name == "shop" and ds.classes == ["bag", "coat", "sandal"]
    assert ds.input_shape == (1, 28, 28) and len(ds.y_train) + len(ds.y_eval) == 18 and ds.skipped == {}
    assert len(ds.y_eval) == 3 and torch.bincount(ds.y_eval).tolist() == [1, 1, 1]
    assert _by_label(ds) == Counter((img.tobytes(), ds.classes.index(name)) for _, img, name in rows)


def test_list_with_a_split_column_gives_the_eval_split(tmp_path, fashion_small):
    rows = _list_images(tmp_path, fashion_small)
    splits = ["test" if i % 3 == 0 else "train" for i in range(len(rows))]
    listing = tmp_path / "shop.csv"
    listing.write_text("path,label,split\n" + "".join(f"{rel},{name},{s}\n" for (rel, _, name), s in zip(rows, splits)))
    ds = data.load(str(listing), cache_dir=tmp_path / "cache", workers=1)
    classes = ["bag", "coat", "sandal"]
    want_train = [(img, classes.index(name)) for (_, img, name), s in zip(rows, splits) if s == "train"]
    want_eval = [(img, classes.index(name)) for (_, img, name), s in zip(rows, splits) if s == "test"]
    # exactly the listed rows, in the list's order
    assert [t.numpy()[0].tobytes() for t in ds.x_train] == [img.tobytes() for img, _ in want_train]
    assert ds.y_train.tolist() == [label for _, label in want_train]
    assert [t.numpy()[0].tobytes() for t in ds.x_eval] == [img.tobytes() for img, _ in want_eval]
    assert ds.y_eval.tolist() == [label for _, label in want_eval]


def test_list_naming_missing_files(tmp_path, fashion_small):
    rows = _list_images(tmp_path, fashion_small)
    missing = ["imgs/gone-1.png", "imgs/gone-2.png", "other/gone-3.png", "imgs/gone-4.png", "imgs/gone-5.png"]
    lines = [f"{rel},{name}" for rel, _, name in rows]
    for k, rel in enumerate(missing):
        lines.insert(2 + 3 * k, f"{rel},coat")
    listing = tmp_path / "shop.csv"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput) as info:
        data.load(str(listing), cache_dir=tmp_path / "cache", workers=1)
    message = str(info.value)
    assert "\n" not in message and str(listing) in message and "5 listed images" in message
    assert all(m in message for m in missing[:3]) and missing[4] not in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_tsv_is_told_by_its_suffix(tmp_path, fashion_small):
    rows = _list_images(tmp_path, fashion_small, per_class=3)
    text = "".join(f"{rel}\t{name}\n" for rel, _, name in rows)
    (tmp_path / "shop.TSV").write_text(text)
    ds = data.load(str(tmp_path / "shop.TSV"), cache_dir=tmp_path / "cache", workers=1)
    assert ds.classes == ["bag", "coat", "sandal"] and len(ds.y_train) + len(ds.y_eval) == 9
    (tmp_path / "tabs.csv").write_text(text)  # the same tab-separated lines named .csv are one field a line
    with pytest.raises(BadInput, match="line 1 has 1 fields"):
        data.load(str(tmp_path / "tabs.csv"), cache_dir=tmp_path / "cache", workers=1)


def test_list_with_absolute_paths_and_numeric_labels(tmp_path, fashion_small):
    rows = _list_images(tmp_path, fashion_small, per_class=4)
    ids = {"bag": 10, "coat": 2, "sandal": 9}  # numeric labels order as numbers: 2, 9, 10
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "abs.csv"
    listing.write_text("".join(f"{tmp_path / rel},{ids[name]}\n" for rel, _, name in rows))
    ds = data.load(str(listing), cache_dir=tmp_path / "cache", workers=1)
    assert ds.classes == ["2", "9", "10"]
    assert _by_label(ds) == Counter((img.tobytes(), ds.classes.index(str(ids[name]))) for _, img, name in rows)


def test_list_saved_by_a_spreadsheet_with_a_byte_order_mark(tmp_path, fashion_small):
    """Excel's `CSV UTF-8` starts the file with a BOM; the first path must still be found."""
    rows = _list_images(tmp_path, fashion_small, per_class=3)
    listing = tmp_path / "excel.csv"
    listing.write_bytes(("\ufeff" + "".join(f"{rel},{name}\r\n" for rel, _, name in rows)).encode("utf-8"))
    ds = data.load(str(listing), cache_dir=tmp_path / "cache", workers=1)
    assert len(ds.y_train) + len(ds.y_eval) == 9


# --- 4. PackedImages: the same answers as the tensor it stands for ----------------------------------------

def _keys_to_try(n: int) -> list:
    rng = np.random.default_rng(3)
    mask = rng.random(n) < 0.5
    return [
        0, n - 1, -1, -n, np.int64(2), torch.tensor(3),
        slice(None), slice(1, n - 1), slice(None, None, 3), slice(-3, None), slice(4, 4), slice(n + 5, None),
        torch.randperm(n, generator=torch.Generator().manual_seed(0)),
        torch.tensor([3, 3, 0, 3, n - 1, n - 2, n - 1]), np.array([2, 2, 2]), [1, 0, 1],
        torch.tensor([], dtype=torch.int64), torch.tensor([-1, 0, -2]),
        mask, torch.from_numpy(mask), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
        torch.tensor([[0, 1], [2, 0]]),
    ]


def _assert_same_indexing(packed, ref: torch.Tensor) -> None:
    assert len(packed) == len(ref) and tuple(packed.shape) == tuple(ref.shape) and packed.dtype == ref.dtype
    for key in _keys_to_try(len(ref)):
        ref_key = torch.from_numpy(key) if isinstance(key, np.ndarray) else key
        want = ref[ref_key]
        got = packed[key]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8, key
        assert got.shape == want.shape and torch.equal(got, want), key


@pytest.fixture
def hand_packed(tmp_path, fashion_small) -> tuple[PackedImages, torch.Tensor]:
    x, _ = fashion_small
    ref = torch.from_numpy(np.stack([x[:14], 255 - x[14:28], x[28:42] // 2], axis=1).copy())  # (14, 3, 28, 28)
    path = tmp_path / "hand.u8"
    path.write_bytes(ref.numpy().tobytes())
    return PackedImages(path, 14, (3, 28, 28)), ref


def test_packed_images_index_like_a_tensor(hand_packed):
    packed, ref = hand_packed
    _assert_same_indexing(packed, ref)
    assert torch.equal(packed[::-1], ref.flip(0)) and torch.equal(packed[12:1:-3], ref.flip(0)[1:12:3])
    with pytest.raises(IndexError):
        packed[14]


def test_packed_subset_views(hand_packed):
    packed, ref = hand_packed
    positions = np.array([9, 2, 2, 13, 0, 5, 7, 11, 4])
    view = packed.subset(positions)
    _assert_same_indexing(view, ref[torch.from_numpy(positions)])
    mask = np.arange(14) % 3 != 1
    _assert_same_indexing(packed.subset(mask), ref[torch.from_numpy(mask)])
    nested = view.subset(np.array([8, 0, 3, 3, 1, 6]))  # a view of a view
    _assert_same_indexing(nested, ref[torch.from_numpy(positions)][torch.tensor([8, 0, 3, 3, 1, 6])])
    # a view survives pickling (DataLoader workers), reopening the file in its new life
    copy = pickle.loads(pickle.dumps(nested))
    assert torch.equal(copy[:], ref[torch.from_numpy(positions)][torch.tensor([8, 0, 3, 3, 1, 6])])
    assert torch.equal(packed[:], ref), "a view reads nothing into its parent"


def test_packed_from_load_matches_the_files(tmp_path, fashion_small):
    """A list with its own split: x_train and x_eval are views of one pack, in the list's order."""
    x, y = fashion_small
    (tmp_path / "imgs").mkdir()
    lines, train, held = ["path,label,split"], [], []
    for i in range(24):
        img = x[i * 11 % len(x)]
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i}.png")
        split = "test" if i % 4 == 1 else "train"
        lines.append(f"imgs/{i}.png,{int(y[i * 11 % len(x)]) % 3},{split}")
        (held if split == "test" else train).append(np.asarray(Image.open(tmp_path / "imgs" / f"{i}.png")))
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    ds = data.load(str(tmp_path / "list.csv"), cache_dir=tmp_path / "cache", workers=1)
    assert isinstance(ds.x_train, PackedImages) and isinstance(ds.x_eval, PackedImages)
    assert ds.x_train.path == ds.x_eval.path
    _assert_same_indexing(ds.x_train, torch.from_numpy(np.stack(train)[:, None]))
    _assert_same_indexing(ds.x_eval, torch.from_numpy(np.stack(held)[:, None]))
    mask = (ds.y_train == ds.y_train[0]).numpy()
    _assert_same_indexing(data.take(ds.x_train, mask), torch.from_numpy(np.stack(train)[mask][:, None]))


# --- 5. fingerprint and cache -----------------------------------------------------------------------------

def _pack_files(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("images-*.u8")}


def test_cache_is_reused_and_follows_every_change(tmp_path, fashion_small):
    x, y = fashion_small
    pick = np.concatenate([np.flatnonzero(y == c)[:8] for c in (4, 8, 5)])
    files = _png_folder(tmp_path / "shop", x[pick], y[pick], {4: "coat", 8: "bag", 5: "sandal"})
    root, cache = tmp_path / "shop", tmp_path / "cache"
    ds1 = data.load(str(root), cache_dir=cache, workers=1)
    packs = _pack_files(cache)
    assert len(packs) == 1

    ds2 = data.load(str(root), cache_dir=cache, workers=1)
    assert _pack_files(cache) == packs, "the pack was written again"
    assert ds2.sha256_16 == ds1.sha256_16 and _by_label(ds2) == _by_label(ds1)
    assert torch.equal(ds2.x_train[:], ds1.x_train[:]) and torch.equal(ds2.y_eval, ds1.y_eval)

    # new pixels in one file (another real image): a new fingerprint, and the new pixels are what load gives
    target = sorted(files)[2]
    old, name = files[target]
    new = x[200]
    assert not np.array_equal(new, old)
    Image.fromarray(new).save(target)
    ds3 = data.load(str(root), cache_dir=cache, workers=1)
    assert ds3.sha256_16 != ds1.sha256_16
    label = ds3.classes.index(name)
    got = _by_label(ds3)
    assert got[(new.tobytes(), label)] >= 1
    assert got == _by_label(ds1) - Counter({(old.tobytes(), label): 1}) + Counter({(new.tobytes(), label): 1})
    assert len(_pack_files(cache)) == 2

    # the same file moved to another class: a new fingerprint, and its pixels under the new label
    other = next(c for c in ds3.classes if c != name)
    moved = root / other / target.name  # same name, another class folder
    target.rename(moved)
    ds4 = data.load(str(root), cache_dir=cache, workers=1)
    assert ds4.sha256_16 not in (ds1.sha256_16, ds3.sha256_16)
    assert _by_label(ds4) == got - Counter({(new.tobytes(), label): 1}) + \
        Counter({(new.tobytes(), ds4.classes.index(other)): 1})

    # and the geometry is part of the key: another size is another pack, not the old one misread
    ds5 = data.load(str(root), geometry=Geometry((20, 20)), cache_dir=cache, workers=1)
    assert ds5.input_shape == (1, 20, 20) and ds5.sha256_16 != ds4.sha256_16


def test_relabelling_a_list_row_changes_the_fingerprint(tmp_path, fashion_small):
    """Only the label column changes (same files, same order): the fingerprint must still change."""
    rows = _list_images(tmp_path, fashion_small, per_class=4)
    listing, cache = tmp_path / "shop.csv", tmp_path / "cache"
    lines = [f"{rel},{name},{'test' if i % 4 == 0 else 'train'}" for i, (rel, _, name) in enumerate(rows)]
    listing.write_text("\n".join(lines) + "\n")
    ds1 = data.load(str(listing), cache_dir=cache, workers=1)
    rel, img, name = rows[1]
    other = next(c for c in ("bag", "coat", "sandal") if c != name)
    lines[1] = f"{rel},{other},train"
    listing.write_text("\n".join(lines) + "\n")
    ds2 = data.load(str(listing), cache_dir=cache, workers=1)
    assert ds2.sha256_16 != ds1.sha256_16
    assert torch.equal(ds2.x_train[:], ds1.x_train[:])  # the same pixels in the same order ...
    changed = (ds2.y_train != ds1.y_train).nonzero().flatten().tolist()
    assert changed == [0] and ds2.classes[ds2.y_train[0]] == other  # ... one label moved
    assert ds2.x_train[0][0].numpy().tobytes() == img.tobytes()


# --- 6. non-regular files ---------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_in_a_class_folder_is_skipped_without_hanging(tmp_path, fashion_small):
    x, y = fashion_small
    pick = np.concatenate([np.flatnonzero(y == c)[:8] for c in (4, 8)])
    _png_folder(tmp_path / "shop", x[pick], y[pick], {4: "coat", 8: "bag"})
    count = sum(1 for _ in (tmp_path / "shop").rglob("*.png"))
    fifo = tmp_path / "shop" / "coat" / "9.png"
    os.mkfifo(fifo)
    with deadline(30):
        ds = data.load(str(tmp_path / "shop"), cache_dir=tmp_path / "cache", workers=1)
        assert len(ds.y_train) + len(ds.y_eval) == count
        assert str(fifo) not in ds.skipped or "regular" in ds.skipped[str(fifo)]
        ds = data.load(str(tmp_path / "shop"), skip_bad_images=True, cache_dir=tmp_path / "cache2", workers=2)
        assert len(ds.y_train) + len(ds.y_eval) == count
        # a list naming the pipe: refused, not read
        (tmp_path / "list.csv").write_text("".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n"
                                                   for p in sorted((tmp_path / "shop").rglob("*.png"))))
        with pytest.raises(BadInput, match="9.png"):
            data.load(str(tmp_path / "list.csv"), cache_dir=tmp_path / "cache3", workers=1)
        # and the header check refuses it on its own too
        with pytest.raises(images.BadImage, match="not a regular file"):
            images.header(fifo)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_as_the_data_spec_is_bad_input(tmp_path):
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    with deadline(30), pytest.raises(BadInput, match="data.npz"):
        data.load(str(fifo), cache_dir=tmp_path / "cache", workers=1)


# --- 7. Resize + CenterCrop arithmetic --------------------------------------------------------------------

@pytest.mark.parametrize("width,height,resized,box", [
    (100, 60, (66, 40), (17, 4, 49, 36)),   # int(40 * 100 / 60) = 66; left round(34 / 2) = 17
    (60, 100, (40, 66), (4, 17, 36, 49)),   # portrait: the same turned
    (98, 60, (65, 40), (16, 4, 48, 36)),    # int(65.33) = 65; left round(16.5) = 16, Python's (and torchvision's)
    (60, 60, (40, 40), (4, 4, 36, 36)),
])
def test_resize_then_center_crop_like_torchvision(tmp_path, fashion_small, width, height, resized, box):
    img = _tint(_images_of(fashion_small, 9, 1)[0])
    path = tmp_path / f"{width}x{height}.png"
    Image.fromarray(img, "RGB").resize((width, height), Image.BICUBIC).save(path)
    # by hand: the shorter side to 40, the longer int(40 * long / short), then the 32x32 box at the centre
    want = Image.open(path).convert("RGB").resize(resized, Image.BILINEAR).crop(box)
    want = np.asarray(want).transpose(2, 0, 1)
    geometry = Geometry(size=(32, 32), resize=40, channels="rgb")
    got = images.decode(path, geometry)
    assert got.shape == (3, 32, 32) and np.array_equal(got, want)

    # the same through load (a folder with its own test split, so the order is known)
    for part, name in (("train", "a"), ("train", "b"), ("test", "a")):
        (tmp_path / "data" / part / name).mkdir(parents=True)
        Image.open(path).save(tmp_path / "data" / part / name / "0.png")
    ds = data.load(str(tmp_path / "data"), geometry=Geometry(size=(32, 32), resize=40),
                   cache_dir=tmp_path / "cache", workers=1)
    assert ds.input_shape == (3, 32, 32)
    assert all(np.array_equal(t.numpy(), want) for t in (*ds.x_train, *ds.x_eval))


def test_resize_to_a_size_that_is_not_square(tmp_path, fashion_small):
    img = _tint(_images_of(fashion_small, 9, 1)[0])
    path = tmp_path / "p.png"
    Image.fromarray(img, "RGB").resize((90, 70), Image.BICUBIC).save(path)
    # size is (height, width): resize=0 goes straight to it
    want = np.asarray(Image.open(path).resize((24, 48), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(images.decode(path, Geometry(size=(48, 24), channels="rgb")), want)
    # and a crop (height 40, width 24) out of the shorter side 50: 64 x 50 after the resize
    want = np.asarray(Image.open(path).resize((64, 50), Image.BILINEAR).crop((20, 5, 44, 45))).transpose(2, 0, 1)
    assert np.array_equal(images.decode(path, Geometry(size=(40, 24), resize=50, channels="rgb")), want)
