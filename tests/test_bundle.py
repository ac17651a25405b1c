"""A bundle holds exactly what was exported, refuses to load when anything changed, and keeps
its fingerprint when only the calibration changes."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from support import tiny_split_net

from splitexit.bundle import (
    FORMAT_VERSION,
    NEVER_EXIT,
    Manifest,
    archive_bundle,
    export_bundle,
    format_manifest,
    load_bundle,
    read_manifest,
    update_manifest,
    write_thresholds,
)
from splitexit.errors import BundleError, BundleHashMismatch
from splitexit.preprocess import Preprocess
from splitexit.splitnet import SplitExitNet

INPUT_SHAPE = (1, 16, 16)
CLASSES = [f"class_{i}" for i in range(10)]
PRE = {"size": [16, 16], "mean": [0.5], "std": [0.25], "channels": 1}


def tiny_net(seed: int = 0) -> SplitExitNet:
    """Exits after stem, layer1 (a conv branch) and on the code (`support.tiny_split_net`)."""
    exits = {"stem": {}, "layer1": {"conv": True}, "bottleneck": {"hidden": 8}}
    return tiny_split_net(exits, seed)


def export(net: SplitExitNet, path: Path, **kwargs) -> Manifest:
    kwargs.setdefault("architecture", {"name": "tiny", "kwargs": {"seed": 0}})
    return export_bundle(
        net,
        path,
        name="tiny",
        preprocessing=PRE,
        class_names=CLASSES,
        example_input_shape=INPUT_SHAPE,
        **kwargs,
    )


@pytest.fixture(scope="module")
def net() -> SplitExitNet:
    return tiny_net()


@pytest.fixture(scope="module")
def exported(net: SplitExitNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "tiny"
    export(net, path, teacher_accuracy=0.9, metrics={"epochs": 3})
    return path


@pytest.fixture
def bundle_copy(exported: Path, tmp_path: Path) -> Path:
    """A private copy to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "copy"))


# ------------------------------------------------------------------------------ contents


def test_export_writes_every_piece_and_lists_every_file_with_its_hash(exported: Path) -> None:
    m = read_manifest(exported)
    on_disk = sorted(
        p.relative_to(exported).as_posix()
        for p in exported.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(m.files) == on_disk
    assert on_disk == [
        "exits/bottleneck.pt",
        "exits/layer1.pt",
        "exits/stem.pt",
        "head/segment_0.pt",
        "head/segment_1.pt",
        "head/segment_2.pt",
        "tail.pt",
        "weights.pt",
    ]
    raw = json.loads((exported / "manifest.json").read_text())
    assert raw["format"] == "splitexit-bundle" and raw["format_version"] == FORMAT_VERSION
    assert m.split_point == "layer1" and m.segments == 3
    assert m.bottleneck.code_shape == (4, 4, 4) and m.bottleneck.bits == (4, 8)
    assert [(e.name, e.segment, e.threshold) for e in m.exits] == [
        ("stem", 0, NEVER_EXIT),
        ("layer1", 1, NEVER_EXIT),
        ("bottleneck", 2, NEVER_EXIT),
    ]
    assert [(p.channels, p.bits) for p in m.operating_points] == [(4, 4), (4, 8)]
    assert m.fingerprint == m.compute_fingerprint()
    assert Manifest.from_json(m.to_json()) == m


def test_loaded_torchscript_pieces_compute_what_the_eager_net_computes(
    net: SplitExitNet, exported: Path
) -> None:
    bundle = load_bundle(exported)
    x = torch.randn(5, *INPUT_SHAPE)
    with torch.no_grad():
        out = net(x)
        f = x
        for (segment, exit_name), scripted in zip(net.segments(), bundle.segments, strict=True):
            want = segment(f)
            torch.testing.assert_close(scripted(f), want)
            f = want
            if exit_name:
                torch.testing.assert_close(bundle.exits[exit_name](f), out["exits"][exit_name])
        y = net.bottleneck.code(f)
        torch.testing.assert_close(bundle.tail(y), net.tail_module()(y))
    assert list(bundle.exits) == ["stem", "layer1", "bottleneck"]
    assert isinstance(bundle.preprocess, Preprocess)
    assert bundle.preprocess.to_dict() == PRE


def test_weights_load_with_weights_only_into_a_fresh_net(net: SplitExitNet, exported: Path) -> None:
    state = torch.load(exported / "weights.pt", weights_only=True)
    fresh = tiny_net(seed=123)
    fresh.load_state_dict(state)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert load_bundle(exported, parts=()).state_dict().keys() == net.state_dict().keys()


def test_fingerprint_covers_codec_settings_but_not_calibration(exported: Path) -> None:
    m = read_manifest(exported)
    recalibrated = dataclasses.replace(
        m, exits=tuple(dataclasses.replace(e, threshold=0.5) for e in m.exits), metrics={"a": 1}
    )
    assert recalibrated.compute_fingerprint() == m.fingerprint
    for codec in (dataclasses.replace(m.codec, zstd_level=9),):
        assert dataclasses.replace(m, codec=codec).compute_fingerprint() != m.fingerprint
    other_bits = dataclasses.replace(m.bottleneck, bits=(8,))
    assert dataclasses.replace(m, bottleneck=other_bits).compute_fingerprint() != m.fingerprint


def test_exporting_with_a_dictionary_stores_and_fingerprints_it(
    net: SplitExitNet, tmp_path: Path
) -> None:
    a = export(net, tmp_path / "a", dictionary=b"dictionary one")
    b = export(net, tmp_path / "b", dictionary=b"dictionary two")
    assert a.codec.dictionary == "codec/dictionary.zstd"
    assert a.codec_settings()["dictionary_sha256"] == a.files["codec/dictionary.zstd"]
    assert a.fingerprint != b.fingerprint
    assert load_bundle(tmp_path / "a", parts=()).dictionary.as_bytes() == b"dictionary one"


# ---------------------------------------------------------------------------- refusals


def test_a_flipped_byte_in_tail_pt_is_refused_naming_the_file_and_both_hashes(
    bundle_copy: Path,
) -> None:
    expected = read_manifest(bundle_copy).files["tail.pt"]
    data = bytearray((bundle_copy / "tail.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "tail.pt").write_bytes(bytes(data))
    with pytest.raises(BundleHashMismatch) as err:
        load_bundle(bundle_copy, parts=("head",))  # verified even when not loaded
    msg = str(err.value)
    assert "tail.pt" in msg and expected in msg
    assert "modified or corrupted" in msg and "re-export" in msg


def test_a_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "exits" / "stem.pt").unlink()
    with pytest.raises(BundleError, match=r"exits/stem\.pt is listed .* but missing"):
        load_bundle(bundle_copy)


def test_an_edited_fingerprint_is_refused(bundle_copy: Path) -> None:
    d = json.loads((bundle_copy / "manifest.json").read_text())
    d["fingerprint"] = "ab" * 32
    (bundle_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleHashMismatch, match=r"fingerprint .* does not match"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("extra", ["exits/evil.pt", "head/segment_9.pt", "model.onnx"])
def test_an_unlisted_file_is_refused(bundle_copy: Path, extra: str) -> None:
    (bundle_copy / extra).write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"not listed in manifest.json"):
        load_bundle(bundle_copy)


def test_an_unlisted_readme_is_tolerated(bundle_copy: Path) -> None:
    (bundle_copy / "README.md").write_text("notes")
    load_bundle(bundle_copy, parts=())


def test_a_newer_major_format_version_is_refused_with_a_clear_message(bundle_copy: Path) -> None:
    d = json.loads((bundle_copy / "manifest.json").read_text())
    d["format_version"] = 2
    (bundle_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"format version 2 is not supported.*upgrade"):
        load_bundle(bundle_copy)


def test_a_malformed_manifest_names_the_field(bundle_copy: Path) -> None:
    d = json.loads((bundle_copy / "manifest.json").read_text())
    d["bottleneck"]["channels"] = "four"
    (bundle_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"bottleneck.channels must be an integer"):
        load_bundle(bundle_copy)


def test_a_bundle_loaded_without_a_part_says_how_to_load_it(exported: Path) -> None:
    bundle = load_bundle(exported, parts=("tail",))
    assert bundle.tail is not None
    with pytest.raises(BundleError, match="without its 'head' part"):
        bundle.segments  # noqa: B018


# ------------------------------------------------------------------------------ archives


def test_archive_round_trip(exported: Path, tmp_path: Path) -> None:
    archive = archive_bundle(exported, tmp_path / "tiny.tar.gz")
    a, b = load_bundle(exported), load_bundle(archive)
    assert b.fingerprint == a.fingerprint and b.manifest == a.manifest
    code = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(b.tail(code), a.tail(code))


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


@pytest.mark.parametrize(
    "name, kind",
    [("../evil.pt", tarfile.REGTYPE), ("/abs/evil.pt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)],
)
def test_archives_with_unsafe_members_are_refused(tmp_path: Path, name: str, kind: bytes) -> None:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.size = 1 if kind == tarfile.REGTYPE else 0
    m.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    with pytest.raises(BundleError, match=r"unsafe path|not a regular file"):
        load_bundle(_tar(tmp_path / "bad.tar", [m]))
    assert not (tmp_path.parent / "evil.pt").exists()


# ------------------------------------------------------------------- writing and rewriting


def test_export_refuses_a_non_empty_directory_unless_overwrite(
    net: SplitExitNet, tmp_path: Path
) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty; pass overwrite=True"):
        export(net, tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").exists()
    export(net, tmp_path / "b", overwrite=True)
    assert not (tmp_path / "b" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp dirs left


def test_export_leaves_the_net_untouched(tmp_path: Path) -> None:
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export(net, tmp_path / "b")
    assert not any(m.training for m in net.modules())
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_failed_export_leaves_nothing_behind(net: SplitExitNet, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="3 class names for a model with 10 outputs"):
        export_bundle(
            net,
            tmp_path / "b",
            name="tiny",
            architecture={},
            preprocessing=PRE,
            class_names=["a", "b", "c"],
            example_input_shape=INPUT_SHAPE,
        )
    assert list(tmp_path.iterdir()) == []


def test_write_thresholds_keeps_the_fingerprint_and_the_bundle_loadable(
    bundle_copy: Path,
) -> None:
    before = read_manifest(bundle_copy)
    after = write_thresholds(bundle_copy, {"stem": 0.8, "bottleneck": 0.6}, measure="margin")
    assert after.fingerprint == before.fingerprint
    loaded = load_bundle(bundle_copy, parts=()).manifest
    assert loaded.thresholds == {"stem": 0.8, "layer1": NEVER_EXIT, "bottleneck": 0.6}
    assert [e.measure for e in loaded.exits] == ["margin", "max_prob", "margin"]
    with pytest.raises(BundleError, match="no exits"):
        write_thresholds(bundle_copy, {"layer9": 0.5})


def test_update_manifest_edits_free_fields_and_refuses_fingerprinted_ones(
    bundle_copy: Path,
) -> None:
    m = update_manifest(bundle_copy, metrics={"accuracy": 0.97}, teacher_accuracy=0.98)
    assert load_bundle(bundle_copy, parts=()).manifest.metrics == {"accuracy": 0.97}
    assert m.teacher_accuracy == 0.98
    with pytest.raises(BundleError, match="re-export"):
        update_manifest(bundle_copy, codec={"zstd_level": 1, "dictionary": None})
    without_layer1 = [e for e in m.exits if e.name != "layer1"]
    with pytest.raises(BundleError, match="fingerprint"):
        update_manifest(bundle_copy, exits=without_layer1)


# --------------------------------------------------------------------------------- inspect


def test_format_manifest_shows_what_a_user_checks(exported: Path) -> None:
    bundle = load_bundle(exported, parts=())
    text = format_manifest(bundle)
    m = bundle.manifest
    for needle in (
        "tiny",
        m.fingerprint,
        "after 'layer1'",
        "C=4, code [4, 4, 4]",
        "stem",
        "1.01 (never)",
        "raw payload B",
        "class_9",
        "tail.pt",
        "KiB",
    ):
        assert needle in text, needle
