"""Where inputs come from: a folder of images, image paths on stdin, a video or a camera.

    --source DIR          every image under DIR (recursive, sorted); DIR/<class>/... labels it
    --source FILE.png     one image
    --source -            image paths, one per line, from stdin
    --source FILE.mp4     the frames of a video      (OpenCV: pip install 'splitexit[video]')
    --source camera:0     frames from camera 0       (OpenCV)

Each input has a unique id (the path relative to the folder, the path as given, or
`<video>#<frame>`). Images load lazily (`Input.load()`), in the agent's worker thread. A
source that may wait for its next input (stdin, a video, a camera) is read in that thread
too; a folder or a list, on the agent's event loop (a thread hop costs more).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from splitexit.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
_CAMERA = re.compile(r"(?:camera|cam)(?::(\d+))?")


@dataclass
class Input:
    """One input: id, where it came from, its label (a class name) if known, its pixels."""

    id: str
    path: Path | None = None
    label: str | None = None
    image: np.ndarray | None = None

    def load(self) -> np.ndarray:
        """The image as uint8 [H, W, C] (C = 1 or 3); raises DatasetError if unreadable."""
        if self.image is not None:
            return self.image
        if self.path is None:
            raise DatasetError(f"input {self.id!r} has neither pixels nor a path")
        from splitexit.preprocess import open_image, pil_to_array

        try:
            with open_image(self.path) as img:
                return pil_to_array(img)
        except Exception as e:  # Pillow raises many types for a bad file
            raise DatasetError(f"cannot read image {self.path}: {e}") from e


class Source:
    """An iterable of inputs with an optional length (for the progress bar); `blocking`:
    taking the next input may wait (a camera, stdin), so the agent takes it off its event
    loop."""

    def __init__(
        self,
        items: Callable[[], Iterator[Input]],
        length: int | None = None,
        *,
        blocking: bool = True,
    ) -> None:
        self._items = items
        self.length = length
        self.blocking = blocking

    def __iter__(self) -> Iterator[Input]:
        return self._items()


def folder_source(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Source:
    """Every image under `root`, recursively, sorted by relative path.

    Files in a subfolder are labelled by its first level (`root/<class>/.../x.png`); files
    directly in `root` have no label.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DatasetError(f"{root} holds no images ({', '.join(exts)})")

    def items() -> Iterator[Input]:
        for p in files:
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            yield Input(rel.as_posix(), path=p, label=label)

    return Source(items, len(files), blocking=False)  # the files are listed already


def paths_source(lines: Iterable[str]) -> Source:
    """Image paths, one per line (blank lines skipped); a repeated path gets a `#n` suffix."""

    def items() -> Iterator[Input]:
        seen: dict[str, int] = {}
        for line in lines:
            path = line.strip()
            if not path:
                continue
            n = seen.get(path, 0)
            seen[path] = n + 1
            yield Input(path if n == 0 else f"{path}#{n}", path=Path(path))

    return Source(items)


def video_source(target: str | int, *, name: str | None = None) -> Source:
    """Frames of a video file or camera (an int index) as RGB inputs `<name>#<frame>`."""
    cv2 = _require_cv2()
    name = name or (f"camera{target}" if isinstance(target, int) else Path(target).name)

    def items() -> Iterator[Input]:
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            raise DatasetError(f"OpenCV cannot open {target!r}; check the path or camera index")
        try:
            index = 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                rgb = (
                    np.ascontiguousarray(frame[..., ::-1]) if frame.ndim == 3 else frame[..., None]
                )
                yield Input(f"{name}#{index:06d}", image=rgb)
                index += 1
        finally:
            cap.release()

    return Source(items)


def open_source(spec: str, *, stdin: IO[str] | None = None) -> Source:
    """The source `spec` names (see the module docstring); DatasetError if it names nothing."""
    if spec == "-":
        return paths_source(stdin if stdin is not None else sys.stdin)
    m = _CAMERA.fullmatch(spec)
    if m:
        return video_source(int(m.group(1) or 0))
    path = Path(spec)
    if path.is_dir():
        return folder_source(path)
    if path.is_file():
        ext = path.suffix.lower()
        if ext in VIDEO_EXTENSIONS:
            return video_source(str(path))
        if ext in IMAGE_EXTENSIONS:
            return Source(lambda: iter([Input(path.name, path=path)]), 1, blocking=False)
        raise DatasetError(
            f"{path} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a video "
            f"({', '.join(VIDEO_EXTENSIONS)})"
        )
    raise DatasetError(
        f"source {spec!r} does not exist: give a folder, an image, a video, '-' (paths on "
        "stdin) or camera:N"
    )


def limit(source: Source, n: int | None) -> Source:
    """At most the first `n` inputs of `source` (all if n is None)."""
    if n is None:
        return source
    if n < 0:
        raise ValueError(f"limit must be >= 0, got {n}")

    def items() -> Iterator[Input]:
        for i, item in enumerate(source):
            if i >= n:
                return
            yield item

    length = n if source.length is None else min(n, source.length)
    return Source(items, length, blocking=blocks(source))


def blocks(source: Iterable[Input]) -> bool:
    """Whether taking an input from `source` may wait: a list or a tuple does not, a
    `Source` says, any other iterable may."""
    if isinstance(source, (list, tuple)):
        return False
    return bool(getattr(source, "blocking", True))


def label_index(label: str | None, class_names: Sequence[str]) -> int | None:
    """The class index a folder name stands for, or None.

    Matches the class name exactly, then ignoring case and punctuation (a folder cannot be
    named "T-shirt/top": "T-shirt_top" and "tshirt-top" match it), then a bare index.
    """
    if label is None:
        return None
    if label in class_names:
        return list(class_names).index(label)
    key = _key(label)
    keys = [_key(c) for c in class_names]
    if key and keys.count(key) == 1:
        return keys.index(key)
    if label.isdigit() and int(label) < len(class_names):
        return int(label)
    return None


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _require_cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "video and camera sources need OpenCV: pip install opencv-python-headless "
            "(or pip install 'splitexit[video]'); on a Jetson use the JetPack OpenCV"
        ) from e
    return cv2
