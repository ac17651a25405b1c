"""The user's own journey: their nn.Module and their image folder, from a config to a served,
calibrated bundle, run with the commands docs/your-model.md gives (and the faults on the way).

The images are Fashion-MNIST test images written as 32x32 RGB PNGs in four class folders,
separate train and test folders; the models are defined here, in this very file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from splitexit.demo import free_port
from splitexit.models import StagedModel
from splitexit.processes import server_process, wait_ready

BIN = Path(sys.executable).parent
CLASSES = {0: "tshirt", 1: "trouser", 7: "sneaker", 8: "bag"}  # Fashion-MNIST label -> folder
TRAIN_PER_CLASS, TEST_PER_CLASS = 60, 25


# ------------------------------------------------------------------------- the user's models


def build_cnn(num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A plain nn.Sequential with named children: its split and exit points."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            block1=nn.Sequential(
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
            ),
            block2=nn.Sequential(
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
            ),
            head=nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
            ),
        )
    )


def build_staged(num_classes: int = 10) -> StagedModel:
    """The same network as a StagedModel."""
    stages = OrderedDict(build_cnn(num_classes, width=8).named_children())
    stages["classifier"] = stages.pop("head")
    return StagedModel(stages)


class ResidualNet(nn.Module):
    """Not a Sequential: a skip connection, cut with torch.fx where one tensor crosses."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.fc(self.down(x).mean((2, 3)))


def build_residual(num_classes: int = 10) -> ResidualNet:
    return ResidualNet(num_classes)


def build_broken(num_classes: int = 10, **kwargs: object) -> nn.Module:
    raise RuntimeError("weights server unreachable")


# ---------------------------------------------------------------------------- the journey

CONFIG = """\
name = "my-cnn"
seed = 0

[data]
dataset = "folder"
root = "images/train"
test_root = "images/test"
calibration = 0.25

[teacher]
model = "{model}"
kwargs = {{ width = 16 }}

[teacher.optim]
epochs = 10
lr = 3e-3
batch_size = 32

[split]
point = "block1"
channels = 8
hidden = 16

[stage1.optim]
epochs = 6
batch_size = 32

[stage2.optim]
epochs = 6
batch_size = 32

[exits]
points = ["stem", "bottleneck"]

[exits.optim]
epochs = 4
batch_size = 32
"""


def write_images(root: Path) -> None:
    """images/{train,test}/<class>/<n>.png: Fashion-MNIST test images, 32x32 RGB."""
    from PIL import Image

    from splitexit.data import find_fashion_mnist, load_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not on this machine")
    x, y = load_fashion_mnist("test", download=False)
    for label, name in CLASSES.items():
        idx = np.flatnonzero(y == label)
        for split, (lo, hi) in {
            "train": (0, TRAIN_PER_CLASS),
            "test": (TRAIN_PER_CLASS, TRAIN_PER_CLASS + TEST_PER_CLASS),
        }.items():
            folder = root / "images" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx[lo:hi]:
                Image.fromarray(x[i]).convert("RGB").resize((32, 32)).save(folder / f"{i}.png")


def splitexit(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """One `splitexit ...` command, as a user types it."""
    return _run([str(BIN / "splitexit"), *args], cwd, check)


def _run(cmd: list[str], cwd: Path, check: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed as a user error: exit 2, one line on stderr, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("splitexit: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with images/, my-run.toml and runs/my-cnn, trained with `splitexit train`."""
    root = tmp_path_factory.mktemp("journey")
    write_images(root)
    (root / "my-run.toml").write_text(CONFIG.format(model=f"{Path(__file__)}:build_cnn"))
    splitexit("train", "my-run.toml", cwd=root)
    return root


def test_the_walkthrough_trains_calibrates_serves_and_answers_as_the_run_did(
    journey: Path,
) -> None:
    from splitexit.bundle import load_bundle, read_manifest

    bundle = journey / "runs" / "my-cnn" / "bundle"
    results = json.loads((journey / "runs" / "my-cnn" / "results.json").read_text())
    m = read_manifest(bundle)
    prov = m.provenance
    assert list(m.class_names) == sorted(CLASSES.values()) == prov["class_names"]
    assert prov["dataset"] == "folder" and prov["input_shape"] == [3, 32, 32]
    assert prov["root"] == str((journey / "images" / "train").resolve())
    assert prov["test_root"] == str((journey / "images" / "test").resolve())
    n_train = TRAIN_PER_CLASS * len(CLASSES)
    assert prov["sizes"] == {"train": n_train - n_train // 4, "calibration": n_train // 4,
                             "test": TEST_PER_CLASS * len(CLASSES)}  # fmt: skip
    assert prov["config"]["teacher"]["model"].endswith("test_user_journey.py:build_cnn")
    assert results["teacher_accuracy"] > 0.6  # it learned the four classes

    # calibrate without naming the data: the run's own held-out split
    cal = splitexit("calibrate", "runs/my-cnn/bundle", "--conservative", cwd=journey)
    assert "the run's own held-out split" in cal.stderr
    m = read_manifest(bundle)
    on = m.provenance["calibrated_on"]
    assert on["calibration"]["samples"] == prov["sizes"]["calibration"]
    assert on["test"]["samples"] == prov["sizes"]["test"]
    splitexit("inspect", "runs/my-cnn/bundle", cwd=journey)

    # serve it, run the agent over the test folder
    port, log = free_port(), journey / "server.log"
    serve = [str(BIN / "splitexit-server"), "--bundle", "runs/my-cnn/bundle", "--host",
             "127.0.0.1", "--port", str(port)]  # fmt: skip
    with (
        log.open("w") as err,
        server_process(serve, cwd=journey, stdout=subprocess.DEVNULL, stderr=err) as server,
    ):
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", server, log, timeout_s=60)
        _run(
            [str(BIN / "splitexit-device"), "run", "--bundle", "runs/my-cnn/bundle",
             "--server", f"http://127.0.0.1:{port}", "--source", "images/test",
             "--out", "records.jsonl"],
            journey, True,
        )  # fmt: skip
    records = [json.loads(line) for line in (journey / "records.jsonl").read_text().splitlines()]
    assert len(records) == TEST_PER_CLASS * len(CLASSES)
    assert all(r["label"] is not None and r["error"] is None for r in records)
    # past the exits, the agent offloads or finishes the tail here, whichever it expects sooner
    assert any(r["decided_by"] in ("server", "device") for r in records)

    # every answer is what the bundle gives in process for that input and decision
    loaded = load_bundle(bundle, parts=("head", "exits", "tail"))
    expected = _expected_classes(loaded, journey, records)
    agree = np.mean([r["class"] == e for r, e in zip(records, expected, strict=True)])
    assert agree >= 0.98
    accuracy = np.mean([r["class"] == r["label"] for r in records])
    expected_accuracy = np.mean([e == r["label"] for r, e in zip(records, expected, strict=True)])
    assert abs(accuracy - expected_accuracy) <= 0.02
    # ... and within the run's own test accuracies (exits, operating points, teacher)
    grid = [p["accuracy"] for p in results["operating_points"]] + list(results["exits"].values())
    assert min(grid) - 0.02 <= accuracy <= max([*grid, results["teacher_accuracy"]]) + 0.02

    # export again, with ONNX: same fingerprint, calibrated thresholds kept
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    before = read_manifest(bundle)
    out = splitexit("export", "runs/my-cnn", "--onnx", cwd=journey)
    after = read_manifest(bundle)
    assert after.fingerprint == before.fingerprint and after.thresholds == before.thresholds
    assert after.metrics["calibration"] == before.metrics["calibration"]
    assert after.provenance["calibrated_on"] == before.provenance["calibrated_on"]
    assert "kept the calibrated thresholds" in out.stderr
    assert any(p.startswith("onnx/") for p in after.files)
    load_bundle(bundle)  # every hash and the fingerprint verify


def _expected_classes(bundle, root: Path, records: list[dict]) -> list[int]:
    from splitexit.preprocess import decode_image, encode_image, open_image, pil_to_array
    from splitexit.runtime import HeadRunner, TailRunner

    head, tail = HeadRunner(bundle), TailRunner(bundle)
    out = []
    for r in records:
        with open_image(root / "images" / "test" / r["id"]) as img:
            pixels = pil_to_array(img)
        if r["action"] == "image":  # what the server decoded: "image/png" or "image/jpeg" (q95)
            pixels = decode_image(encode_image(pixels, r["reason"].split("/")[1], 95))
        x = bundle.preprocess(pixels[None])
        result = head.run(x, exits=True)
        exit_name = r["exit"] if r["decided_by"] not in ("server", "device") else None
        z = head.run(x, exits=False).z
        if exit_name is not None:
            out.append(int(result.exit_logits[0][exit_name].argmax()))
        elif r["decided_by"] == "device":  # the tail here, on the float code
            out.append(int(bundle.tail(z).argmax()))
        else:  # a frame at (k, bits), or the image: the server's whole model at its best point
            k, bits = (r["channels"], r["bits"]) if r["channels"] else best_point(bundle)
            out.append(tail.run_frames([head.frame(z, bits, k)])[0].prediction)
    return out


def best_point(bundle) -> tuple[int, int]:
    measured = [p for p in bundle.manifest.operating_points if p.accuracy is not None]
    b = bundle.manifest.bottleneck
    if not measured:
        return b.channels, max(b.bits)
    p = max(measured, key=lambda p: (p.accuracy, p.channels, p.bits))
    return p.channels, p.bits


# ------------------------------------------------------------------ models, by every form


def test_models_lists_a_user_models_split_points_by_file_reference(journey: Path) -> None:
    out = splitexit("models", f"{Path(__file__)}:build_residual", cwd=journey).stdout
    line = next(x for x in out.splitlines() if "split and exit points" in x)
    points = line.split(":", 1)[1].strip().split(", ")
    assert points == ["stem.0", "stem", "stem.1", "down.0", "down", "down.1"]
    # `body` sits inside the skip connection: two tensors would cross a cut there


def test_a_staged_model_and_an_fx_traced_model_train_by_module_and_file_reference(
    journey: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitexit.bundle import load_bundle
    from splitexit.train.config import config_from_dict
    from splitexit.train.pipeline import run_experiment

    monkeypatch.chdir(journey)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    base = {
        "seed": 0,
        "data": {"dataset": "folder", "root": "images/train", "test_root": "images/test",
                 "calibration": 40, "train_subset": 80},
        "teacher": {"optim": {"epochs": 1, "lr": 3e-3, "batch_size": 32}},
        "split": {"channels": 4, "hidden": 8, "bits": [4, 8]},
        "stage1": {"optim": {"epochs": 1, "batch_size": 32}},
        "stage2": {"optim": {"epochs": 1, "batch_size": 32}},
        "exits": {"optim": {"epochs": 1, "batch_size": 32}},
    }  # fmt: skip
    for name, model, point, exits in (
        ("staged", "test_user_journey:build_staged", "block1", ["stem", "bottleneck"]),
        ("fx", f"{Path(__file__)}:build_residual", "down", ["stem.1", "bottleneck"]),
    ):
        table = json.loads(json.dumps(base))
        table.update(name=name, output=str(tmp_path / name))
        table["teacher"]["model"] = model
        table["split"]["point"] = point
        table["exits"]["points"] = exits
        results = run_experiment(config_from_dict(table), log=lambda *a: None)
        bundle = load_bundle(results["bundle"])
        names = {"staged": ["stem", "bottleneck"], "fx": ["stem_1", "bottleneck"]}[name]
        assert bundle.manifest.exit_names == names
        assert bundle.manifest.split_point == point
        assert bundle.manifest.provenance["config"]["teacher"]["model"] == (
            model if name == "staged" else f"{Path(__file__).resolve()}:build_residual"
        )
        # export rebuilds the model from the run's own record (a module reference needs its
        # module importable: run from its folder), and keeps the fingerprint
        splitexit("export", str(tmp_path / name), cwd=Path(__file__).parent)
        assert load_bundle(results["bundle"]).fingerprint == bundle.fingerprint


def test_a_teacher_checkpoint_skips_teacher_training(journey: Path, tmp_path: Path) -> None:
    from splitexit.train.config import config_from_dict
    from splitexit.train.pipeline import run_experiment

    weights = tmp_path / "mine.pt"
    torch.manual_seed(3)
    model = build_cnn(len(CLASSES), width=8)
    torch.save(model.state_dict(), weights)
    table = {
        "name": "ckpt",
        "output": str(tmp_path / "run"),
        "data": {"dataset": "folder", "root": str(journey / "images" / "train"),
                 "calibration": 40, "train_subset": 40, "test_subset": 20},
        "teacher": {"model": f"{Path(__file__)}:build_cnn", "kwargs": {"width": 8},
                    "checkpoint": str(weights)},
        "split": {"point": "block1", "channels": 2, "hidden": 4, "bits": [8]},
        "stage1": {"optim": {"epochs": 0}},
        "stage2": {"optim": {"epochs": 0}},
        "exits": {"points": ["bottleneck"], "optim": {"epochs": 0}},
    }  # fmt: skip
    run_experiment(config_from_dict(table), export=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoints" / "teacher.pt").exists()
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    stem = state["head.stem.0.weight"]
    assert torch.equal(stem, model.stem[0].weight.detach())


# ------------------------------------------------------------- the eight reported problems


def test_calibrate_refuses_to_guess_the_data_of_a_bundle_that_records_none(
    journey: Path, tmp_path: Path
) -> None:
    from splitexit.bundle import update_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(journey / "runs" / "my-cnn" / "bundle", bundle)
    update_manifest(bundle, provenance={})
    line = one_line_error(
        splitexit("calibrate", str(bundle), "--dry-run", cwd=journey, check=False)
    )
    assert "does not record the data" in line and "--images" in line
    # and Fashion-MNIST, named explicitly, is refused for having other classes
    done = splitexit("calibrate", str(bundle), "--config", "fmnist-small", "--dry-run",
                     cwd=journey, check=False)  # fmt: skip
    assert "classes" in one_line_error(done)


def test_calibrate_refuses_a_held_out_split_whose_images_changed(
    journey: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    shutil.copytree(journey / "images", work / "images")
    shutil.copytree(journey / "runs", work / "runs")
    from splitexit.bundle import read_manifest, update_manifest

    bundle = work / "runs" / "my-cnn" / "bundle"
    prov = read_manifest(bundle).provenance
    prov["config"]["data"]["root"] = str(work / "images" / "train")
    prov["config"]["data"]["test_root"] = str(work / "images" / "test")
    update_manifest(bundle, provenance=prov)
    victim = next((work / "images" / "train" / "bag").iterdir())
    victim.unlink()
    done = splitexit("calibrate", str(bundle), "--dry-run", cwd=work, check=False)
    assert "changed since training" in one_line_error(done)


def test_calibrate_honours_test_images_with_a_config(journey: Path, tmp_path: Path) -> None:
    some = tmp_path / "some"
    for name in CLASSES.values():
        (some / name).mkdir(parents=True)
        for p in sorted((journey / "images" / "test" / name).iterdir())[:3]:
            shutil.copy(p, some / name / p.name)
    out = tmp_path / "sel.json"
    splitexit("calibrate", "runs/my-cnn/bundle", "--config", "runs/my-cnn", "--test-images",
              str(some), "--dry-run", "--force", "--json", str(out), cwd=journey)  # fmt: skip
    check = json.loads(out.read_text())["check"]
    assert check["test"]["n"] == 3 * len(CLASSES)


def test_calibrate_refuses_a_folder_of_other_classes(journey: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        shutil.copy(next((journey / "images" / "test" / "bag").iterdir()), other / name / "a.png")
    done = splitexit("calibrate", "runs/my-cnn/bundle", "--images", str(other), "--dry-run",
                     cwd=journey, check=False)  # fmt: skip
    assert "classes" in one_line_error(done)


def test_reexport_keeps_the_fingerprint_and_thresholds_unless_asked(
    journey: Path, tmp_path: Path
) -> None:
    from splitexit.bundle import NEVER_EXIT, read_manifest, write_thresholds

    run = tmp_path / "run"
    shutil.copytree(journey / "runs" / "my-cnn", run)
    write_thresholds(run / "bundle", {"stem": 0.9})
    before = read_manifest(run / "bundle")
    splitexit("export", str(run), cwd=tmp_path)
    kept = read_manifest(run / "bundle")
    assert kept.fingerprint == before.fingerprint and kept.thresholds["stem"] == 0.9
    splitexit("export", str(run), "--reset-thresholds", cwd=tmp_path)
    reset = read_manifest(run / "bundle")
    assert reset.fingerprint == before.fingerprint and reset.thresholds["stem"] == NEVER_EXIT


def test_export_help_names_onnx_and_triton() -> None:
    text = splitexit("export", "--help", cwd=Path.cwd()).stdout
    assert "--onnx" in text and "--triton" in text and "--reset-thresholds" in text


def test_folder_data_defaults_measure_mean_and_std_and_augment_nothing(journey: Path) -> None:
    from splitexit.bundle import read_manifest

    m = read_manifest(journey / "runs" / "my-cnn" / "bundle")
    mean, std = m.preprocessing["mean"], m.preprocessing["std"]
    assert len(mean) == 3 and all(0.15 < v < 0.4 for v in mean)  # measured, not 0.286
    assert mean != [0.286] * 3 and std != [0.353] * 3
    assert m.provenance["augment"] == []


# ------------------------------------------------------------------- every bad input: exit 2


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"data": {"root": "no/such/folder"}}, "is not a folder"),
        ({"data": {"colour": "rgb"}}, "unknown key"),
        ({"data": {"calibration": 5000}}, "e.g. calibration ="),
        ({"data": {"augment": True}}, "list of transforms"),
        ({"data": {"augment": ["rotate"]}}, "unknown transform"),
        ({"teacher": {"model": "mycnn:build"}}, "cannot import 'mycnn'"),
        ({"teacher": {"model": "no_model_zoo_name"}}, "unknown model"),
        ({"teacher": {"model": "nowhere/mycnn.py:build"}}, "does not exist"),
        ({"teacher": {"model": "{here}:nothing_here"}}, "has no 'nothing_here'"),
        ({"teacher": {"model": "{here}:build_broken"}}, "weights server unreachable"),
        ({"teacher": {"kwargs": {"width": 8, "depth": 3}}}, "unexpected keyword"),
        ({"split": {"point": "nowhere"}}, "valid"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2_before_any_training(
    journey: Path, tmp_path: Path, change: dict, says: str
) -> None:
    import tomllib

    table = tomllib.loads(CONFIG.format(model=f"{Path(__file__)}:build_cnn"))
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, str):
                value = value.replace("{here}", str(Path(__file__)))
            table[section][key] = value
    table["output"] = str(tmp_path / "run")
    for key in ("root", "test_root"):
        table["data"][key] = str(journey / table["data"][key])
    if "data" in change and "root" in change["data"]:
        table["data"]["root"] = change["data"]["root"]
    (tmp_path / "bad.toml").write_text(_toml(table))
    line = one_line_error(splitexit("train", "bad.toml", cwd=tmp_path, check=False))
    assert says in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def _toml(table: dict) -> str:
    def value(v: object) -> str:
        return json.dumps(v)  # TOML accepts JSON strings, numbers, booleans and arrays

    lines = []
    for key, v in table.items():
        if not isinstance(v, dict):
            lines.append(f"{key} = {value(v)}")
    for key, v in table.items():
        if isinstance(v, dict):
            lines += ["", f"[{key}]"]
            for k, w in v.items():
                if isinstance(w, dict):
                    inner = ", ".join(f"{a} = {value(b)}" for a, b in w.items())
                    lines.append(f"{k} = {{ {inner} }}")
                else:
                    lines.append(f"{k} = {value(w)}")
    return "\n".join(lines) + "\n"


def test_val_root_and_test_root_replace_the_carved_splits_and_mean_std_are_kept(
    journey: Path, tmp_path: Path
) -> None:
    from splitexit.train.config import config_from_dict
    from splitexit.train.experiment_data import load_data, train_preprocess

    images = journey / "images"
    table = {
        "data": {"dataset": "folder", "root": str(images / "train"),
                 "val_root": str(images / "test"), "test_root": str(images / "test"),
                 "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "image_size": [24, 20]},
        "teacher": {"model": f"{Path(__file__)}:build_cnn"},
    }  # fmt: skip
    cfg = config_from_dict(table)
    data = load_data(cfg)
    n_train, n_test = TRAIN_PER_CLASS * len(CLASSES), TEST_PER_CLASS * len(CLASSES)
    assert {k: len(v) for k, v in data.splits.items()} == {
        "train": n_train, "calibration": n_test, "test": n_test,
    }  # fmt: skip
    assert tuple(data.splits["train"].images.shape[1:]) == (24, 20, 3)
    assert data.provenance["calibration"] == "val_root"
    pre = train_preprocess(cfg, data)
    assert pre.mean == (0.5, 0.4, 0.3) and pre.size == (24, 20) and pre.channels == 3


def test_images_of_mixed_sizes_need_an_image_size(tmp_path: Path) -> None:
    from PIL import Image

    from splitexit.errors import ConfigError
    from splitexit.train.config import config_from_dict
    from splitexit.train.experiment_data import load_data, plan_data

    for name, size in (("a", (20, 20)), ("b", (30, 24))):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.new("L", size, color=40 * i).save(tmp_path / name / f"{i}.png")
    table = {"data": {"dataset": "folder", "root": str(tmp_path), "calibration": 2},
             "teacher": {"model": f"{Path(__file__)}:build_cnn"}}  # fmt: skip
    with pytest.raises(ConfigError, match="image_size"):
        plan_data(config_from_dict(table))
    table["data"]["image_size"] = [16, 16]
    data = load_data(config_from_dict(table))
    assert tuple(data.splits["train"].images.shape[1:]) == (16, 16)  # grayscale: 1 channel
    assert data.provenance["input_shape"] == [1, 16, 16]


def test_the_threshold_notebook_takes_a_user_bundles_own_data_and_caches_per_fingerprint(
    journey: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jupytext = pytest.importorskip("jupytext", reason="the notebooks extra is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")
    from splitexit.bundle import read_manifest
    from splitexit.calibrate import CalibrationTable

    bundle = tmp_path / "bundle"
    shutil.copytree(journey / "runs" / "my-cnn" / "bundle", bundle)
    manifest = read_manifest(bundle)
    monkeypatch.setenv("SPLITEXIT_BUNDLE", str(bundle))
    monkeypatch.delenv("SPLITEXIT_TABLES", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    notebook = jupytext.read(notebooks / "tune_thresholds.ipynb")
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    tables = tmp_path / "data" / manifest.fingerprint[:16]
    cal = CalibrationTable.load(tables / "calibration.npz")
    test = CalibrationTable.load(tables / "test.npz")
    assert cal.n == manifest.provenance["sizes"]["calibration"]
    assert test.n == manifest.provenance["sizes"]["test"]
    assert cal.labels.max() < len(CLASSES)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["export", "no/such/run"], "not a finished run"),
        (["export", "runs/my-cnn", "--triton", "out"], "--triton goes with --onnx"),
        (["models", "mycnn:build"], "cannot import 'mycnn'"),
        (["models", "{here}:build_broken"], "weights server unreachable"),
        (["models", "no_such_zoo_model"], "unknown model"),
        (["profile", "nowhere/mycnn.py:build", "--input-shape", "3", "32", "32"], "does not exist"),
        (["profile", "{here}:build_cnn"], "--input-shape"),
        (["calibrate", "runs/my-cnn/bundle", "--images", "no/such/folder"], "is not a folder"),
        (["calibrate", "no/such/bundle"], "bundle"),
        (["inspect", "no/such/bundle"], "bundle"),
    ],
)
def test_every_command_answers_bad_input_with_one_line_and_exit_2(
    journey: Path, args: list[str], says: str
) -> None:
    args = [a.replace("{here}", str(Path(__file__))) for a in args]
    line = one_line_error(splitexit(*args, cwd=journey, check=False))
    assert says in line, line
