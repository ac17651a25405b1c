"""Export a trained SplitExitNet as a bundle, and rewrite a bundle's manifest in place.

    SplitExitNet ─ trace each piece (checked against eager) ─┬─ head/segment_{i}.pt
                                                             ├─ exits/<name>.pt
                                                             ├─ tail.pt  (decoder + tail)
                                                             ├─ weights.pt (state_dict)
                                                             ├─ codec/dictionary.zstd (opt.)
                                                             ├─ onnx/... (opt.)
                            sha256 of every file, fingerprint ─ manifest.json

Everything is written to a temporary sibling directory and renamed into place at the end,
so a crash never leaves a half-written bundle behind.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import shutil
import tarfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import zstandard
from torch import nn

from splitexit.bottleneck.module import Bottleneck
from splitexit.bottleneck.quantize import SUPPORTED_BITS
from splitexit.errors import BundleError
from splitexit.exits import CONFIDENCE_MEASURES
from splitexit.splitnet import SplitExitNet

from .load import quiet_torchscript
from .manifest import (
    DICTIONARY_FILE,
    MANIFEST_FILE,
    NEVER_EXIT,
    TAIL_FILE,
    WEIGHTS_FILE,
    BottleneckSpec,
    CodecSpec,
    ExitSpec,
    Manifest,
    OperatingPoint,
    exit_file,
    read_manifest,
    segment_file,
    sha256_file,
    write_manifest,
)

_TRACE_ATOL = 1e-5
_TRACE_RTOL = 1e-4


def export_bundle(
    net: SplitExitNet,
    path: str | os.PathLike[str],
    *,
    name: str,
    architecture: Mapping[str, Any],
    preprocessing: Mapping[str, Any] | Any,
    class_names: Sequence[str],
    example_input_shape: Sequence[int],
    operating_points: Sequence[OperatingPoint | Mapping[str, Any]] | None = None,
    teacher_accuracy: float | None = None,
    exit_thresholds: Mapping[str, float] | None = None,
    measure: str = "max_prob",
    zstd_level: int = 3,
    dictionary: bytes | zstandard.ZstdCompressionDict | None = None,
    metrics: Mapping[str, Any] | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    split_point: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write `net` as a bundle directory at `path` and return its manifest.

    Args:
        net: the trained model (left untouched: a CPU copy in eval mode is exported).
        architecture: how to rebuild the SplitExitNet (model zoo name + kwargs), stored as is.
        preprocessing: a `Preprocess` or its `to_dict()` ({size, mean, std, channels}).
        class_names: one name per output class.
        example_input_shape: per-sample input shape (C, H, W) used for tracing.
        operating_points: (k, bits) settings with measured accuracy / frame bytes; default
            all C channels at each of the bottleneck's bit-widths, unmeasured.
        exit_thresholds: per exit name; exits not given get 1.01 (never taken) until
            calibration writes one with `write_thresholds`.
        measure: confidence measure of every exit.
        dictionary: zstd dictionary for frame payloads, stored in codec/dictionary.zstd.
        onnx: also export ONNX graphs and a Triton model (needs the `export` extra), check
            them against the TorchScript pieces and record the parity in the manifest.
        overwrite: replace an existing non-empty directory at `path`.
        split_point: name of the split; default the last head stage's name.
        provenance: what the model was trained on (dataset, roots, classes, input shape,
            split seed and sizes, the run's config), stored as is.

    Raises BundleError if `path` is taken, an argument does not fit the model, or a traced
    piece disagrees with the eager model.
    """
    dest = Path(path)
    _check_destination(dest, overwrite)
    if measure not in CONFIDENCE_MEASURES:
        raise BundleError(f"unknown measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")
    pre = _preprocessing_dict(preprocessing)
    input_shape = tuple(int(s) for s in example_input_shape)
    if len(input_shape) == 4:
        input_shape = input_shape[1:]
    model = copy.deepcopy(net).cpu().float().eval()
    heads = [n for n, _ in model.head.named_children()]
    thresholds = dict(exit_thresholds or {})
    unknown = sorted(set(thresholds) - set(model.exit_names))
    if unknown:
        raise BundleError(f"exit_thresholds names {unknown}; the model's exits: {model.exit_names}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        exits, num_classes, code_shape = _write_torchscript(
            model, tmp, input_shape, measure, thresholds
        )
        if len(class_names) != num_classes:
            raise BundleError(
                f"got {len(class_names)} class names for a model with {num_classes} outputs"
            )
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        if dictionary is not None:
            (tmp / DICTIONARY_FILE).parent.mkdir(parents=True)
            data = (
                dictionary.as_bytes()
                if isinstance(dictionary, zstandard.ZstdCompressionDict)
                else bytes(dictionary)
            )
            (tmp / DICTIONARY_FILE).write_bytes(data)
        onnx_record: dict[str, Any] = {}
        if onnx:
            onnx_record = _write_onnx(model, tmp, name, input_shape, list(class_names))

        bottleneck = model.bottleneck
        manifest = Manifest(
            name=name,
            architecture=dict(architecture),
            fingerprint="0" * 64,
            split_point=split_point or (heads[-1] if heads else ""),
            input_shape=input_shape,
            segments=len(model.segments()),
            bottleneck=BottleneckSpec(
                channels=bottleneck.channels,
                code_shape=code_shape,
                feature_shape=tuple(bottleneck.feature_shape),
                bits=tuple(bottleneck.bits),
            ),
            operating_points=_operating_points(operating_points, bottleneck),
            exits=tuple(exits),
            preprocessing=pre,
            class_names=tuple(str(c) for c in class_names),
            codec=CodecSpec(
                zstd_level=int(zstd_level),
                dictionary=DICTIONARY_FILE if dictionary is not None else None,
            ),
            files=_hash_tree(tmp),
            teacher_accuracy=None if teacher_accuracy is None else float(teacher_accuracy),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            splitexit_version=_version(),
            metrics=dict(metrics or {}),
            provenance=dict(provenance or {}),
            weights_digest=weights_digest(model.state_dict()),
            onnx=onnx_record,
        )
        manifest = dataclasses.replace(manifest, fingerprint=manifest.compute_fingerprint())
        write_manifest(tmp, manifest)
        _commit(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def archive_bundle(path: str | os.PathLike[str], archive: str | os.PathLike[str]) -> Path:
    """Pack a bundle directory into a `.tar` (or `.tar.gz` / `.tgz`) that `load_bundle` reads."""
    src = Path(path)
    read_manifest(src)
    out = Path(archive)
    gzip = out.name.endswith((".gz", ".tgz"))
    with tarfile.open(out, "w:gz") if gzip else tarfile.open(out, "w") as tar:
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            tar.add(file, arcname=f"{src.name}/{file.relative_to(src).as_posix()}")
    return out


# ---------------------------------------------------------------------- manifest updates

_FROZEN_FIELDS = {
    "format",
    "format_version",
    "fingerprint",
    "weights_digest",
    "files",
    "bottleneck",
    "codec",
    "onnx",
}


def update_manifest(path: str | os.PathLike[str], **changes: Any) -> Manifest:
    """Rewrite fields of a bundle directory's manifest.json atomically; returns the new one.

    Values are given in their JSON form (e.g. `exits=[{...}, ...]`, `metrics={...}`).
    Fields the fingerprint or the file hashes depend on cannot change: re-export instead.
    """
    frozen = sorted(_FROZEN_FIELDS & changes.keys())
    if frozen:
        raise BundleError(
            f"cannot change {frozen} in place: they define the bundle's fingerprint or file "
            "hashes; re-export the bundle instead"
        )
    src = Path(path)
    if not src.is_dir():
        raise BundleError(f"{src} is not a bundle directory (archives are read-only)")
    old = read_manifest(src)
    d = old.to_dict()
    unknown = sorted(changes.keys() - d.keys())
    if unknown:
        raise BundleError(f"unknown manifest fields {unknown}; fields: {sorted(d)}")
    d.update({k: _jsonable(v) for k, v in changes.items()})
    new = Manifest.from_dict(d)
    if new.compute_fingerprint() != old.fingerprint:  # e.g. renamed exits or segments
        raise BundleError("this change would alter the bundle's fingerprint; re-export instead")
    write_manifest(src, new)
    return new


def write_thresholds(
    path: str | os.PathLike[str],
    thresholds: Mapping[str, float],
    measure: str | None = None,
    *,
    accuracies: Mapping[str, float] | None = None,
) -> Manifest:
    """Set the thresholds (and, if given, the measure and accuracy) of the named exits.

    The fingerprint does not change, so deployed devices keep talking to the server.
    """
    manifest = read_manifest(path)
    names = set(manifest.exit_names)
    unknown = sorted((set(thresholds) | set(accuracies or {})) - names)
    if unknown:
        raise BundleError(f"bundle has no exits {unknown}; its exits: {manifest.exit_names}")
    if measure is not None and measure not in CONFIDENCE_MEASURES:
        raise BundleError(f"unknown measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")
    exits = []
    for e in manifest.exits:
        if e.name in thresholds:
            e = dataclasses.replace(
                e, threshold=float(thresholds[e.name]), measure=measure or e.measure
            )
        if accuracies and e.name in accuracies:
            e = dataclasses.replace(e, accuracy=float(accuracies[e.name]))
        exits.append(e)
    return update_manifest(path, exits=exits)


# -------------------------------------------------------------------------------- helpers


def _write_torchscript(
    model: SplitExitNet,
    out: Path,
    input_shape: tuple[int, ...],
    measure: str,
    thresholds: Mapping[str, float],
) -> tuple[list[ExitSpec], int, tuple[int, int, int]]:
    """Trace and save every piece; returns (exit specs, number of classes, code shape)."""
    gen = torch.Generator().manual_seed(0)
    # trace on one batch size, check on another: a batch size baked into the graph fails
    x = torch.randn((2, *input_shape), generator=gen)
    x_check = torch.randn((3, *input_shape), generator=gen)
    (out / "head").mkdir()
    exits: list[ExitSpec] = []
    with torch.no_grad():
        # segments() and tail_module() build fresh nn.Sequential wrappers in training mode
        for i, (segment, exit_name) in enumerate(model.segments()):
            segment.eval()
            _trace_save(segment, x, x_check, out / segment_file(i), f"head segment {i}")
            x, x_check = segment(x), segment(x_check)
            if exit_name is not None:
                (out / "exits").mkdir(exist_ok=True)
                branch = model.exits[exit_name]
                _trace_save(branch, x, x_check, out / exit_file(exit_name), f"exit {exit_name!r}")
                exits.append(
                    ExitSpec(
                        name=exit_name,
                        segment=i,
                        measure=measure,
                        threshold=float(thresholds.get(exit_name, NEVER_EXIT)),
                    )
                )
        code_shape = tuple(int(s) for s in x.shape[1:])
        if code_shape != tuple(model.bottleneck.code_shape()) or code_shape[0] != (
            model.bottleneck.channels
        ):
            raise BundleError(f"the head's output {code_shape} is not the bottleneck's code shape")
        logits = _trace_save(model.tail_module().eval(), x, x_check, out / TAIL_FILE, "tail")
    if logits.dim() != 2:
        raise BundleError(f"the tail must output logits [N, K], got shape {tuple(logits.shape)}")
    return exits, int(logits.shape[1]), code_shape  # type: ignore[return-value]


def _write_onnx(
    model: SplitExitNet,
    out: Path,
    name: str,
    input_shape: tuple[int, ...],
    class_names: list[str],
) -> dict[str, Any]:
    """ONNX graphs into out/onnx, checked against the TorchScript pieces just written there."""
    from .load import _load_script
    from .onnx import export_onnx, onnx_parity

    export_onnx(
        model, out / "onnx", name=name, example_input_shape=input_shape, class_names=class_names
    )
    segments = [_load_script(out, segment_file(i), "cpu") for i in range(len(model.segments()))]
    exit_at = {
        i: (e, _load_script(out, exit_file(e), "cpu"))
        for i, (_, e) in enumerate(model.segments())
        if e is not None
    }
    tail = _load_script(out, TAIL_FILE, "cpu")
    return onnx_parity(segments, exit_at, tail, out / "onnx", input_shape)


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's entries sorted by name: name, dtype, shape, then the
    values' bytes (CPU, contiguous): the same weights give the same digest however saved."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _trace_save(
    module: nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path, what: str
) -> torch.Tensor:
    """Trace `module`, verify it against eager on `check`, save it; returns the eager output."""
    with quiet_torchscript(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the check below decides
        traced = torch.jit.trace(module, example, check_trace=False)
    want: torch.Tensor = module(check)
    got = traced(check)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=_TRACE_RTOL, atol=_TRACE_ATOL):
        err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise BundleError(
            f"the TorchScript trace of {what} disagrees with the eager module (max error "
            f"{err:.3g}, shapes {tuple(got.shape)} vs {tuple(want.shape)}): it likely has "
            "data-dependent control flow or a fixed batch size; make it traceable"
        )
    with quiet_torchscript():
        torch.jit.save(traced, str(path))
    return want


def _operating_points(
    points: Sequence[OperatingPoint | Mapping[str, Any]] | None, bottleneck: Bottleneck
) -> tuple[OperatingPoint, ...]:
    if points is None:
        return tuple(OperatingPoint(bottleneck.channels, b) for b in bottleneck.bits)
    out = []
    for p in points:
        op = p if isinstance(p, OperatingPoint) else _operating_point(p)
        if not 1 <= op.channels <= bottleneck.channels or op.bits not in bottleneck.bits:
            raise BundleError(
                f"operating point (k={op.channels}, bits={op.bits}) is outside the bottleneck "
                f"(k in 1..{bottleneck.channels}, bits in {list(bottleneck.bits)} of "
                f"{SUPPORTED_BITS})"
            )
        out.append(op)
    return tuple(out)


def _operating_point(p: Mapping[str, Any]) -> OperatingPoint:
    known = {f.name for f in dataclasses.fields(OperatingPoint)}
    unknown = sorted(p.keys() - known)
    if unknown or not {"channels", "bits"} <= p.keys():
        raise BundleError(
            f"operating point {dict(p)} must have keys channels, bits (accuracy, frame_bytes "
            f"optional); unknown: {unknown}"
        )

    def num(v: Any) -> float | None:
        return None if v is None else float(v)

    return OperatingPoint(
        channels=int(p["channels"]),
        bits=int(p["bits"]),
        accuracy=num(p.get("accuracy")),
        frame_bytes=num(p.get("frame_bytes")),
    )


def _preprocessing_dict(preprocessing: Any) -> dict[str, Any]:
    d = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing)
    try:
        from splitexit.preprocess import Preprocess
    except ImportError:  # pragma: no cover - preprocess ships with splitexit
        return d
    return Preprocess.from_dict(d).to_dict()  # validates (ConfigError) and normalises


def _hash_tree(root: Path) -> dict[str, str]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    return files


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise BundleError(f"{dest} exists and is not a directory; choose another bundle path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise BundleError(f"{dest} exists and is not empty; pass overwrite=True to replace it")


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move the finished bundle into place; an old one is swapped out, then removed."""
    _check_destination(dest, overwrite)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def _jsonable(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _version() -> str:
    try:
        return metadata.version("splitexit")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
