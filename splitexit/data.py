"""Datasets: Fashion-MNIST from IDX files, image folders, in-memory arrays, seeded splits.

    IDX files ─ read_idx ─ load_fashion_mnist ─┬─ fashion_mnist_splits ─ train / calibration / test
    class folders of images ─ ImageFolder      │
                                               └─ ArrayDataset(images, labels, Preprocess) ─► model

Fashion-MNIST is looked for, in order, in `$SPLITEXIT_DATA` (the IDX files directly in it or in
its `fashion-mnist/` subdirectory), in `/usr/share/datasets/fashion-mnist` (Debian package
`dataset-fashion-mnist`) and in the user cache (`$XDG_CACHE_HOME/splitexit/fashion-mnist`, by
default `~/.cache/...`). Only when none has it is it downloaded, into the cache, from the
official Zalando Research bucket (or `$SPLITEXIT_FASHION_MNIST_URL`), checked against the
published MD5 sums.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from splitexit.errors import DatasetError
from splitexit.preprocess import Preprocess, open_image, pil_to_array, require_pillow

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ Fashion-MNIST

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Pixel mean and standard deviation of the 60k training images, scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

#: The download links of the Fashion-MNIST README (github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Debian/Ubuntu: `apt-get install dataset-fashion-mnist`.
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: MD5 of the official .gz files, as published in the Fashion-MNIST README.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_MAX_DOWNLOAD_BYTES = 64 << 20  # the largest file is 26 MB

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str], max_bytes: int = 1 << 32) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in `.gz`.

    Checks the magic number, the dimensions and that the payload is exactly as long as they
    say; anything else raises DatasetError. At most `max_bytes` of payload are read.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DatasetError(
                    f"{path} is not an IDX file (magic number {magic.hex() or 'missing'}); "
                    "replace it with an intact copy of the dataset"
                )
            ndim = magic[3]
            raw_dims = f.read(4 * ndim)
            if ndim == 0 or len(raw_dims) != 4 * ndim:
                raise DatasetError(f"{path}: IDX header truncated or has no dimensions")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > max_bytes:
                raise DatasetError(f"{path}: IDX header claims {nbytes} bytes (limit {max_bytes})")
            payload = _read_at_most(f, nbytes)
            got = len(payload)
            trailing = f.read(1)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"cannot read {path}: {e}; the file is corrupt or truncated, replace it"
        ) from e
    if got != nbytes:
        raise DatasetError(
            f"{path} is truncated: dimensions {dims} need {nbytes} bytes, found {got}; "
            "replace it with an intact copy"
        )
    if trailing:
        raise DatasetError(f"{path} has data past the {nbytes} bytes its dimensions {dims} need")
    return (
        np.frombuffer(payload, dtype=dtype)
        .astype(dtype.newbyteorder("="), copy=False)
        .reshape(dims)
    )


def _read_at_most(f: Any, n: int) -> bytearray:
    """Up to n bytes, in chunks: a lying header costs no more memory than the real data."""
    buf = bytearray()  # writable, so the array built on it is too
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), 1 << 24))
        if not chunk:
            break
        buf += chunk
    return buf


def cache_dir() -> Path:
    """Where downloads go: `$XDG_CACHE_HOME/splitexit/fashion-mnist` or `~/.cache/...`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "splitexit" / "fashion-mnist"


def _search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs = []
    env = os.environ.get("SPLITEXIT_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    return [*dirs, SYSTEM_DATA_DIR, cache_dir()]


def _split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of `split` in `directory`, uncompressed preferred."""
    found = []
    for name in _SPLIT_FILES[split]:
        candidates = [directory / name, directory / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def find_fashion_mnist(
    split: str | None = None, root: str | os.PathLike[str] | None = None
) -> Path | None:
    """The first directory of the search order holding `split` (both splits if None), or None."""
    splits = list(_SPLIT_FILES) if split is None else [_check_split(split)]
    for d in _search_dirs(root):
        if all(_split_files(d, s) is not None for s in splits):
            return d
    return None


def _check_split(split: str) -> str:
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    return split


def _download(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream `url` to `dest` atomically, checking size and MD5 on the way."""
    import httpx
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    log.info("downloading %s to %s", url, dest)
    try:
        with httpx.stream(
            "GET", url, follow_redirects=True, timeout=httpx.Timeout(timeout, connect=10.0)
        ) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                open(tmp, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
            ):
                for chunk in response.iter_bytes(1 << 16):
                    size += len(chunk)
                    if size > _MAX_DOWNLOAD_BYTES:
                        raise DatasetError(f"{url} is larger than {_MAX_DOWNLOAD_BYTES} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise DatasetError(
                f"{url} has MD5 {digest.hexdigest()}, expected {md5}: the download is corrupt "
                "or the mirror serves other files"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _not_found_message(split: str, searched: list[Path], reason: str, root: Any) -> str:
    unset = root is None and not os.environ.get("SPLITEXIT_DATA")
    looked = (["$SPLITEXIT_DATA (not set)"] if unset else []) + [str(d) for d in searched]
    files = " and ".join(f"{n}.gz" for n in _SPLIT_FILES[split])
    return (
        f"Fashion-MNIST ({split} split) not found; looked in: {', '.join(looked)}. {reason}\n"
        "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        f"{files} (gzipped or not) in a directory and set SPLITEXIT_DATA to it, "
        "or retry with network access and download=True."
    )


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str | None = None,
    timeout: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) as uint8 [N, 28, 28] and int64 [N].

    `root` replaces the search order with that one directory (and its `fashion-mnist/`),
    which is then also where a download goes. `url` (or `$SPLITEXIT_FASHION_MNIST_URL`)
    replaces the official download location. Raises DatasetError, saying where it looked
    and how to get the data, when the files are missing and cannot be downloaded.
    """
    _check_split(split)
    searched = _search_dirs(root)
    files = next((f for d in searched if (f := _split_files(d, split)) is not None), None)
    if files is None:
        if not download:
            raise DatasetError(_not_found_message(split, searched, "download=False.", root))
        import httpx

        base = url or os.environ.get("SPLITEXIT_FASHION_MNIST_URL") or FASHION_MNIST_URL
        target = Path(root) if root is not None else cache_dir()
        try:
            for name in _SPLIT_FILES[split]:
                gz = f"{name}.gz"
                if (target / name).is_file() or (target / gz).is_file():
                    continue  # half a split is already there
                _download(f"{base.rstrip('/')}/{gz}", target / gz, FASHION_MNIST_MD5[gz], timeout)
        except (OSError, DatasetError, httpx.HTTPError) as e:
            reason = f"Downloading from {base} failed: {type(e).__name__}: {e}."
            raise DatasetError(_not_found_message(split, searched, reason, root)) from e
        files = _split_files(target, split)
        assert files is not None
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{files[0]} holds {images.dtype} {images.shape}, not uint8 [N, 28, 28] images"
        )
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DatasetError(
            f"{files[1]} holds {labels.dtype} {labels.shape}, not {len(images)} uint8 labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{files[1]} has label {labels.max()}; Fashion-MNIST has 10 classes")
    return images, labels.astype(np.int64)


def fashion_mnist_splits(
    seed: int = 0,
    calibration: int = 5000,
    subset: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as {"train", "calibration", "test"} -> (images, labels).

    "calibration" is `calibration` images held out of the official training set (stratified
    by class, drawn with `seed`), "train" is the rest, "test" the official 10k. `subset` caps
    every split at that many samples (a stratified, seeded draw) for quick experiments.
    """
    x, y = load_fashion_mnist("train", root=root, download=download)
    if not 0 <= calibration < len(y):
        raise ValueError(f"calibration must be in [0, {len(y)}), got {calibration}")
    idx = split_indices(
        len(y), {"train": len(y) - calibration, "calibration": calibration}, seed, stratify=y
    )
    splits = {name: (x[i], y[i]) for name, i in idx.items()}
    splits["test"] = load_fashion_mnist("test", root=root, download=download)
    if subset is not None:
        if subset < 0:
            raise ValueError(f"subset must be non-negative, got {subset}")
        for name, (xs, ys) in splits.items():
            if subset < len(ys):
                keep = split_indices(len(ys), {"keep": subset}, seed, stratify=ys)["keep"]
                splits[name] = (xs[keep], ys[keep])
    return splits


# ------------------------------------------------------------------------------------ splits

_DEFAULT_SPLIT_NAMES = {2: ("train", "test"), 3: ("train", "val", "test")}


def _split_counts(n: int, fractions: Mapping[str, float] | Sequence[float]) -> dict[str, int]:
    if not isinstance(fractions, Mapping):
        names = _DEFAULT_SPLIT_NAMES.get(len(fractions))
        if names is None:
            raise ValueError("a tuple of fractions must have 2 or 3 entries; name more in a dict")
        fractions = dict(zip(names, fractions, strict=True))
    if not fractions:
        raise ValueError("fractions is empty")
    counts: dict[str, int] = {}
    remainders: dict[str, float] = {}
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, int | float | np.integer | np.floating):
            raise TypeError(f"split {name!r}: expected a fraction (float) or a count (int)")
        if isinstance(f, int | np.integer):
            if f < 0:
                raise ValueError(f"split {name!r}: count {f} is negative")
            counts[name] = int(f)
        else:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"split {name!r}: fraction {f} is outside [0, 1]")
            counts[name] = math.floor(f * n)
            remainders[name] = f * n - counts[name]
    # Fractions that add up to 1 cover all n samples: hand out the rounding leftovers.
    if len(remainders) == len(counts) and math.isclose(sum(fractions.values()), 1.0):
        leftover = n - sum(counts.values())
        for name in sorted(remainders, key=lambda k: -remainders[k])[:leftover]:
            counts[name] += 1
    if sum(counts.values()) > n:
        raise ValueError(f"splits {counts} need {sum(counts.values())} samples, only {n} exist")
    return counts


def _random_order(n: int, rng: np.random.Generator) -> np.ndarray:
    # argsort of uniform draws rather than rng.permutation: it depends only on the PCG64 bit
    # stream, which numpy keeps stable across versions, so a seed means the same split forever.
    return np.argsort(rng.random(n), kind="stable")


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the samples in which every prefix has (almost) the class balance."""
    n = len(labels)
    perm = _random_order(n, rng)
    _, cls, sizes = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[cls[by_class]]
    # The k-th of a class's n_c samples lands in [k / n_c, (k + 1) / n_c).
    key = (rank + rng.random(n)) / sizes[cls]
    return perm[np.argsort(key, kind="stable")]


def split_indices(
    n: int,
    fractions: Mapping[str, float] | Sequence[float],
    seed: int,
    stratify: np.ndarray | Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Disjoint, seeded random splits of range(n): {name: sorted int64 indices}.

    Each value of `fractions` is a fraction of n (float) or a number of samples (int).
    Fractions summing to 1 use every sample; otherwise the rest is left out. A tuple
    names its 2 or 3 splits ("train", "test") or ("train", "val", "test"). With `stratify`
    (one label per sample) each split keeps the class balance to within a sample per class.
    The same arguments give the same splits on every machine and numpy version.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    counts = _split_counts(n, fractions)
    rng = np.random.default_rng(seed)
    if stratify is None:
        order = _random_order(n, rng)
    else:
        labels = np.asarray(stratify)
        if labels.shape != (n,):
            raise ValueError(f"stratify must hold one label per sample ({n}), got {labels.shape}")
        order = _stratified_order(labels, rng)
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = np.sort(order[start : start + count]).astype(np.int64)
        start += count
    return out


# ---------------------------------------------------------------------------------- datasets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolder(Dataset):
    """Images under `root/<class name>/**`, labelled by class folder (classes sorted by name).

    Files are found recursively, filtered by extension (case-insensitive) and sorted, so the
    sample order is the same on every machine. Items are (uint8 [H, W, C] array, label), or
    (PIL image, label) with `as_pil=True`; `mode` forces a Pillow mode ("RGB", "L"), by
    default grayscale stays 1-channel and everything else becomes RGB. `transform`, if given,
    is applied to the image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        transform: Callable[[Any], Any] | None = None,
        mode: str | None = None,
        as_pil: bool = False,
    ) -> None:
        require_pillow()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.classes: list[str] = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise DatasetError(
                f"{self.root} has no class folders; lay it out as {self.root}/<class>/<image>"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = self.root / name
            files = sorted(
                (p for p in class_dir.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                key=lambda p: p.relative_to(class_dir).as_posix(),
            )
            if not files:
                raise DatasetError(f"class folder {class_dir} has no images with {exts}")
            self.samples += [(p, label) for p in files]
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self.transform = transform
        self.mode = mode
        self.as_pil = as_pil

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            img = open_image(path, max_pixels=None)  # Pillow's MAX_IMAGE_PIXELS still applies
            if self.as_pil:
                sample: Any = img.convert(self.mode) if self.mode else img
            else:
                sample = pil_to_array(img, self.mode)
                img.close()
        except Exception as e:  # Pillow raises a zoo of types for a bad file
            raise DatasetError(f"cannot load image {path}: {e}") from e
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, label


class ArrayDataset(Dataset):
    """A dataset over in-memory uint8 images [N, H, W] or [N, H, W, C] and labels [N].

    Items are (transform(image), label). `transform` takes a batch, like `Preprocess`, and is
    applied per batch by `__getitems__` (which `DataLoader` uses) and `batches`. Without one,
    images become float32 [C, H, W] in [0, 1].
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int],
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
            )
        if transform is None:
            channels = 1 if images.ndim == 3 else images.shape[3]
            transform = Preprocess(size=images.shape[1:3], channels=channels)
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index][None])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x = self.transform(self.images[np.asarray(indices, dtype=np.int64)])
        return list(zip(x.unbind(0), self.labels[indices].tolist(), strict=True))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, int64 labels) batches; with `shuffle`, the order is drawn from `seed`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        order = _random_order(n, np.random.default_rng(seed)) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.transform(self.images[idx]), torch.from_numpy(self.labels[idx])
