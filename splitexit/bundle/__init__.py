"""Bundles: the versioned, hash-checked directory a trained model ships in.

    SplitExitNet ─ export_bundle ─► bundle/ (manifest.json, head/, exits/, tail.pt, weights.pt)
    bundle/ or .tar[.gz] ─ load_bundle (verifies every sha256 and the fingerprint) ─► Bundle

`write_thresholds` / `update_manifest` let calibration edit the manifest without changing
the fingerprint; `format_manifest` renders it for people; `splitexit.bundle.onnx` exports
ONNX graphs and a Triton model (optional `export` extra).

Loading and verifying need no torch (a device running ONNX has none); the exporters are
imported on first use.
"""

from typing import Any

from .inspect import format_manifest
from .load import PARTS, Bundle, load_bundle, verify_files
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    NEVER_EXIT,
    BottleneckSpec,
    CodecSpec,
    ExitSpec,
    Manifest,
    OperatingPoint,
    read_manifest,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NEVER_EXIT",
    "PARTS",
    "BottleneckSpec",
    "Bundle",
    "CodecSpec",
    "ExitSpec",
    "Manifest",
    "OperatingPoint",
    "archive_bundle",
    "export_bundle",
    "format_manifest",
    "load_bundle",
    "read_manifest",
    "update_manifest",
    "verify_files",
    "write_thresholds",
]

_EXPORTERS = ("archive_bundle", "export_bundle", "update_manifest", "write_thresholds")


def __getattr__(name: str) -> Any:
    if name in _EXPORTERS:
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
