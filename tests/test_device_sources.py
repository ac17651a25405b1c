"""Inputs come from folders, files, stdin paths (and, with OpenCV, videos and cameras); each
has a unique id, and a folder's class names become labels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitexit.errors import DatasetError
from splitexit_device.sources import (
    folder_source,
    label_index,
    limit,
    open_source,
    paths_source,
    video_source,
)


def png(path: Path, value: int = 0, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (5, 4)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)
    return path


def test_folder_is_read_recursively_sorted_with_labels_from_the_first_level(
    tmp_path: Path,
) -> None:
    png(tmp_path / "b" / "2.png")
    png(tmp_path / "b" / "deep" / "1.PNG")
    png(tmp_path / "a" / "9.png")
    png(tmp_path / "loose.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    src = folder_source(tmp_path)
    items = list(src)
    assert src.length == 4
    assert [i.id for i in items] == ["a/9.png", "b/2.png", "b/deep/1.PNG", "loose.png"]
    assert [i.label for i in items] == ["a", "b", "b", None]


def test_images_load_as_uint8_hwc(tmp_path: Path) -> None:
    gray = next(iter(open_source(str(png(tmp_path / "g.png", 7)))))
    rgb = next(iter(open_source(str(png(tmp_path / "c.png", 9, mode="RGB")))))
    assert gray.load().shape == (4, 5, 1) and gray.load().dtype == np.uint8
    assert rgb.load().shape == (4, 5, 3) and rgb.load()[0, 0, 0] == 9


def test_stdin_paths_get_unique_ids(tmp_path: Path) -> None:
    a = png(tmp_path / "a.png")
    stdin = io.StringIO(f"{a}\n\n  {a}  \n")
    assert [i.id for i in open_source("-", stdin=stdin)] == [str(a), f"{a}#1"]
    assert [i.id for i in paths_source(["x", "y"])] == ["x", "y"]


def test_limit_stops_early_and_knows_the_length(tmp_path: Path) -> None:
    for i in range(5):
        png(tmp_path / f"{i}.png")
    src = limit(folder_source(tmp_path), 3)
    assert src.length == 3 and len(list(src)) == 3
    assert limit(folder_source(tmp_path), None).length == 5


@pytest.mark.parametrize(
    ("label", "index"),
    [("Coat", 4), ("T-shirt_top", 0), ("tshirt-top", 0), ("ankle boot", 9), ("3", 3), ("x", None)],
)
def test_folder_names_match_class_names(label: str, index: int | None) -> None:
    from splitexit.data import FASHION_MNIST_CLASSES

    assert label_index(label, FASHION_MNIST_CLASSES) == index
    assert label_index(None, FASHION_MNIST_CLASSES) is None


def test_bad_sources_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="camera:N"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DatasetError, match="neither an image"):
        open_source(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="cannot read image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        next(iter(open_source(str(bad)))).load()


def test_video_needs_opencv_and_says_how_to_get_it() -> None:
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="opencv-python-headless"):
            video_source("clip.mp4")
        with pytest.raises(ImportError, match="OpenCV"):
            open_source("camera:0")
    else:
        pytest.skip("OpenCV is installed: the video source is exercised by test_video_frames")


def test_video_frames_are_rgb_inputs_with_frame_ids(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path / "clip.avi")
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 5, (8, 6))
    for _ in range(3):
        out.write(np.full((6, 8, 3), (0, 0, 200), np.uint8))  # BGR: red
    out.release()
    items = list(open_source(path))
    assert [i.id for i in items] == ["clip.avi#000000", "clip.avi#000001", "clip.avi#000002"]
    assert items[0].load().shape == (6, 8, 3) and items[0].load()[0, 0, 0] > 150
