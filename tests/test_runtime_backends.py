"""The two runtimes answer alike: torch (TorchScript) and onnxruntime give the same exits,
classes and frames within the bundle's recorded parity; the numpy twins of quantization,
preprocessing and confidence agree with torch; the device path runs with torch unimportable;
a runtime or provider that cannot run here is one line and exit status 2."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import SHIPPED, assert_same_answers, imported_blocked, parity_tolerance, run_agent_cli

from splitexit.bottleneck.quantize import QuantizedTensor, dequantize, quantize
from splitexit.bundle import load_bundle, verify_files
from splitexit.codec import decode_frame
from splitexit.confidence import CONFIDENCE_MEASURES, confidence
from splitexit.errors import RuntimeUnavailable
from splitexit.preprocess import Preprocess
from splitexit.runtime import HeadRunner, TailRunner
from splitexit.runtime.backends import RuntimeOptions, resolve_runtime

ort = pytest.importorskip("onnxruntime")

SHIPPED_FINGERPRINT = "f65bd982ae98eae0fc0c2e183514ffb98e78a0ba11886c5e46b508c287330a1c"
SERVER_TOL = 5e-3  # a tail answer after one code value rounded the other way


def pixels(folder: Path) -> np.ndarray:
    from splitexit.preprocess import open_image, pil_to_array

    return np.stack([pil_to_array(open_image(p)) for p in sorted(folder.rglob("*.png"))])


# ------------------------------------------------------------------------ numpy twins


def codes(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0, 3, (5, 6, 4, 4)).astype(np.float32),
        np.abs(rng.normal(0, 1, (3, 2, 5, 3))).astype(np.float32),  # all >= 0
        -np.abs(rng.normal(0, 1e-3, (2, 4, 2, 2))).astype(np.float32),  # tiny, all <= 0
        np.zeros((2, 3, 2, 2), np.float32),  # a zero range
        (rng.integers(-8, 8, (4, 3, 3, 3)) / 2).astype(np.float32),  # exact halves: ties
    ]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_numpy_quantize_gives_the_torch_integers_bit_for_bit(bits: int) -> None:
    for x in codes(bits):
        got = quantize(x, bits, channels=8)
        want = quantize(torch.from_numpy(x), bits, channels=8)
        assert isinstance(got.values, np.ndarray) and got.values.dtype == np.uint8
        np.testing.assert_array_equal(got.values, want.values.numpy())
        np.testing.assert_array_equal(got.zero_point, want.zero_point.numpy())
        assert got.scale.dtype == np.float32
        assert got.scale.tobytes() == want.scale.numpy().tobytes()
        assert dequantize(got).tobytes() == dequantize(want).numpy().tobytes()


def test_numpy_and_torch_codes_make_the_same_frame() -> None:
    from splitexit.codec import encode_frame

    x = codes(0)[0]
    fp = "ab" * 32
    assert encode_frame(quantize(x, 4), fp) == encode_frame(quantize(torch.from_numpy(x), 4), fp)


@pytest.mark.parametrize(
    ("shape", "size", "channels"),
    [((28, 28, 1), (28, 28), 1), ((37, 53, 3), (28, 28), 1), ((20, 15, 1), (32, 40), 3)],
)
def test_numpy_preprocess_matches_torch(shape, size, channels) -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    pre = Preprocess(size, (0.3,), (0.4,), channels)
    want = pre(batch).numpy()
    got = pre.numpy(batch)
    assert got.dtype == np.float32 and got.shape == want.shape
    if shape[:2] == size and shape[2] == channels:
        assert got.tobytes() == want.tobytes()  # no resize: the same float32 steps exactly
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_numpy_confidence_matches_torch(measure: str) -> None:
    logits = np.random.default_rng(2).normal(0, 4, (16, 10)).astype(np.float32)
    got = confidence(logits, measure)
    want = confidence(torch.from_numpy(logits), measure).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------- runners alike


def test_shipped_bundle_carries_onnx_graphs_and_keeps_its_fingerprint() -> None:
    manifest = verify_files(SHIPPED)
    assert manifest.fingerprint == SHIPPED_FINGERPRINT
    assert manifest.has_onnx
    assert set(manifest.onnx["max_abs_diff"]) == {
        "segment_0",
        "segment_1",
        "exit_layer1",
        "exit_bottleneck",
        "tail",
    }
    assert min(manifest.onnx["argmax_agreement"].values()) == 1.0


def test_onnx_head_answers_like_torch_on_the_shipped_bundle(fmnist_images: Path) -> None:
    bundle = load_bundle(SHIPPED, parts=())
    torch_head = HeadRunner(bundle, runtime="torch")
    onnx_head = HeadRunner(bundle, runtime="onnxruntime")
    assert onnx_head.backend.name == "onnxruntime"
    batch = pixels(fmnist_images)
    x_onnx = onnx_head.preprocess(batch)
    assert isinstance(x_onnx, np.ndarray)
    a = torch_head.run(torch_head.preprocess(batch))
    b = onnx_head.run(x_onnx)
    assert a.exit_name == b.exit_name and a.prediction == b.prediction
    assert a.pending == b.pending and a.pending, "some inputs should need the tail"
    tol = parity_tolerance()
    np.testing.assert_allclose(b.confidence[0] or 0, a.confidence[0] or 0, atol=tol)
    diffs = load_bundle(SHIPPED, parts=()).manifest.onnx["max_abs_diff"]
    np.testing.assert_allclose(b.z, a.z.numpy(), atol=4 * diffs["segment_1"], rtol=0)
    tail = TailRunner(bundle, runtime="torch")
    ta = tail.run_frames([torch_head.frame(a.z, 8)])[0]
    tb = tail.run_frames([onnx_head.frame(b.z, 8)])[0]
    np.testing.assert_array_equal(ta.prediction.numpy(), tb.prediction.numpy())


def test_onnx_tail_answers_frames_like_torch() -> None:
    bundle = load_bundle(SHIPPED, parts=())
    head = HeadRunner(bundle, runtime="torch")
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    z = head.run(x, exits=False).z
    frames = [head.frame(z[:2], 8), head.frame(z[2:], 4, 5)]  # mixed operating points
    want = TailRunner(bundle, runtime="torch").run_frames(frames)
    got = TailRunner(bundle, runtime="onnxruntime").run_frames(frames)
    assert [a.batch_size for a in got] == [2, 4]
    for g, w in zip(got, want, strict=True):
        assert isinstance(g.logits, np.ndarray)
        np.testing.assert_allclose(g.logits, w.logits.numpy(), atol=parity_tolerance() * 10)
        np.testing.assert_array_equal(g.prediction, w.prediction.numpy())
    decoded = decode_frame(frames[1], expected_fingerprint=bundle.fingerprint).tensor
    assert isinstance(decoded, QuantizedTensor) and decoded.sent_channels == 5


# ------------------------------------------------------------------- runtime choice


def test_auto_picks_onnxruntime_only_for_a_bundle_with_graphs() -> None:
    m = load_bundle(SHIPPED, parts=()).manifest
    assert resolve_runtime("auto", m) == "onnxruntime"
    bare = dataclasses.replace(
        m, files={k: v for k, v in m.files.items() if not k.startswith("onnx/")}, onnx={}
    )
    assert resolve_runtime("auto", bare) == "torch"
    with pytest.raises(RuntimeUnavailable, match=r"no ONNX graphs.*splitexit onnx"):
        resolve_runtime("onnxruntime", bare)


def test_a_provider_this_onnxruntime_lacks_is_refused_saying_what_to_install() -> None:
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    bundle = load_bundle(SHIPPED, parts=())
    with pytest.raises(RuntimeUnavailable, match=r"TensorrtExecutionProvider.*onnxruntime-gpu"):
        HeadRunner(bundle, runtime=RuntimeOptions("onnxruntime", ("tensorrt",)))
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        RuntimeOptions("onnxruntime", ("tpu",))


def test_onnx_threads_are_set_per_session() -> None:
    bundle = load_bundle(SHIPPED, parts=())
    runner = HeadRunner(bundle, runtime=RuntimeOptions("onnxruntime", threads=1))
    sess, _ = runner.backend._segments[0]
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--runtime", "onnxruntime", "--providers", "tensorrt"], "TensorrtExecutionProvider"),
        (["--runtime", "onnxruntime", "--providers", "tpu"], "unknown execution provider"),
        (["--threads", "0"], "threads must be >= 1"),
    ],
)
def test_device_cli_refuses_a_runtime_it_cannot_run_in_one_line(
    fmnist_images: Path, flags: list[str], says: str
) -> None:
    if "TensorrtExecutionProvider" in ort.get_available_providers() and "tensorrt" in flags:
        pytest.skip("this onnxruntime has TensorRT")
    args = ["--bundle", str(SHIPPED), "--source", str(fmnist_images), "--local-only", *flags]
    records, proc = run_agent_cli(args)
    assert proc.returncode == 2, proc.stderr
    assert records == []
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if says in line]) == 1


# --------------------------------------------------------------------- no torch at all


def test_device_agent_runs_with_torch_unimportable_and_answers_like_torch(
    fmnist_images: Path,
) -> None:
    common = ["--bundle", str(SHIPPED), "--source", str(fmnist_images), "--local-only"]
    onnx, proc = run_agent_cli([*common, "--runtime", "onnxruntime"], block_torch=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert imported_blocked(proc) == []
    auto, proc = run_agent_cli(common, block_torch=True)  # auto: no torch, ONNX graphs here
    assert proc.returncode == 0 and imported_blocked(proc) == []
    reference, proc = run_agent_cli([*common, "--runtime", "torch"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(onnx) == 40
    assert_same_answers(onnx, reference, parity_tolerance(), SERVER_TOL)
    assert_same_answers(auto, onnx, 0.0, 0.0)


def test_torch_runtime_without_torch_says_how_to_get_it(fmnist_images: Path) -> None:
    args = ["--bundle", str(SHIPPED), "--source", str(fmnist_images), "--local-only"]
    records, proc = run_agent_cli([*args, "--runtime", "torch"], block_torch=True)
    assert proc.returncode == 2 and records == []
    assert "--runtime torch needs torch" in proc.stderr and "Traceback" not in proc.stderr


def test_agent_against_an_onnx_server_answers_like_torch_against_a_torch_server(
    fmnist_images: Path, tail_server
) -> None:

    fixed = ["--policy", "fixed", "--channels", "12", "--bits", "8"]
    runs = {}
    for runtime in ("onnxruntime", "torch"):
        server = tail_server(SHIPPED, runtime=runtime)
        args = ["--bundle", str(SHIPPED), "--source", str(fmnist_images), "--server", server.url]
        records, proc = run_agent_cli(
            [*args, *fixed, "--runtime", runtime], block_torch=runtime == "onnxruntime"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[runtime] = records
    assert any(r["decided_by"] == "server" for r in runs["torch"])
    assert_same_answers(runs["onnxruntime"], runs["torch"], parity_tolerance(), SERVER_TOL)


def test_server_image_baseline_runs_through_the_head_runner_on_either_runtime(
    fmnist_images: Path,
) -> None:
    from splitexit.preprocess import encode_image
    from splitexit_server.metrics import ServerMetrics
    from splitexit_server.model import ServedModel, Work
    from splitexit_server.settings import Settings

    png = [encode_image(p) for p in pixels(fmnist_images)[:8]]
    answers = {}
    for runtime in ("torch", "onnxruntime"):
        settings = Settings(bundles=(SHIPPED,), runtime=runtime)
        model = ServedModel(load_bundle(SHIPPED, parts=()), settings, ServerMetrics())
        assert model.head is not None and model.head.backend.name == runtime
        [answer] = model.run([Work("image", png, len(png))])
        answers[runtime] = answer
        platform = model.metadata()["platform"]
        assert platform == (
            "splitexit_torchscript" if runtime == "torch" else "splitexit_onnxruntime"
        )
    np.testing.assert_array_equal(answers["torch"].prediction, answers["onnxruntime"].prediction)
    np.testing.assert_allclose(
        answers["torch"].probability, answers["onnxruntime"].probability, atol=SERVER_TOL
    )


def test_core_and_device_packages_import_without_torch_or_fastapi() -> None:
    import subprocess

    code = (
        "import importlib.abc, sys\n"
        "class R(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, n, p, t=None):\n"
        "        if n.split('.')[0] in ('torch', 'fastapi', 'uvicorn'): raise ImportError(n)\n"
        "sys.meta_path.insert(0, R())\n"
        "import splitexit, splitexit.bundle, splitexit.codec, splitexit.runtime\n"
        "import splitexit.preprocess, splitexit.confidence, splitexit.bottleneck.quantize\n"
        "import splitexit_device.cli, splitexit_device.agent, splitexit_device.client\n"
        "import splitexit_device.config\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=SHIPPED.parents[2]
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_server_refuses_to_start_with_a_provider_it_lacks_in_one_line() -> None:
    import os
    import subprocess

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    repo = SHIPPED.parents[2]

    def server(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "splitexit_server.cli",
            "--bundle",
            str(SHIPPED),
            "--check",
            *flags,
        ]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=repo)

    refused = server("--runtime", "onnxruntime", "--providers", "tensorrt")
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorrtExecutionProvider" in lines[0]
    assert server("--runtime", "onnxruntime", "--providers", "cpu").returncode == 0
    bad = server("--runtime", "tensorflow")
    assert bad.returncode == 2 and "runtime must be one of" in bad.stderr
