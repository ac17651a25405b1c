"""Head on one side, frame in between, tail on the other: the same numbers as the whole net in
one process, exits taken exactly when the thresholds say, and frames batched in any mix."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from support import tiny_split_net
from torch import nn

from splitexit.bottleneck import quantize
from splitexit.bundle import Bundle, export_bundle, load_bundle, write_thresholds
from splitexit.codec import encode_frame
from splitexit.errors import BundleError, FingerprintMismatch, FrameError
from splitexit.exits import confidence
from splitexit.runtime import HeadRunner, TailRunner
from splitexit.splitnet import SplitExitNet

INPUT_SHAPE = (1, 16, 16)
C = 4
BITS = (4, 8)


def tiny_net(seed: int = 0) -> SplitExitNet:
    """Exits after stem, layer1 and on the code (`support.tiny_split_net`)."""
    return tiny_split_net({"stem": {}, "layer1": {}, "bottleneck": {}}, seed)


def export(net: SplitExitNet, path: Path, **kwargs) -> Path:
    export_bundle(
        net,
        path,
        name="tiny",
        architecture={"name": "tiny"},
        preprocessing={"size": [16, 16], "channels": 1},
        class_names=[str(i) for i in range(10)],
        example_input_shape=INPUT_SHAPE,
        **kwargs,
    )
    return path


@pytest.fixture(scope="module")
def net() -> SplitExitNet:
    return tiny_net()


@pytest.fixture(scope="module")
def bundle_dir(net: SplitExitNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(net, tmp_path_factory.mktemp("rt") / "tiny")


@pytest.fixture(scope="module")
def head(bundle_dir: Path) -> HeadRunner:
    return HeadRunner(load_bundle(bundle_dir, parts=("head", "exits")))


@pytest.fixture(scope="module")
def tail(bundle_dir: Path) -> TailRunner:
    return TailRunner(load_bundle(bundle_dir, parts=("tail",)))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------- split == whole


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("keep", range(1, C + 1))
def test_head_frame_tail_gives_the_logits_of_the_whole_net(
    net: SplitExitNet, head: HeadRunner, tail: TailRunner, x: torch.Tensor, keep: int, bits: int
) -> None:
    result = head.run(x)  # thresholds are the never-exit placeholder
    assert result.pending == [0, 1, 2] and result.exit_name == [None] * 3
    [answer] = tail.run_frames([head.frame(result.z, bits, keep)])
    with torch.no_grad():
        want = net(x, bits=bits, keep=keep)["logits"]
    torch.testing.assert_close(answer.logits, want, atol=1e-5, rtol=0)
    assert answer.prediction.tolist() == want.argmax(1).tolist()
    torch.testing.assert_close(answer.probability, want.softmax(1).amax(1))


def test_frames_of_mixed_operating_points_batch_into_one_call_with_the_same_answers(
    head: HeadRunner, tail: TailRunner, x: torch.Tensor
) -> None:
    z = head.run(x).z
    frames = [head.frame(z[:1], 8, 4), head.frame(z, 4, 1), head.frame(z[1:], 8, 2)]
    together = tail.run_frames(frames)
    alone = [tail.run_frames([f])[0] for f in frames]
    assert [a.batch_size for a in together] == [1, 3, 2]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        assert torch.equal(a.prediction, b.prediction)
    assert tail.run_frames([]) == []


def test_concurrent_callers_get_their_own_answers(
    head: HeadRunner, tail: TailRunner, x: torch.Tensor
) -> None:
    frames = [head.frame(head.run(x).z, 8, k) for k in range(1, C + 1)]
    want = [tail.run_frames([f])[0].logits for f in frames]
    got: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        for _ in range(5):
            got[i] = tail.run_frames([frames[i]])[0].logits

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(frames))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i], w)


# --------------------------------------------------------------------------------- exits


def _stem_confidence(net: SplitExitNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return confidence(net(x)["exits"]["stem"], "max_prob")


def test_an_exit_is_taken_exactly_when_confidence_reaches_its_threshold(
    net: SplitExitNet, head: HeadRunner, x: torch.Tensor
) -> None:
    conf = float(_stem_confidence(net, x[:1])[0])
    above = head.run(x[:1], thresholds={"stem": conf + 1e-6})
    assert above.exit_name == [None] and above.pending == [0]
    at = head.run(x[:1], thresholds={"stem": conf - 1e-6})
    assert at.exit_name == ["stem"] and at.pending == [] and at.z is None
    with torch.no_grad():
        assert at.prediction == [int(net(x[:1])["exits"]["stem"].argmax())]
    assert at.confidence[0] == pytest.approx(conf)


def test_a_confident_sample_stops_the_head_at_its_exit(
    net: SplitExitNet, head: HeadRunner, x: torch.Tensor
) -> None:
    result = head.run(x[:1], thresholds={"stem": 0.0})
    assert list(result.timings) == ["segment_0", "exit_stem"]
    assert list(result.exit_logits[0]) == ["stem"]


def test_in_a_batch_each_sample_decides_alone_and_only_pending_ones_are_carried(
    net: SplitExitNet, head: HeadRunner, x: torch.Tensor
) -> None:
    conf = _stem_confidence(net, x)
    order = conf.argsort().tolist()  # least to most confident
    cut = float(conf[order[0]] + conf[order[1]]) / 2
    result = head.run(x, thresholds={"stem": cut})
    exited = sorted(order[1:])
    assert [i for i, e in enumerate(result.exit_name) if e == "stem"] == exited
    assert result.pending == [order[0]]
    with torch.no_grad():
        z = net.bottleneck.encoder(net.head(x[order[0] : order[0] + 1]))
    torch.testing.assert_close(result.z, z)
    assert list(result.exit_logits[order[0]]) == ["stem", "layer1", "bottleneck"]


def test_only_the_exits_named_run_and_the_others_cannot_take_an_input(
    head: HeadRunner, x: torch.Tensor
) -> None:
    always = {"stem": 0.0, "layer1": 0.0, "bottleneck": 0.0}
    result = head.run(x, thresholds=always, exits=frozenset({"layer1"}))
    assert result.exit_name == ["layer1"] * len(x)
    assert "exit_stem" not in result.timings and "exit_layer1" in result.timings
    none = head.run(x, thresholds=always, exits=frozenset())
    assert none.exit_name == [None] * len(x) and none.z is not None


def test_manifest_thresholds_are_the_default(
    net: SplitExitNet, bundle_dir: Path, tmp_path: Path, x: torch.Tensor
) -> None:
    import shutil

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    write_thresholds(copy, {"stem": 0.0})
    runner = HeadRunner(load_bundle(copy, parts=("head", "exits")))
    assert runner.run(x).exit_name == ["stem"] * 3
    never = HeadRunner(load_bundle(copy, parts=("head", "exits")), thresholds={"stem": 1.01})
    assert never.run(x).exit_name == [None] * 3


def test_fallback_answers_with_the_most_confident_exit(
    net: SplitExitNet, head: HeadRunner, x: torch.Tensor
) -> None:
    with torch.no_grad():
        exits = net(x)["exits"]
    conf = torch.stack([confidence(exits[n]) for n in ("stem", "layer1", "bottleneck")])
    # exits computed during run, only when falling back, or some of each
    for run in (True, False, frozenset({"layer1"})):
        result = head.run(x, exits=run)
        answers = head.fallback(result)
        for i, a in enumerate(answers):
            best = ["stem", "layer1", "bottleneck"][int(conf[:, i].argmax())]
            assert a.exit_name == best
            assert a.prediction == int(exits[best][i].argmax())
            assert a.confidence == pytest.approx(float(conf[:, i].max()))


# ------------------------------------------------------------------------------ refusals


def test_a_frame_from_another_bundle_is_refused(
    head: HeadRunner, tail: TailRunner, x: torch.Tensor
) -> None:
    qt = head.encode(head.run(x).z, 8)
    with pytest.raises(FingerprintMismatch, match="deploy the same bundle"):
        tail.run_frames([encode_frame(qt, "0" * 64)])


def test_codes_that_do_not_fit_the_bundle_are_refused(tail: TailRunner, bundle_dir: Path) -> None:
    fp = tail.bundle.fingerprint
    wrong_shape = quantize(torch.randn(1, C, 5, 5), 8, channels=C)
    with pytest.raises(FrameError, match="does not fit this bundle"):
        tail.run_frames([encode_frame(wrong_shape, fp)])
    two_bits = quantize(torch.randn(1, C, 4, 4), 2, channels=C)
    with pytest.raises(FrameError, match=r"2 bits.*supports \[4, 8\]"):
        tail.run_frames([encode_frame(two_bits, fp)])
    with pytest.raises(FrameError, match="does not fit"):
        tail.run_codes([quantize(torch.randn(1, C, 4, 4), 8, channels=C + 1)])


def test_head_refuses_unsupported_operating_points(head: HeadRunner, x: torch.Tensor) -> None:
    z = head.run(x).z
    with pytest.raises(ValueError, match="bits=2 is not supported"):
        head.encode(z, 2)
    with pytest.raises(ValueError, match=r"keep must be in 1..4"):
        head.encode(z, 8, keep=5)


def test_fallback_without_exits_says_so(tmp_path: Path, x: torch.Tensor) -> None:
    net = tiny_net()
    net.exits = nn.ModuleDict()
    runner = HeadRunner(load_bundle(export(net, tmp_path / "b"), parts=("head", "exits")))
    result = runner.run(x[:1])
    assert result.pending == [0]
    with pytest.raises(BundleError, match="no exits"):
        runner.fallback(result)


def test_a_bundle_with_a_dictionary_frames_with_it(
    net: SplitExitNet, tmp_path: Path, x: torch.Tensor
) -> None:
    from splitexit.codec import read_header, train_dictionary

    z = net.bottleneck.encoder(net.head(torch.randn(64, *INPUT_SHAPE))).detach()
    dictionary = train_dictionary([quantize(z, 4, channels=C)] * 8, size=512)
    bundle: Bundle = load_bundle(export(net, tmp_path / "d", dictionary=dictionary))
    runner, tail = HeadRunner(bundle), TailRunner(bundle)
    frame = runner.frame(runner.run(x).z, 4)
    [answer] = tail.run_frames([frame])
    with torch.no_grad():
        torch.testing.assert_close(answer.logits, net(x, bits=4)["logits"], atol=1e-5, rtol=0)
    header = read_header(frame)
    assert header.uses_dictionary and header.fingerprint == bundle.fingerprint[:16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runners_on_cuda_agree_with_the_cpu(
    bundle_dir: Path, head: HeadRunner, tail: TailRunner, x: torch.Tensor
) -> None:
    gpu = load_bundle(bundle_dir, device="cuda")
    gpu_head, gpu_tail = HeadRunner(gpu), TailRunner(gpu)
    [a] = gpu_tail.run_frames([gpu_head.frame(gpu_head.run(x).z, 8)])
    [b] = tail.run_frames([head.frame(head.run(x).z, 8)])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-3, rtol=1e-3)
    gpu_tail.warmup(4)
