"""The bundle manifest: typed dataclasses, JSON (de)serialisation, validation, fingerprint.

    Manifest ─ to_dict ─ json ─► manifest.json ─ json ─ Manifest.from_dict (validates) ─► Manifest

`manifest.json` describes everything a device or a server needs to run its half of the
model and to agree with the other half: the bottleneck's shape, the operating points
(channels k, bits), the exits and their thresholds, preprocessing, class names, the codec
settings, and the sha256 of every other file in the bundle.

The **fingerprint** ties a frame to the weights that made it and the settings that decode it:

    sha256( "weights <weights_digest>\\n"
            + canonical JSON of {"exits": [[name, segment], ...], "segments"}
            + canonical JSON of {"bits", "channels", "code_shape", "dictionary_sha256",
                                 "zstd_level"} )

`weights_digest` hashes the tensors of the state_dict (name, dtype, shape, values), not the
bytes of any file, so re-exporting the same weights keeps the fingerprint even though the
TorchScript files differ. (Bundles written before `weights_digest` existed hash the
head/exit/tail files instead, "<path> <sha256>\\n" each; they load unchanged.)
Thresholds, accuracies, metrics and provenance are not part of it, so re-calibrating a
bundle keeps its fingerprint (and the frames of deployed devices stay valid).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from splitexit.bottleneck.quantize import SUPPORTED_BITS
from splitexit.confidence import CONFIDENCE_MEASURES
from splitexit.errors import BundleError

FORMAT = "splitexit-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
NEVER_EXIT = 1.01  # threshold placeholder above any confidence: calibrate to enable an exit
HEAD_DIR = "head"
EXITS_DIR = "exits"
TAIL_FILE = "tail.pt"
WEIGHTS_FILE = "weights.pt"
DICTIONARY_FILE = "codec/dictionary.zstd"
ONNX_DIR = "onnx"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def segment_file(index: int) -> str:
    """Relative path of head segment `index`."""
    return f"{HEAD_DIR}/segment_{index}.pt"


def exit_file(name: str) -> str:
    """Relative path of the exit branch `name`."""
    return f"{EXITS_DIR}/{name}.pt"


def onnx_graph_files(manifest: Manifest) -> dict[str, str]:
    """The ONNX graphs a bundle exported with ONNX holds, by piece ("segment_<i>",
    "exit_<name>", "tail"), as relative paths (whether or not this bundle has them)."""
    files = {
        f"segment_{i}": f"{ONNX_DIR}/{HEAD_DIR}/segment_{i}.onnx" for i in range(manifest.segments)
    }
    files |= {f"exit_{e.name}": f"{ONNX_DIR}/{EXITS_DIR}/{e.name}.onnx" for e in manifest.exits}
    files["tail"] = f"{ONNX_DIR}/tail.onnx"
    return files


@dataclass(frozen=True)
class BottleneckSpec:
    """Shape of the code: C channels [C, h, w], the split-point feature shape, the bit-widths."""

    channels: int
    code_shape: tuple[int, int, int]
    feature_shape: tuple[int, int, int]
    bits: tuple[int, ...]


@dataclass(frozen=True)
class OperatingPoint:
    """One (k channels, bits) setting a device may send, with what it was measured to give.

    The one operating-point type: the manifest lists them, calibration tables index by
    them, the device's policy chooses among them (with `frame_bytes` its running mean).
    """

    channels: int
    bits: int
    accuracy: float | None = None
    frame_bytes: float | None = None  # mean frame size, header included

    @property
    def key(self) -> tuple[int, int]:
        """(channels, bits): what identifies the point."""
        return self.channels, self.bits

    @property
    def label(self) -> str:
        return f"k={self.channels},bits={self.bits}"


@dataclass(frozen=True)
class ExitSpec:
    """An early exit read after head segment `segment`; taken when confidence >= threshold."""

    name: str
    segment: int
    measure: str = "max_prob"
    threshold: float = NEVER_EXIT
    accuracy: float | None = None


@dataclass(frozen=True)
class CodecSpec:
    """Frame codec settings: zstd level and the optional dictionary file (relative path)."""

    zstd_level: int = 3
    dictionary: str | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` holds. Build with `Manifest.from_dict` to get validation."""

    name: str
    architecture: dict[str, Any]
    fingerprint: str
    split_point: str
    input_shape: tuple[int, ...]
    segments: int
    bottleneck: BottleneckSpec
    operating_points: tuple[OperatingPoint, ...]
    exits: tuple[ExitSpec, ...]
    preprocessing: dict[str, Any]
    class_names: tuple[str, ...]
    codec: CodecSpec
    files: dict[str, str]
    teacher_accuracy: float | None = None
    created: str = ""
    splitexit_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    # what it was trained and calibrated on: dataset, roots, class names, input shape, seed,
    # split sizes, file-list hashes, the run's config (how to rebuild the model)
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_digest: str = ""  # sha256 of the state_dict's tensors (see the module docstring)
    # ONNX graphs beside the TorchScript (optional): opset, the onnxruntime they were checked
    # with, and their parity with the TorchScript pieces on sample inputs (see bundle/onnx.py)
    onnx: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # ----------------------------------------------------------------------------- access

    @property
    def exit_names(self) -> list[str]:
        return [e.name for e in self.exits]

    def exit(self, name: str) -> ExitSpec:
        for e in self.exits:
            if e.name == name:
                return e
        raise BundleError(f"bundle {self.name!r} has no exit {name!r}; exits: {self.exit_names}")

    @property
    def has_onnx(self) -> bool:
        """Whether the bundle lists an ONNX graph for every head segment, exit and the tail."""
        return all(rel in self.files for rel in onnx_graph_files(self).values())

    @property
    def thresholds(self) -> dict[str, float]:
        return {e.name: e.threshold for e in self.exits}

    @property
    def segment_files(self) -> list[str]:
        return [segment_file(i) for i in range(self.segments)]

    @property
    def model_files(self) -> list[str]:
        """The TorchScript files the fingerprint covers: head segments, exits, tail."""
        return sorted([*self.segment_files, *(exit_file(e.name) for e in self.exits), TAIL_FILE])

    def codec_settings(self) -> dict[str, Any]:
        """What a frame decoder must agree on (part of the fingerprint)."""
        dictionary = self.codec.dictionary
        return {
            "bits": list(self.bottleneck.bits),
            "channels": self.bottleneck.channels,
            "code_shape": list(self.bottleneck.code_shape),
            "dictionary_sha256": None if dictionary is None else self.files.get(dictionary),
            "zstd_level": self.codec.zstd_level,
        }

    def compute_fingerprint(self) -> str:
        """The fingerprint implied by the weights and the codec settings (module docstring)."""
        if self.weights_digest:
            h = hashlib.sha256(f"weights {self.weights_digest}\n".encode())
            layout = {"segments": self.segments, "exits": [[e.name, e.segment] for e in self.exits]}
            h.update(canonical_json(layout).encode())
            h.update(canonical_json(self.codec_settings()).encode())
            return h.hexdigest()
        return compute_fingerprint(self.files, self.model_files, self.codec_settings())

    # ------------------------------------------------------------------------------- json

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        first = ["format", "format_version", "name", "fingerprint", "created", "splitexit_version"]
        last = ["metrics", "provenance", "onnx", "files"]
        head = {k: d.pop(k) for k in first}
        tail = {k: d.pop(k) for k in last}
        return {**head, **d, **tail}

    def to_json(self) -> str:
        return _dumps(_plain(self.to_dict())) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """Parse and validate; raises BundleError naming the offending field.

        Unknown keys are ignored (a newer minor version may add some); a newer major
        `format_version` is refused.
        """
        if not isinstance(d, Mapping):
            raise BundleError(f"{MANIFEST_FILE} must hold a JSON object, got {type(d).__name__}")
        _check_format(d)
        try:
            manifest = _parse(d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise BundleError(f"malformed {MANIFEST_FILE}: {what}") from e
        manifest.validate()
        return manifest

    # ------------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Check internal consistency (not the files on disk); raises BundleError."""
        problems = list(_problems(self))
        if problems:
            raise BundleError(f"invalid {MANIFEST_FILE}: " + "; ".join(problems))


def compute_fingerprint(
    files: Mapping[str, str], model_files: list[str], codec_settings: Mapping[str, Any]
) -> str:
    h = hashlib.sha256()
    for path in sorted(model_files):
        if path not in files:
            raise BundleError(f"{MANIFEST_FILE} does not list the model file {path}")
        h.update(f"{path} {files[path]}\n".encode())
    h.update(canonical_json(codec_settings).encode())
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def check_relative_path(path: str) -> str:
    """A bundle-relative POSIX path with no absolute part, no `..`, no empty parts."""
    p = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise BundleError(f"unsafe path {path!r} in a bundle: paths must be relative, without '..'")
    return path


# ---------------------------------------------------------------------------------- parsing


def _check_format(d: Mapping[str, Any]) -> None:
    if d.get("format") != FORMAT:
        raise BundleError(
            f"{MANIFEST_FILE} has format {d.get('format')!r}, expected {FORMAT!r}: "
            "this is not a splitexit bundle"
        )
    version = d.get("format_version")
    major: Any = version.split(".")[0] if isinstance(version, str) else version  # int() decides
    try:
        major = int(major)
    except (TypeError, ValueError):
        raise BundleError(f"format_version must be an integer, got {version!r}") from None
    if major != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is not supported: this splitexit reads version "
            f"{FORMAT_VERSION}; "
            + (
                "upgrade splitexit to load it"
                if major > FORMAT_VERSION
                else "re-export the bundle with this splitexit"
            )
        )


def _parse(d: Mapping[str, Any]) -> Manifest:
    b = d["bottleneck"]
    codec = d.get("codec") or {}
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        name=_str(d["name"], "name"),
        architecture=_dict(d.get("architecture", {}), "architecture"),
        fingerprint=_str(d["fingerprint"], "fingerprint"),
        split_point=_str(d["split_point"], "split_point"),
        input_shape=_ints(d["input_shape"], "input_shape"),
        segments=_int(d["segments"], "segments"),
        bottleneck=BottleneckSpec(
            channels=_int(b["channels"], "bottleneck.channels"),
            code_shape=_ints(b["code_shape"], "bottleneck.code_shape", 3),  # type: ignore[arg-type]
            feature_shape=_ints(b["feature_shape"], "bottleneck.feature_shape", 3),  # type: ignore[arg-type]
            bits=_ints(b["bits"], "bottleneck.bits"),
        ),
        operating_points=tuple(
            OperatingPoint(
                channels=_int(p["channels"], "operating_points[].channels"),
                bits=_int(p["bits"], "operating_points[].bits"),
                accuracy=_opt_float(p.get("accuracy"), "operating_points[].accuracy"),
                frame_bytes=_opt_float(p.get("frame_bytes"), "operating_points[].frame_bytes"),
            )
            for p in d.get("operating_points", [])
        ),
        exits=tuple(
            ExitSpec(
                name=_str(e["name"], "exits[].name"),
                segment=_int(e["segment"], "exits[].segment"),
                measure=_str(e.get("measure", "max_prob"), "exits[].measure"),
                threshold=_float(e.get("threshold", NEVER_EXIT), "exits[].threshold"),
                accuracy=_opt_float(e.get("accuracy"), "exits[].accuracy"),
            )
            for e in d.get("exits", [])
        ),
        teacher_accuracy=_opt_float(d.get("teacher_accuracy"), "teacher_accuracy"),
        preprocessing=_dict(d["preprocessing"], "preprocessing"),
        class_names=tuple(_str(c, "class_names[]") for c in d["class_names"]),
        codec=CodecSpec(
            zstd_level=_int(codec.get("zstd_level", 3), "codec.zstd_level"),
            dictionary=None
            if codec.get("dictionary") is None
            else _str(codec["dictionary"], "codec.dictionary"),
        ),
        created=_str(d.get("created", ""), "created"),
        splitexit_version=_str(d.get("splitexit_version", ""), "splitexit_version"),
        metrics=_dict(d.get("metrics") or {}, "metrics"),
        provenance=_dict(d.get("provenance") or {}, "provenance"),
        weights_digest=_str(d.get("weights_digest", ""), "weights_digest"),
        onnx=_dict(d.get("onnx") or {}, "onnx"),
        files={_str(k, "files key"): _str(v, f"files[{k!r}]") for k, v in d["files"].items()},
    )


def _problems(m: Manifest) -> Iterator[str]:
    b = m.bottleneck
    if not _SHA256.fullmatch(m.fingerprint):
        yield f"fingerprint must be 64 lowercase hex characters, got {m.fingerprint!r}"
    if m.weights_digest and not _SHA256.fullmatch(m.weights_digest):
        yield f"weights_digest must be 64 lowercase hex characters, got {m.weights_digest!r}"
    if b.channels < 1 or b.code_shape[0] != b.channels:
        yield f"bottleneck code_shape {list(b.code_shape)} must start with channels {b.channels}"
    if not b.bits or any(bits not in SUPPORTED_BITS for bits in b.bits):
        yield f"bottleneck bits {list(b.bits)} must be a non-empty subset of {SUPPORTED_BITS}"
    if m.segments < 1:
        yield f"segments must be >= 1, got {m.segments}"
    for p in m.operating_points:
        if not 1 <= p.channels <= b.channels or p.bits not in b.bits:
            yield (
                f"operating point (k={p.channels}, bits={p.bits}) is outside the bottleneck "
                f"(k in 1..{b.channels}, bits in {list(b.bits)})"
            )
    accuracies = [(f"operating point (k={p.channels}, bits={p.bits})", p.accuracy)
                  for p in m.operating_points]  # fmt: skip
    accuracies += [(f"exit {e.name!r}", e.accuracy) for e in m.exits]
    accuracies.append(("teacher", m.teacher_accuracy))
    for what, accuracy in accuracies:
        if accuracy is not None and not 0 <= accuracy <= 1:  # NaN included
            yield f"{what} accuracy must be a fraction in [0, 1] or null, got {accuracy}"
    names = [e.name for e in m.exits]
    if len(set(names)) != len(names):
        yield f"exit names must be unique, got {names}"
    for e in m.exits:
        if not e.name or "/" in e.name or e.name.startswith("."):
            yield f"exit name {e.name!r} is not a valid file name"
        if not 0 <= e.segment < m.segments:
            yield f"exit {e.name!r} reads segment {e.segment}, outside 0..{m.segments - 1}"
        if e.measure not in CONFIDENCE_MEASURES:
            yield f"exit {e.name!r} has unknown measure {e.measure!r}; use {CONFIDENCE_MEASURES}"
        if not math.isfinite(e.threshold):
            yield f"exit {e.name!r} threshold must be finite, got {e.threshold}"
    if [e.segment for e in m.exits] != sorted(e.segment for e in m.exits):
        yield "exits must be listed in the order the head reaches them"
    for path, digest in m.files.items():
        try:
            check_relative_path(path)
        except BundleError as err:
            yield str(err)
        if path == MANIFEST_FILE:
            yield f"files must not list {MANIFEST_FILE} itself"
        if not _SHA256.fullmatch(digest):
            yield f"files[{path!r}] must be a sha256 hex digest, got {digest!r}"
    required = [*m.model_files, WEIGHTS_FILE]
    if m.codec.dictionary is not None:
        required.append(m.codec.dictionary)
    missing = [p for p in required if p not in m.files]
    if missing:
        yield f"files does not list {missing}"


# ----------------------------------------------------------------------------- field types


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise BundleError(f"{name} must be a string, got {v!r}")
    return v


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BundleError(f"{name} must be an integer, got {v!r}")
    return v


def _ints(v: Any, name: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or (length is not None and len(v) != length):
        raise BundleError(f"{name} must be a list of {length or 'some'} integers, got {v!r}")
    return tuple(_int(x, name) for x in v)


def _float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BundleError(f"{name} must be a number, got {v!r}")
    return float(v)


def _opt_float(v: Any, name: str) -> float | None:
    return None if v is None else _float(v, name)


def _dict(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise BundleError(f"{name} must be a JSON object, got {v!r}")
    return dict(v)


def _dumps(obj: Any, indent: str = "") -> str:
    """JSON with 2-space indentation, short lists of scalars kept on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and obj:
        flat = json.dumps(obj)
        if len(flat) <= 80 and not any(isinstance(v, dict | list) for v in obj):
            return flat
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj)


def _plain(obj: Any) -> Any:
    """Tuples to lists and numpy / torch values to Python ones, recursively (for json)."""
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return _plain(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------- I/O


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Parse and validate `<bundle_dir>/manifest.json` (files on disk are not checked)."""
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"{path} not found: {bundle_dir} is not a splitexit bundle (export one with "
            "splitexit.bundle.export_bundle)"
        ) from None
    return Manifest.from_json(text)


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write `manifest.json` atomically (temp file + rename): readers see old or new, whole."""
    manifest.validate()
    path = Path(bundle_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
