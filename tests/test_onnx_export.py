"""ONNX graphs of a bundle compute what its TorchScript pieces compute, at any batch size, and
the Triton raw tail (dequantization in the graph) answers frames like the TailRunner; whether
exported from a net or from a loaded bundle (TorchScript pieces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import tiny_split_net
from torch import nn

from splitexit.bundle import export_bundle, load_bundle
from splitexit.bundle.load import Bundle
from splitexit.bundle.onnx import RAW_TAIL_INPUTS, export_onnx
from splitexit.runtime import HeadRunner, TailRunner
from splitexit.splitnet import SplitExitNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INPUT_SHAPE = (1, 16, 16)
ATOL = 1e-4
RAW_ATTRS = ("values", "scale", "zero_point")  # QuantizedTensor fields, in input order


def tiny_net() -> SplitExitNet:
    """Two exits: a conv branch after stem, one on the code (`support.tiny_split_net`)."""
    exits = {"stem": {"conv": True}, "bottleneck": {"hidden": 8}}
    return tiny_split_net(exits, bn_stats=False)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny"
    export_bundle(
        tiny_net(),
        path,
        name="tiny net",
        architecture={"name": "tiny"},
        preprocessing={"size": [16, 16], "channels": 1},
        class_names=[f"c{i}" for i in range(10)],
        example_input_shape=INPUT_SHAPE,
        onnx=True,
    )
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_bundle_with_onnx_lists_and_verifies_the_graphs(bundle_dir: Path) -> None:
    files = load_bundle(bundle_dir, parts=()).manifest.files
    assert {
        "onnx/head/segment_0.onnx",
        "onnx/head/segment_1.onnx",
        "onnx/exits/stem.onnx",
        "onnx/exits/bottleneck.onnx",
        "onnx/tail.onnx",
        "onnx/triton/tiny_net_tail/1/model.onnx",
        "onnx/triton/tiny_net_tail/config.pbtxt",
        "onnx/triton/tiny_net_tail/labels.txt",
    } <= files.keys()
    for rel in files:
        if rel.endswith(".onnx"):
            model = onnx.load(str(bundle_dir / rel))
            assert model.opset_import[0].version >= 17


def shipped_paths(bundle_dir: Path, bundle: Bundle) -> dict[str, Path]:
    """The ONNX graphs a bundle exported with `onnx=True` holds, keyed like `export_onnx`."""
    onnx_dir = bundle_dir / "onnx"
    paths = {f"segment_{i}": onnx_dir / "head" / f"segment_{i}.onnx" for i in range(2)}
    paths |= {
        f"exit_{e.name}": onnx_dir / "exits" / f"{e.name}.onnx" for e in bundle.manifest.exits
    }
    paths["tail"] = onnx_dir / "tail.onnx"
    paths["raw_tail"] = onnx_dir / "triton/tiny_net_tail/1/model.onnx"
    return paths


def assert_graphs_match_bundle(bundle: Bundle, paths: dict[str, Path], batch: int) -> None:
    """Every graph in `paths` answers like the bundle's TorchScript piece, within ATOL; the
    raw tail (dequantization in the graph) like the TailRunner, at 4 and 8 bits."""
    exit_at = {e.segment: e.name for e in bundle.manifest.exits}
    x = torch.randn(batch, *INPUT_SHAPE)
    with torch.no_grad():
        f = x
        for i, segment in enumerate(bundle.segments):
            [got] = session(paths[f"segment_{i}"]).run(None, {"input": f.numpy()})
            f = segment(f)
            torch.testing.assert_close(torch.from_numpy(got), f, atol=ATOL, rtol=0)
            exit_name = exit_at.get(i)
            if exit_name:
                [got] = session(paths[f"exit_{exit_name}"]).run(None, {"features": f.numpy()})
                want = bundle.exits[exit_name](f)
                torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=0)
        [got] = session(paths["tail"]).run(None, {"code": f.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), bundle.tail(f), atol=ATOL, rtol=0)
    head, tail = HeadRunner(bundle), TailRunner(bundle)
    for bits in (4, 8):
        qt = head.encode(head.run(x).z, bits)
        feeds = {n: getattr(qt, a).numpy() for n, a in zip(RAW_TAIL_INPUTS, RAW_ATTRS, strict=True)}
        [got] = session(paths["raw_tail"]).run(None, feeds)
        [want] = tail.run_codes([qt])
        torch.testing.assert_close(torch.from_numpy(got), want.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 5])
def test_shipped_graphs_match_torchscript_at_any_batch_size(bundle_dir: Path, batch: int) -> None:
    bundle = load_bundle(bundle_dir)
    assert_graphs_match_bundle(bundle, shipped_paths(bundle_dir, bundle), batch)


@pytest.mark.parametrize("batch", [1, 3])
def test_export_from_a_loaded_bundle_exports_its_torchscript_pieces(
    bundle_dir: Path, tmp_path: Path, batch: int
) -> None:
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle.tail, torch.jit.ScriptModule)
    paths = export_onnx(bundle, tmp_path / "onnx", max_batch_size=8)
    assert set(shipped_paths(bundle_dir, bundle)) | {"triton_config"} == set(paths)
    assert_graphs_match_bundle(bundle, paths, batch)
    config = paths["triton_config"].read_text()
    assert 'name: "tiny_net_tail"' in config and "max_batch_size: 8" in config


def test_triton_config_declares_the_raw_tail_with_dynamic_batching(bundle_dir: Path) -> None:
    text = (bundle_dir / "onnx/triton/tiny_net_tail/config.pbtxt").read_text()
    for needle in (
        'name: "tiny_net_tail"',
        'platform: "onnxruntime_onnx"',
        "data_type: TYPE_UINT8\n    dims: [ 4, 4, 4 ]",
        "reshape: { shape: [ ] }",
        "dims: [ 10 ]",
        'label_filename: "labels.txt"',
        "dynamic_batching",
    ):
        assert needle in text, needle
    labels = (bundle_dir / "onnx/triton/tiny_net_tail/labels.txt").read_text().split()
    assert labels == [f"c{i}" for i in range(10)]


def test_export_from_a_net_matches_the_net(tmp_path: Path) -> None:
    net = tiny_net()
    paths = export_onnx(net, tmp_path, example_input_shape=INPUT_SHAPE)
    x = torch.randn(2, *INPUT_SHAPE)
    with torch.no_grad():
        want = net(x)["exits"]["stem"]
    [got] = session(paths["segment_0"]).run(None, {"input": x.numpy()})
    [got] = session(paths["exit_stem"]).run(None, {"features": got})
    torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=0)
    assert net.training is False and paths["triton_config"].exists()


def test_falls_back_to_the_torch_export_based_exporter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxscript")
    from splitexit.bottleneck import dequantize, quantize
    from splitexit.bundle.onnx import RawTail, _export

    real_export = torch.onnx.export

    def no_legacy(*args, dynamo: bool = True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript-based exporter is gone")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_legacy)
    tail = tiny_net().tail_module().eval()
    qt = quantize(torch.randn(5, 4, 4, 4), 8, channels=4)
    path = tmp_path / "raw.onnx"
    example = (qt.values[:2], qt.scale[:2], qt.zero_point[:2])
    _export(RawTail(tail), example, path, ["code", "scale", "zero_point"], ["logits"], 17)
    feeds = {
        "code": qt.values.numpy(),
        "scale": qt.scale.numpy(),
        "zero_point": qt.zero_point.numpy(),
    }
    [got] = session(path).run(None, feeds)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), tail(dequantize(qt)), atol=ATOL, rtol=0)


def test_export_records_onnx_parity_in_the_manifest(bundle_dir: Path) -> None:
    m = load_bundle(bundle_dir, parts=()).manifest
    assert m.has_onnx
    assert set(m.onnx["max_abs_diff"]) == {
        "segment_0",
        "segment_1",
        "exit_stem",
        "exit_bottleneck",
        "tail",
    }
    assert max(m.onnx["max_abs_diff"].values()) < ATOL
    assert m.onnx["argmax_agreement"] == {"exit_stem": 1.0, "exit_bottleneck": 1.0, "tail": 1.0}
    assert m.onnx["samples"] == 64 and m.onnx["onnxruntime"] == ort.__version__


def test_parity_check_refuses_a_graph_that_computes_something_else(bundle_dir: Path) -> None:
    from splitexit.bundle.onnx import onnx_parity
    from splitexit.errors import BundleError

    bundle = load_bundle(bundle_dir)
    exit_at = {e.segment: (e.name, bundle.exits[e.name]) for e in bundle.manifest.exits}

    class Doubled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    segments = [bundle.segments[0], Doubled(bundle.segments[1])]
    with pytest.raises(BundleError, match="segment_1 differs from its TorchScript piece"):
        onnx_parity(segments, exit_at, bundle.tail, bundle_dir / "onnx", INPUT_SHAPE)


def test_splitexit_onnx_adds_graphs_to_a_bundle_and_keeps_its_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from splitexit.bundle import verify_files
    from splitexit.cli import main

    path = tmp_path / "plain"
    export_bundle(
        tiny_net(),
        path,
        name="plain",
        architecture={"name": "tiny"},
        preprocessing={"size": [16, 16], "channels": 1},
        class_names=[f"c{i}" for i in range(10)],
        example_input_shape=INPUT_SHAPE,
    )
    before = verify_files(path)
    assert not before.has_onnx and before.onnx == {}
    assert main(["onnx", str(path)]) == 0
    assert "fingerprint unchanged" in capsys.readouterr().out
    after = verify_files(path)  # every file listed and hashed, fingerprint recomputes
    assert after.has_onnx and after.fingerprint == before.fingerprint
    assert not (path / "onnx" / "triton").exists()
    head = HeadRunner(load_bundle(path, parts=()), runtime="onnxruntime")
    x = torch.randn(3, *INPUT_SHAPE)
    want = HeadRunner(load_bundle(path), runtime="torch").run(x, exits=False).z
    np.testing.assert_allclose(head.run(x.numpy(), exits=False).z, want.numpy(), atol=ATOL)
