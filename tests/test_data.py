"""Datasets: IDX parsing, Fashion-MNIST lookup and download, splits, ImageFolder, ArrayDataset.

No test touches the network: downloads go to an unreachable loopback port or to a throwaway
HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from splitexit.data import (
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    ImageFolder,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    split_indices,
)
from splitexit.data import fashion_mnist as data
from splitexit.errors import DatasetError
from splitexit.preprocess import Preprocess

N_TRAIN, N_TEST = 60, 20


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    """Write `array` as an IDX file (gzipped if `path` ends in .gz)."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def unique_images(n: int, offset: int = 0) -> np.ndarray:
    """n distinct 28x28 images: pixels (0, 0) and (0, 1) encode the index."""
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    i = np.arange(offset, offset + n)
    x[:, 0, 0], x[:, 0, 1], x[:, 5:, 5:] = i % 256, i // 256, 100
    return x


def image_ids(x: np.ndarray) -> set[int]:
    return set((x[:, 0, 0].astype(int) + 256 * x[:, 0, 1].astype(int)).tolist())


def write_fashion_mnist(directory: Path, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n, offset in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1000)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", unique_images(n, offset))
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return directory


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user cache, no $SPLITEXIT_DATA, no proxy: only what a test sets up is visible."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("SPLITEXIT_DATA", "SPLITEXIT_FASHION_MNIST_URL"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "no-such-package")


# ------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_read_idx_round_trips_ubyte_files(tmp_path, name):
    x = unique_images(7)
    y = read_idx(write_idx(tmp_path / name, x))
    assert y.dtype == np.uint8 and np.array_equal(y, x)
    y[0, 0, 0] = 1  # a writable array, not a view of immutable bytes


def test_read_idx_returns_native_byte_order_for_wide_types(tmp_path):
    x = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    y = read_idx(write_idx(tmp_path / "a.idx", x, code=0x0C))
    assert y.dtype == np.dtype("int32") and y.dtype.isnative and np.array_equal(y, x)


def test_truncated_idx_raises_dataset_error(tmp_path):
    raw = write_idx(tmp_path / "a.idx", unique_images(3)).read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "short.idx.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        read_idx(tmp_path / "short.idx.gz")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00\x08",  # magic cut short
        b"\x1f\x8b\x08\x03" + bytes(16),  # a gzip header in a file not named .gz
        b"\x00\x00\x07\x01" + bytes(8),  # unknown type code
        b"\x00\x00\x08\x00",  # no dimensions
        b"\x00\x00\x08\x03\x00\x00",  # dimensions cut short
    ],
)
def test_bad_magic_or_header_raises_dataset_error(tmp_path, raw):
    (tmp_path / "bad.idx").write_bytes(raw)
    with pytest.raises(DatasetError):
        read_idx(tmp_path / "bad.idx")


def test_trailing_bytes_raise_dataset_error(tmp_path):
    path = write_idx(tmp_path / "a.idx", unique_images(2))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match="past the"):
        read_idx(path)


def test_header_claiming_huge_size_is_refused_before_reading(tmp_path):
    (tmp_path / "big.idx").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 28, 28))
    with pytest.raises(DatasetError, match="limit"):
        read_idx(tmp_path / "big.idx")


def test_not_a_gzip_file_named_gz_raises_dataset_error(tmp_path):
    (tmp_path / "a.idx.gz").write_bytes(b"plain text")
    with pytest.raises(DatasetError, match="corrupt"):
        read_idx(tmp_path / "a.idx.gz")


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_loads_both_splits_from_splitexit_data(monkeypatch, tmp_path, gz):
    monkeypatch.setenv("SPLITEXIT_DATA", str(write_fashion_mnist(tmp_path / "d", gz=gz)))
    x, y = load_fashion_mnist("train")
    assert x.dtype == np.uint8 and x.shape == (N_TRAIN, 28, 28)
    assert y.dtype == np.int64 and y.tolist() == [i % 10 for i in range(N_TRAIN)]
    assert image_ids(x) == set(range(N_TRAIN))
    xt, _ = load_fashion_mnist("test")
    assert xt.shape == (N_TEST, 28, 28) and image_ids(xt) == set(range(1000, 1000 + N_TEST))


def test_splitexit_data_may_hold_a_fashion_mnist_subdirectory(monkeypatch, tmp_path):
    write_fashion_mnist(tmp_path / "datasets" / "fashion-mnist")
    monkeypatch.setenv("SPLITEXIT_DATA", str(tmp_path / "datasets"))
    assert find_fashion_mnist() == tmp_path / "datasets" / "fashion-mnist"
    assert load_fashion_mnist("test")[0].shape == (N_TEST, 28, 28)


def test_splitexit_data_comes_before_the_system_package_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", write_fashion_mnist(tmp_path / "system"))
    write_fashion_mnist(tmp_path / "cache" / "splitexit" / "fashion-mnist")
    assert find_fashion_mnist() == tmp_path / "system"
    monkeypatch.setenv("SPLITEXIT_DATA", str(write_fashion_mnist(tmp_path / "env")))
    assert find_fashion_mnist() == tmp_path / "env"


def test_cache_is_searched_last(monkeypatch, tmp_path, no_system_data):
    cached = write_fashion_mnist(tmp_path / "cache" / "splitexit" / "fashion-mnist")
    assert find_fashion_mnist() == cached


def test_root_argument_replaces_the_search_order(tmp_path):
    root = write_fashion_mnist(tmp_path / "mine")
    assert find_fashion_mnist(root=root) == root
    assert find_fashion_mnist(root=tmp_path / "empty") is None
    assert load_fashion_mnist("test", root=root)[0].shape == (N_TEST, 28, 28)


def test_a_directory_with_only_one_split_counts_for_that_split(tmp_path):
    root = write_fashion_mnist(tmp_path / "d")
    for f in root.glob("train-*"):
        f.unlink()
    assert find_fashion_mnist("test", root=root) == root
    assert find_fashion_mnist(root=root) is None


def test_corrupt_file_found_first_is_an_error_not_skipped(monkeypatch, tmp_path):
    d = write_fashion_mnist(tmp_path / "d")
    path = d / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    monkeypatch.setenv("SPLITEXIT_DATA", str(d))
    with pytest.raises(DatasetError, match="t10k-images"):
        load_fashion_mnist("test")


def test_images_of_the_wrong_size_are_refused(tmp_path):
    d = write_fashion_mnist(tmp_path / "d")
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((N_TEST, 27, 28), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"not uint8 \[N, 28, 28\]"):
        load_fashion_mnist("test", root=d)


def test_label_count_and_range_are_checked(tmp_path):
    d = write_fashion_mnist(tmp_path / "d")
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(N_TEST - 1, dtype=np.uint8))
    with pytest.raises(DatasetError, match="labels"):
        load_fashion_mnist("test", root=d)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST, 10, dtype=np.uint8))
    with pytest.raises(DatasetError, match="10 classes"):
        load_fashion_mnist("test", root=d)


def test_unknown_split_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


@pytest.mark.skipif(
    not (data.SYSTEM_DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_system_package_test_split_is_the_real_balanced_10k():
    assert find_fashion_mnist("test") == data.SYSTEM_DATA_DIR
    x, y = load_fashion_mnist("test", download=False)
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.min() == 0 and y.max() == 9
    assert np.bincount(y).tolist() == [1000] * 10
    assert 0.25 < x.mean() / 255 < 0.32  # Fashion-MNIST pixel mean is about 0.286
    assert len(FASHION_MNIST_CLASSES) == 10


def test_unreachable_download_says_where_it_looked_and_what_to_do(
    monkeypatch, tmp_path, no_system_data
):
    monkeypatch.setenv("SPLITEXIT_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist("test", timeout=5.0)
    message = str(info.value)
    assert "127.0.0.1:9" in message
    assert str(tmp_path / "no-such-package") in message
    assert str(tmp_path / "cache" / "splitexit" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "SPLITEXIT_DATA" in message and "t10k-images-idx3-ubyte.gz" in message
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_download_false_fails_without_trying(tmp_path, no_system_data):
    with pytest.raises(DatasetError, match="download=False"):
        load_fashion_mnist("test", download=False, url="http://127.0.0.1:9/")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A throwaway HTTP server on 127.0.0.1 serving tiny Fashion-MNIST .gz files."""
    served = write_fashion_mnist(tmp_path / "served")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setattr(data, "FASHION_MNIST_MD5", md5)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_verifies_checksums_and_fills_the_cache(tmp_path, mirror, no_system_data):
    x, y = load_fashion_mnist("test", url=mirror)
    assert x.shape == (N_TEST, 28, 28) and len(y) == N_TEST
    cache = tmp_path / "cache" / "splitexit" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert find_fashion_mnist("test") == cache  # next time, no download
    load_fashion_mnist("test", url="http://127.0.0.1:9/")


def test_download_with_a_wrong_checksum_is_refused_and_not_kept(
    monkeypatch, tmp_path, mirror, no_system_data
):
    monkeypatch.setitem(data.FASHION_MNIST_MD5, "t10k-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(DatasetError, match="MD5"):
        load_fashion_mnist("test", url=mirror)
    assert find_fashion_mnist("test") is None
    cache = tmp_path / "cache" / "splitexit" / "fashion-mnist"
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(cache.glob(".*part"))


def test_download_into_root_when_root_is_given(tmp_path, mirror):
    root = tmp_path / "root"
    load_fashion_mnist("train", root=root, url=mirror)
    assert (root / "train-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------------------------- splits


def test_same_seed_gives_the_same_splits_and_another_seed_does_not():
    a = split_indices(1000, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    b = split_indices(1000, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    c = split_indices(1000, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])


def test_splits_are_pinned_across_numpy_versions():
    # If this changes, every published calibration split changes with it.
    s = split_indices(10, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert {k: v.tolist() for k, v in s.items()} == {
        "a": [1, 2, 3, 6, 8],
        "b": [0, 4, 7],
        "c": [5, 9],
    }


def test_fractions_summing_to_one_partition_every_index():
    s = split_indices(1001, (0.7, 0.2, 0.1), seed=0)
    assert list(s) == ["train", "val", "test"]
    assert [len(v) for v in s.values()] == [701, 200, 100]
    joined = np.concatenate(list(s.values()))
    assert np.array_equal(np.sort(joined), np.arange(1001))
    assert all(np.all(np.diff(v) > 0) for v in s.values())  # sorted, no repeats


def test_counts_and_partial_fractions_leave_the_rest_out():
    s = split_indices(100, {"calibration": 10, "test": 0.25}, seed=1)
    assert len(s["calibration"]) == 10 and len(s["test"]) == 25
    assert not set(s["calibration"].tolist()) & set(s["test"].tolist())
    assert s["test"].dtype == np.int64


def test_stratified_splits_keep_the_class_balance():
    labels = np.repeat(np.arange(10), [50, 100, 150, 200, 50, 100, 150, 200, 50, 50])
    s = split_indices(len(labels), {"train": 0.8, "cal": 0.2}, seed=0, stratify=labels)
    counts = np.bincount(labels[s["cal"]], minlength=10)
    assert np.all(np.abs(counts - 0.2 * np.bincount(labels)) <= 1)


@pytest.mark.parametrize(
    "fractions, error",
    [
        ({"a": 0.7, "b": 0.4}, ValueError),  # more than n
        ({"a": 101}, ValueError),
        ({"a": -1}, ValueError),
        ({"a": 1.5}, ValueError),
        ({"a": True}, TypeError),
        ({"a": "half"}, TypeError),
        ({}, ValueError),
        ((0.25, 0.25, 0.25, 0.25), ValueError),  # a tuple names 2 or 3 splits
    ],
)
def test_impossible_splits_are_refused(fractions, error):
    with pytest.raises(error):
        split_indices(100, fractions, seed=0)


def test_stratify_needs_one_label_per_sample():
    with pytest.raises(ValueError, match="one label per sample"):
        split_indices(10, {"a": 0.5}, seed=0, stratify=np.zeros(9))


def test_fashion_mnist_splits_hold_calibration_out_of_train(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITEXIT_DATA", str(write_fashion_mnist(tmp_path / "d")))
    s = fashion_mnist_splits(seed=0, calibration=20)
    assert list(s) == ["train", "calibration", "test"]
    (xtr, _), (xc, yc), (xt, _) = s["train"], s["calibration"], s["test"]
    assert len(xtr) == N_TRAIN - 20 and len(xc) == 20 and len(xt) == N_TEST
    assert not image_ids(xtr) & image_ids(xc)
    assert image_ids(xtr) | image_ids(xc) == set(range(N_TRAIN))
    assert np.bincount(yc).tolist() == [2] * 10  # stratified
    again = fashion_mnist_splits(seed=0, calibration=20)
    assert np.array_equal(again["calibration"][0], xc)
    other = fashion_mnist_splits(seed=1, calibration=20)
    assert image_ids(other["calibration"][0]) != image_ids(xc)


def test_fashion_mnist_splits_subset_caps_every_split(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITEXIT_DATA", str(write_fashion_mnist(tmp_path / "d")))
    s = fashion_mnist_splits(seed=0, calibration=20, subset=10)
    assert {k: len(v[1]) for k, v in s.items()} == {"train": 10, "calibration": 10, "test": 10}
    assert all(np.bincount(y).tolist() == [1] * 10 for _, y in s.values())
    full = fashion_mnist_splits(seed=0, calibration=20)
    assert image_ids(s["calibration"][0]) <= image_ids(full["calibration"][0])


# ----------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    pixels = {}
    for cls, files in (("zebra", ["b.png", "a/c.PNG", "a.png"]), ("ant", ["x.png"])):
        for i, name in enumerate(files):
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.full((6, 5, 3), 40 * i, dtype=np.uint8)
            arr[0, 0] = (255, 0, 0)
            Image.fromarray(arr).save(path, format="PNG")
            pixels[path] = arr
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root, pixels


def test_image_folder_classes_and_samples_are_sorted(image_tree):
    root, _ = image_tree
    ds = ImageFolder(root)
    assert ds.classes == ["ant", "zebra"]
    assert [(p.relative_to(root).as_posix(), y) for p, y in ds.samples] == [
        ("ant/x.png", 0),
        ("zebra/a.png", 1),
        ("zebra/a/c.PNG", 1),
        ("zebra/b.png", 1),
    ]
    assert ds.targets.tolist() == [0, 1, 1, 1] and len(ds) == 4


def test_image_folder_items_are_uint8_arrays_with_labels(image_tree):
    root, pixels = image_tree
    ds = ImageFolder(root)
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert y == label and x.dtype == np.uint8 and np.array_equal(x, pixels[path])
    gray, _ = ImageFolder(root, mode="L")[0]
    assert gray.shape == (6, 5, 1)


def test_image_folder_can_return_pil_images_and_apply_a_transform(image_tree):
    root, _ = image_tree
    img, _ = ImageFolder(root, as_pil=True)[0]
    assert isinstance(img, Image.Image) and img.size == (5, 6)
    pre = Preprocess(size=(8, 8), channels=3)
    x, _ = ImageFolder(root, transform=pre.one)[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32


def test_image_folder_errors_are_actionable(tmp_path, image_tree):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="<class>"):
        ImageFolder(tmp_path / "flat")
    root, _ = image_tree
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder(root)
    (root / "empty" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolder(root)
    with pytest.raises(DatasetError, match=r"broken\.png"):
        ds[ds.classes.index("empty")]  # "empty" sorts between "ant" and "zebra"


def test_image_folder_without_pillow_says_how_to_install_it(monkeypatch, image_tree):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        ImageFolder(image_tree[0])


# ---------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_applies_the_transform_per_item_and_per_batch():
    x = unique_images(10)
    y = np.arange(10) % 3
    pre = Preprocess(size=(14, 14), mean=(0.5,), std=(0.5,), channels=3)
    ds = ArrayDataset(x, y, pre)
    item, label = ds[4]
    assert item.shape == (3, 14, 14) and label == 1
    torch.testing.assert_close(item, pre(x[4:5])[0])
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))  # goes through __getitems__
    torch.testing.assert_close(xb, pre(x[:4]))
    assert yb.tolist() == [0, 1, 2, 0]


def test_array_dataset_default_transform_scales_to_unit_range():
    ds = ArrayDataset(np.full((2, 4, 4, 3), 255, dtype=np.uint8), [0, 1])
    x, _ = ds[0]
    assert x.shape == (3, 4, 4) and torch.all(x == 1.0)


def test_array_dataset_batches_cover_everything_once_in_a_seeded_order():
    ds = ArrayDataset(unique_images(10), np.arange(10))
    labels = [b.tolist() for _, b in ds.batches(4, shuffle=True, seed=7)]
    assert [len(b) for b in labels] == [4, 4, 2]
    order = [i for batch in labels for i in batch]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert labels == [b.tolist() for _, b in ds.batches(4, shuffle=True, seed=7)]
    assert [len(b) for _, b in ds.batches(4, drop_last=True)] == [4, 4]
    xb, yb = next(ds.batches(3))
    assert xb.shape == (3, 1, 28, 28) and yb.dtype == torch.int64


@pytest.mark.parametrize(
    "images, labels",
    [
        (np.zeros((3, 28, 28), np.float32), [0, 1, 2]),
        (np.zeros((3, 28), np.uint8), [0, 1, 2]),
        (np.zeros((3, 28, 28), np.uint8), [0, 1]),
        (np.zeros((3, 28, 28), np.uint8), [0.5, 1, 2]),
    ],
)
def test_array_dataset_refuses_mismatched_inputs(images, labels):
    with pytest.raises(ValueError):
        ArrayDataset(images, labels)
