"""Bundles that ship with splitexit, trained and ready to deploy.

`fmnist-small/` is the small track's bundle (`splitexit train fmnist-small`, then
`splitexit calibrate` with the conservative accuracy goal): the demo, the notebooks and the
agent/server tests use it without training first.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError

ZOO = Path(__file__).parent
DEFAULT_BUNDLE = "fmnist-small"


def default_bundle_path(name: str = DEFAULT_BUNDLE) -> Path:
    """Path of a shipped bundle; a clear error if it is not there."""
    path = ZOO / name
    if not (path / "manifest.json").exists():
        shipped = sorted(p.name for p in ZOO.iterdir() if (p / "manifest.json").exists())
        raise BundleError(
            f"no shipped bundle {name!r} in {ZOO} (shipped: {shipped or 'none'}); "
            "train one with `splitexit train fmnist-small`"
        )
    return path
