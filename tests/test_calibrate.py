"""Calibration chooses exit thresholds that keep their promise on held-out data, replays the
runtime's exit policy exactly, and writes the thresholds into a bundle that still verifies."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitexit.bundle import export_bundle, load_bundle, read_manifest
from splitexit.calibrate import (
    NEVER,
    CalibrationError,
    CalibrationTable,
    Goal,
    Replay,
    binom_sf,
    check_promise,
    clopper_pearson_lower,
    clopper_pearson_upper,
    evaluate_policy,
    format_selection,
    format_sweep,
    promise_sweep,
    record_table,
    select_thresholds,
    write_selection,
)
from splitexit.commands.calibrate import add_arguments
from splitexit.commands.calibrate import run as calibrate_main
from splitexit.cost import Compute, CostModel, Link

# ------------------------------------------------------------------------ synthetic tables


def synthetic(
    n: int,
    seed: int,
    *,
    points: tuple[tuple[int, int], ...] = ((4, 8), (2, 4)),
    point_drop: tuple[float, ...] = (0.0, 0.05),
) -> CalibrationTable:
    """Two exits whose accuracy rises with their confidence; a tail at ~92% that errs on the
    same hard samples (latent difficulty u). Point j's tail is `point_drop[j]` less accurate
    on hard samples; its frames take 100 * k * bits / 8 + 37 bytes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    u = rng.random(n)
    conf = np.zeros((n, 2), np.float32)
    preds = []
    for e in range(2):
        c = 1 / (1 + np.exp(-(4 + 2 * e) * (0.6 - u) - rng.normal(0, 0.7, n)))
        conf[:, e] = c
        ok = rng.random(n) < 0.1 + 0.9 * c**1.5
        preds.append(np.where(ok, labels, (labels + 1) % 10))
    tails = [
        np.where(rng.random(n) < 1 - (0.16 + d) * u, labels, (labels + 2) % 10) for d in point_drop
    ]
    sizes = np.array([100 * k * b // 8 + 37 for k, b in points])
    return CalibrationTable(
        labels=labels,
        exit_names=("early", "late"),
        exit_segments=(0, 1),
        segments=3,
        confidence={"max_prob": conf, "margin": conf**2, "entropy": np.sqrt(conf)},
        exit_prediction=np.stack(preds, 1),
        points=points,
        tail_prediction=np.stack(tails, 1),
        frame_bytes=np.tile(sizes, (n, 1)),
        info={"bundle": "synthetic"},
    )


def tiny_table(conf: list[list[float]], exit_ok: list[list[bool]], tail_ok: list[bool]):
    """A hand-written table: labels 0, predictions 0 where right and 1 where wrong."""
    n = len(tail_ok)
    return CalibrationTable(
        labels=np.zeros(n, np.int64),
        exit_names=("a", "b"),
        exit_segments=(0, 1),
        segments=2,
        confidence={"max_prob": np.array(conf, np.float32)},
        exit_prediction=(~np.array(exit_ok)).astype(np.int64),
        points=((4, 8),),
        tail_prediction=(~np.array(tail_ok)).astype(np.int64)[:, None],
        frame_bytes=np.full((n, 1), 1000),
    )


# ---------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize(
    ("k", "n", "confidence", "expected"),
    [  # scipy.stats.beta.ppf(1 - confidence, k, n - k + 1); 5/10 is the textbook 95% CI
        (5, 10, 0.975, 0.1870860284),
        (50, 100, 0.975, 0.3983211295),
        (95, 100, 0.95, 0.8977466224),
        (980, 1000, 0.95, 0.9710698771),
        (1, 20, 0.9, 0.0052541741),
    ],
)
def test_clopper_pearson_lower_matches_reference_values(k, n, confidence, expected):
    assert clopper_pearson_lower(k, n, confidence) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("k", "n", "confidence", "expected"),
    [(0, 10, 0.975, 0.3084971078), (5, 10, 0.975, 0.8129139716), (3, 1000, 0.95, 0.0077352447)],
)
def test_clopper_pearson_upper_matches_reference_values(k, n, confidence, expected):
    assert clopper_pearson_upper(k, n, confidence) == pytest.approx(expected, abs=1e-9)


def test_clopper_pearson_closed_forms_at_the_edges():
    # all successes: p**n = alpha; one success: 1 - (1 - p)**n = alpha; none: bound 0
    assert clopper_pearson_lower(30, 30, 0.95) == pytest.approx(0.05 ** (1 / 30), abs=1e-12)
    assert clopper_pearson_lower(1, 30, 0.95) == pytest.approx(1 - 0.95 ** (1 / 30), abs=1e-9)
    assert clopper_pearson_lower(0, 30, 0.95) == 0.0
    assert clopper_pearson_upper(0, 0) == 1.0


def test_clopper_pearson_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 50_000))
        k = int(rng.integers(1, n + 1))
        c = float(rng.choice([0.9, 0.95, 0.99]))
        assert clopper_pearson_lower(k, n, c) == pytest.approx(
            stats.beta.ppf(1 - c, k, n - k + 1), abs=1e-9
        )
        assert binom_sf(k, n, 0.5) == pytest.approx(stats.binom.sf(k - 1, n, 0.5), abs=1e-9)


def test_clopper_pearson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson_lower(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_lower(5, 10, 1.5)


# --------------------------------------------------------------------------------- table


def test_table_round_trips_through_npz(tmp_path):
    table = synthetic(500, 0)
    path = table.save(tmp_path / "cal")
    assert path.name == "cal.npz"
    back = CalibrationTable.load(path)
    assert back.exit_names == table.exit_names and back.points == table.points
    assert back.exit_segments == table.exit_segments and back.segments == table.segments
    assert back.info == table.info
    for a, b in (
        (back.labels, table.labels),
        (back.exit_prediction, table.exit_prediction),
        (back.tail_prediction, table.tail_prediction),
        (back.frame_bytes, table.frame_bytes),
    ):
        np.testing.assert_array_equal(a, b)
    for m in table.measures:
        np.testing.assert_array_equal(back.confidence[m], table.confidence[m])
    with np.load(path, allow_pickle=False) as z:  # compact integer storage
        assert z["labels"].dtype == np.uint8 and z["frame_bytes"].dtype == np.int16


def test_table_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", header=np.frombuffer(b'{"format": "x"}', np.uint8))
    with pytest.raises(CalibrationError, match="not a splitexit calibration table"):
        CalibrationTable.load(tmp_path / "other.npz")
    with pytest.raises(CalibrationError, match="no calibration table"):
        CalibrationTable.load(tmp_path / "missing.npz")


def test_table_refuses_inconsistent_shapes():
    t = synthetic(10, 0)
    with pytest.raises(CalibrationError, match="exit_prediction has shape"):
        CalibrationTable(
            labels=t.labels,
            exit_names=t.exit_names,
            exit_segments=t.exit_segments,
            segments=t.segments,
            confidence=t.confidence,
            exit_prediction=t.exit_prediction[:5],
            points=t.points,
            tail_prediction=t.tail_prediction,
            frame_bytes=t.frame_bytes,
        )


# -------------------------------------------------------------------------------- policy


def test_a_sample_leaves_at_the_first_confident_exit_and_costs_follow_its_path():
    table = tiny_table(
        conf=[[0.9, 0.99], [0.5, 0.95], [0.5, 0.5], [0.2, 0.1]],
        exit_ok=[[True, False], [False, True], [True, True], [True, True]],
        tail_ok=[False, False, True, False],
    )
    device = Compute(segment_s=(1e-3, 2e-3), exit_s=(0.5e-3, 0.25e-3), encode_s=0.5e-3)
    link = Link.mbit(8.0, 10.0)  # 1000 B = 1 ms
    cost = CostModel(link, device, Compute(tail_s=3e-3))
    out = evaluate_policy(table, {"a": 0.8, "b": 0.9}, cost=cost)
    # sample 0 exits at a (although b is more confident), 1 at b, 2 and 3 go to the tail
    assert out.exit_counts == {"a": 1, "b": 1}
    assert out.offload_rate == 0.5
    assert out.accuracy == 0.75  # right, right, tail right, tail wrong
    assert out.exit_accuracy == {"a": 1.0, "b": 1.0} and out.offload_accuracy == 0.5
    assert out.tail_on_accepted == {"a": 0.0, "b": 0.0}
    assert out.expected_bytes == 500.0
    at_a, at_b = 1.0 + 0.5, 1.0 + 2.0 + 0.5 + 0.25
    offload = 3.75 + 0.5 + 1.0 + 10.0 + 3.0
    assert out.expected_latency_ms == pytest.approx((at_a + at_b + 2 * offload) / 4)


def test_links_read_the_emulator_spec_syntax():
    assert Link.parse("5mbit:20ms") == Link.mbit(5.0, 20.0)
    assert Link.parse("100kbit:50ms", overhead_bytes=300).transfer_s(950) == pytest.approx(
        (950 + 300) * 8 / 100e3 + 0.05
    )
    with pytest.raises(ValueError, match="no rate"):
        Link.parse("unlimited:5ms")


def test_exits_turned_off_leave_the_tail_alone():
    table = synthetic(1000, 0)
    out = evaluate_policy(table, {})
    assert out.offload_rate == 1.0 and out.accuracy == table.tail_accuracy()
    assert out.thresholds == {"early": NEVER, "late": NEVER}


# ---------------------------------------------------------------------------- selection


def test_threshold_lands_at_the_knee_of_a_sharp_exit():
    # exit b is always right at confidence >= 0.7 and always wrong below
    rng = np.random.default_rng(0)
    conf = rng.random((4000, 2)).astype(np.float32)
    conf[:, 0] = 0.0  # exit a never trusts itself
    ok = np.stack([np.zeros(4000, bool), conf[:, 1] >= 0.7], axis=1)
    table = tiny_table(conf.tolist(), ok.tolist(), [True] * 4000)
    s = select_thresholds(table, Goal.accuracy(0.0), candidates=400)
    assert s.feasible
    assert 0.7 <= s.thresholds["b"] <= 0.705
    assert s.thresholds["a"] == NEVER  # taking everything at exit a would be wrong
    assert s.outcome.accuracy == 1.0


@pytest.mark.parametrize("max_drop", [0.5, 1.0, 2.0])
def test_accuracy_goal_is_met_on_calibration_and_held_out_data(max_drop):
    cal, test = synthetic(5000, 0), synthetic(20000, 1)
    s = select_thresholds(cal, Goal.accuracy(max_drop))
    assert s.feasible and s.outcome.accuracy >= s.floor
    assert s.outcome.offload_rate < 0.95  # the exits do take work off the tail
    check = check_promise(s, test)
    (acc,) = check.promises
    assert acc.quantity == "accuracy"
    assert acc.target == pytest.approx(test.tail_accuracy() - max_drop / 100)
    assert acc.gap > -0.006  # plain mode: within sampling noise of the target


def test_conservative_mode_is_more_conservative_and_keeps_the_promise():
    for seed in range(4):
        cal, test = synthetic(3000, 2 * seed), synthetic(20000, 2 * seed + 1)
        plain = select_thresholds(cal, Goal.accuracy(1.0))
        safe = select_thresholds(cal, Goal.accuracy(1.0), conservative=True)
        assert safe.feasible and safe.conservative
        assert safe.pessimistic_accuracy >= safe.floor
        assert safe.outcome.offload_rate >= plain.outcome.offload_rate
        assert safe.outcome.accuracy >= plain.outcome.accuracy
        assert check_promise(safe, test).kept, f"seed {seed}"
        for name, bound in safe.exit_bounds.items():
            if bound is not None:
                assert bound <= safe.outcome.exit_accuracy[name]


def test_offload_goal_caps_the_offload_rate():
    cal, test = synthetic(5000, 0), synthetic(20000, 1)
    for rate in (0.3, 0.6):
        plain = select_thresholds(cal, Goal.offload(rate))
        assert plain.feasible and plain.outcome.offload_rate <= rate
        assert abs(check_promise(plain, test).test.offload_rate - rate) < 0.03
        safe = select_thresholds(cal, Goal.offload(rate), conservative=True)
        assert safe.offload_bound <= rate
        assert check_promise(safe, test).kept
    # a bigger budget buys accuracy
    lo = select_thresholds(cal, Goal.offload(0.3)).outcome.accuracy
    hi = select_thresholds(cal, Goal.offload(0.6)).outcome.accuracy
    assert hi > lo


DEVICE = Compute(segment_s=(1e-3, 1e-3, 2e-3), exit_s=(0.2e-3, 0.2e-3))
SERVER = Compute(tail_s=1e-3)


def test_latency_goal_picks_the_cheaper_operating_point_on_a_slow_link():
    cal = synthetic(4000, 0, point_drop=(0.0, 0.0))  # both points equally accurate
    slow_cost = CostModel(Link.mbit(0.1, 20.0), DEVICE, SERVER)
    slow = select_thresholds(cal, Goal.latency(slow_cost))
    assert slow.feasible and slow.point.key == (2, 4)  # 137 B instead of 437 B
    fast = select_thresholds(cal, Goal.latency(CostModel(Link.mbit(1000.0, 20.0), DEVICE, SERVER)))
    assert fast.outcome.expected_latency_ms < slow.outcome.expected_latency_ms
    # the reported latency is the replayed one
    replay = Replay(cal, slow.measure, slow.point, slow_cost)
    assert replay.outcome(list(slow.thresholds.values())) == slow.outcome


def test_latency_goal_respects_its_accuracy_floor():
    cal = synthetic(4000, 0)
    cost = CostModel(Link.mbit(0.1), DEVICE, SERVER)
    s = select_thresholds(cal, Goal.latency(cost, max_drop=1.0))
    # the (2, 4) point is 2.5 points worse than the widest: not allowed under a 1-point floor
    assert s.point.key == (4, 8) and s.outcome.accuracy >= s.floor


def test_auto_measure_picks_the_informative_one():
    table = synthetic(4000, 0)
    rng = np.random.default_rng(1)
    noise = rng.random(table.confidence["max_prob"].shape).astype(np.float32)
    confidence = {"max_prob": noise, "margin": table.confidence["max_prob"]}
    table = CalibrationTable(**{**table.__dict__, "confidence": confidence})
    s = select_thresholds(table, Goal.accuracy(1.0), measure="auto")
    assert s.measure == "margin"
    assert s.search["measures"] == ["max_prob", "margin"]


def test_an_unreachable_goal_is_reported_not_faked():
    table = synthetic(2000, 0)
    s = select_thresholds(table, Goal.accuracy(min_accuracy=0.999))
    assert not s.feasible
    assert "WARNING" in format_selection(s)


def test_goals_say_what_they_are_missing():
    with pytest.raises(CalibrationError, match="needs a cost model"):
        Goal("latency")
    with pytest.raises(CalibrationError, match="offload_rate"):
        Goal("offload")
    with pytest.raises(CalibrationError, match="unknown goal"):
        Goal("speed")
    with pytest.raises(CalibrationError, match="not in the table"):
        select_thresholds(synthetic(100, 0), Goal.accuracy(), point=(3, 8))


def test_sweep_reports_target_achieved_and_gap():
    cal, test = synthetic(3000, 0), synthetic(5000, 1)
    checks = promise_sweep(cal, test, max_drops=(0.5, 2.0))
    assert [(c.selection.goal.max_drop, c.selection.conservative) for c in checks] == [
        (0.5, False),
        (0.5, True),
        (2.0, False),
        (2.0, True),
    ]
    text = format_sweep(checks)
    assert "conservative" in text and "gap" in text
    report = format_selection(checks[1].selection, checks[1])
    assert "promise: accuracy at least" in report and "CP lower" in report


# ------------------------------------------------------------------- a real tiny bundle


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory):
    """small_resnet (width 8) cut after layer1, 4-channel bottleneck, exits on layer1 and
    the code; trained for two epochs on 2000 Fashion-MNIST images, exported, and recorded on
    1000 calibration and 1000 test images."""
    from splitexit.data import FASHION_MNIST_CLASSES, fashion_mnist_splits, find_fashion_mnist
    from splitexit.models import build_model
    from splitexit.preprocess import Preprocess
    from splitexit.splitnet import SplitExitNet

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not on this machine")
    splits = fashion_mnist_splits(seed=0, calibration=1000, subset=2000, download=False)
    torch.manual_seed(0)
    pre = Preprocess(size=(28, 28), mean=(0.286,), std=(0.353,), channels=1)
    net = SplitExitNet.from_teacher(
        build_model("small_resnet", width=8),
        "layer1",
        input_shape=(1, 28, 28),
        channels=4,
        hidden=8,
        downsample=2,
        exit_points=["layer1", "bottleneck"],
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    images, labels = splits["train"]
    splits["test"] = (splits["test"][0][:1000], splits["test"][1][:1000])
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: threads only contend on a shared CPU
    try:
        net.train()
        for _ in range(2):
            for i in range(0, len(labels), 64):
                y = torch.from_numpy(labels[i : i + 64])
                out = net(pre(images[i : i + 64]), bits=8)
                loss = F.cross_entropy(out["logits"], y)
                loss = loss + sum(F.cross_entropy(v, y) for v in out["exits"].values())
                opt.zero_grad()
                loss.backward()
                opt.step()
        export_bundle(
            net.eval(),
            path,
            name="tiny",
            architecture={"teacher": "small_resnet"},
            preprocessing=pre,
            class_names=list(FASHION_MNIST_CLASSES),
            example_input_shape=(1, 28, 28),
            operating_points=[{"channels": 4, "bits": 8}, {"channels": 2, "bits": 4}],
        )
        bundle = load_bundle(path)
        tables = {
            name: record_table(bundle, *splits[name], info={"split": name})
            for name in ("calibration", "test")
        }
    finally:
        torch.set_num_threads(threads)
    return path, splits, tables


def test_recorded_table_matches_the_bundle(trained_bundle):
    path, _, tables = trained_bundle
    cal = tables["calibration"]
    manifest = read_manifest(path)
    assert cal.n == 1000 and cal.exit_names == ("layer1", "bottleneck")
    assert cal.exit_segments == tuple(e.segment for e in manifest.exits)
    assert [p.key for p in cal.points] == [(4, 8), (2, 4)] and cal.info[
        "fingerprint"
    ] == manifest.fingerprint
    assert cal.tail_accuracy() > 0.3  # it learned something
    for m in cal.measures:
        assert ((cal.confidence[m] >= 0) & (cal.confidence[m] <= 1)).all()


def test_replayed_policy_matches_the_runtime_head_and_frames(trained_bundle):
    from splitexit.runtime.head import HeadRunner

    path, splits, tables = trained_bundle
    cal = tables["calibration"]
    bundle = load_bundle(path)
    images, _ = splits["calibration"]
    thresholds = {
        name: float(np.quantile(cal.confidence["margin"][:, i], 0.6))
        for i, name in enumerate(cal.exit_names)
    }
    runner = HeadRunner(bundle, measure="margin", thresholds=thresholds)
    result = runner.run(bundle.preprocess(images[:200]))
    replay = Replay(cal.subset(np.arange(200)), "margin")
    first = replay.first_exit(np.array(list(thresholds.values())))
    names = [*cal.exit_names, None]
    conf = cal.confidence["margin"][:200]
    near_tie = (np.abs(conf - np.array(list(thresholds.values()))) < 1e-5).any(axis=1)
    for i in np.flatnonzero(~near_tie):
        assert result.exit_name[i] == names[first[i]]
    # a pending sample's frame is as big as the table says
    i = result.pending[0]
    frame = runner.frame(result.z[:1], bits=4, keep=2)
    assert len(frame) == cal.frame_bytes[i, cal.point_index((2, 4))]


def test_thresholds_written_to_the_bundle_keep_it_loadable(trained_bundle, tmp_path):
    src, _, tables = trained_bundle
    path = tmp_path / "bundle"
    shutil.copytree(src, path)
    before = read_manifest(path)
    s = select_thresholds(tables["calibration"], Goal.accuracy(2.0), measure="entropy")
    write_selection(path, s, check_promise(s, tables["test"]))
    after = load_bundle(path).manifest  # verifies every hash and the fingerprint
    assert after.fingerprint == before.fingerprint
    assert after.thresholds == s.thresholds
    assert {e.measure for e in after.exits} == {"entropy"}
    cal = after.metrics["calibration"]
    assert cal["thresholds"] == s.thresholds and cal["test"]["promises"][0]["quantity"] == (
        "accuracy"
    )


def test_calibrate_command_records_and_saves_tables(trained_bundle, tmp_path, capsys):
    src, _, _ = trained_bundle
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tables, out = tmp_path / "tables", tmp_path / "selection.json"
    args = parser.parse_args(
        [str(src), "--subset", "200", "--save-tables", str(tables), "--json", str(out),
         "--dry-run"]
    )  # fmt: skip
    rc = calibrate_main(args)
    payload = json.loads(out.read_text())
    assert rc == (0 if payload["selection"]["feasible"] and payload["check"]["kept"] else 1)
    assert CalibrationTable.load(tables / "calibration.npz").n == 200
    assert CalibrationTable.load(tables / "test.npz").n == 200
    assert "promise: accuracy" in capsys.readouterr().out


def test_calibrate_command_writes_thresholds_that_keep_their_promise(
    trained_bundle, tmp_path, capsys
):
    src, _, recorded = trained_bundle
    path = tmp_path / "bundle"
    shutil.copytree(src, path)
    for name, table in recorded.items():
        table.save(tmp_path / "tables" / f"{name}.npz")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "selection.json"
    args = parser.parse_args(
        [str(path), "--load-tables", str(tmp_path / "tables"), "--conservative", "--json",
         str(out)]
    )  # fmt: skip
    assert calibrate_main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["check"]["kept"]
    assert read_manifest(path).thresholds == payload["selection"]["thresholds"]
    assert "KEPT" in capsys.readouterr().out
    # another goal, without touching the bundle
    args = parser.parse_args(
        [str(path), "--load-tables", str(tmp_path / "tables"), "--goal", "latency",
         "--bandwidth-mbps", "1", "--segment-ms", "1", "1", "--exit-ms", "0.1", "0.1",
         "--tail-ms", "1", "--dry-run"]
    )  # fmt: skip
    calibrate_main(args)
    assert "expected latency" in capsys.readouterr().out
    assert read_manifest(path).thresholds == payload["selection"]["thresholds"]


def test_a_small_calibration_split_is_warned_about_per_exit_and_recorded_in_the_bundle(
    trained_bundle, tmp_path, capsys
):
    src, _, recorded = trained_bundle
    path = tmp_path / "bundle"
    shutil.copytree(src, path)
    recorded["calibration"].subset(np.arange(120)).save(tmp_path / "tables" / "calibration.npz")
    recorded["test"].save(tmp_path / "tables" / "test.npz")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "selection.json"
    args = parser.parse_args(
        [str(path), "--load-tables", str(tmp_path / "tables"), "--conservative", "--force",
         "--json", str(out)]
    )  # fmt: skip
    calibrate_main(args)
    captured = capsys.readouterr()
    samples = json.loads(out.read_text())["selection"]["exit_samples"]
    assert list(samples) == ["layer1", "bottleneck"]
    warned = [name for name, e in samples.items() if e["worth_more_data"]]
    assert warned, "120 samples should be too few for a 1-point margin"
    lines = [line for line in captured.err.splitlines() if "warning: exit" in line]
    assert [line.split("'")[1] for line in lines] == warned
    for line, name in zip(lines, warned, strict=True):
        assert f"{samples[name]['more_images']} more labelled calibration images" in line
    assert "calibration samples per exit" in captured.out
    assert read_manifest(path).metrics["calibration"]["exit_samples"] == samples


def test_calibrate_command_refuses_tables_from_another_bundle(trained_bundle, tmp_path):
    src, _, tables = trained_bundle
    other = CalibrationTable(
        **{**tables["calibration"].__dict__, "info": {"fingerprint": "0" * 64}}
    )
    other.save(tmp_path / "calibration.npz")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(src), "--load-tables", str(tmp_path), "--dry-run"])
    with pytest.raises(CalibrationError, match="record them again"):
        calibrate_main(args)


def test_a_missed_promise_leaves_the_bundle_untouched(trained_bundle, tmp_path, capsys):
    src, _, tables = trained_bundle
    path = tmp_path / "bundle"
    shutil.copytree(src, path)
    cal = tables["calibration"]
    cal.save(tmp_path / "tables" / "calibration.npz")
    wrong = cal.exit_prediction + 1  # on the held-out split every exit is wrong
    CalibrationTable(**{**cal.__dict__, "exit_prediction": wrong}).save(
        tmp_path / "tables" / "test.npz"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(path), "--load-tables", str(tmp_path / "tables")])
    before = (path / "manifest.json").read_bytes()
    assert calibrate_main(args) == 1
    assert "MISSED" in capsys.readouterr().out
    assert (path / "manifest.json").read_bytes() == before


def test_measured_compute_fits_the_table(trained_bundle):
    from splitexit.calibrate import check_compute, measure_compute

    path, _, tables = trained_bundle
    here = measure_compute(load_bundle(path), repeats=3, warmup=1)
    check_compute(here, tables["calibration"])
    slow = here.scaled(10.0)
    assert math.isclose(slow.segment_s[0], 10 * here.segment_s[0])
    assert here.tail_s > 0 and here.encode_s > 0
    assert Path(path).is_dir()


def test_the_cli_parsers_build_without_torch_and_offer_every_choice():
    import subprocess
    import sys

    from splitexit.calibrate.goals import GOALS
    from splitexit.commands.calibrate import GOAL_CHOICES, MEASURE_CHOICES
    from splitexit.exits import CONFIDENCE_MEASURES

    assert GOAL_CHOICES == GOALS
    assert MEASURE_CHOICES[:-1] == CONFIDENCE_MEASURES and MEASURE_CHOICES[-1] == "auto"
    code = (
        "import sys\n"
        "from splitexit.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'building the parsers imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
