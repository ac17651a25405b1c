"""The distribution installs every package of the tree, under import names that cannot
collide: `server/` and `device/` as `splitexit_server` / `splitexit_device`."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_in_the_tree_is_listed() -> None:
    """A new subpackage left out of `packages` would be missing from every install."""
    dirs = {"splitexit_server": ROOT / "server", "splitexit_device": ROOT / "device"}
    dirs.update(
        {
            ".".join(p.parent.relative_to(ROOT).parts): p.parent
            for p in (ROOT / "splitexit").rglob("__init__.py")
        }
    )
    nested = {
        f"{name}.{'.'.join(p.parent.relative_to(root).parts)}"
        for name, root in (
            ("splitexit_server", ROOT / "server"),
            ("splitexit_device", ROOT / "device"),
        )
        for p in root.rglob("*/__init__.py")
    }
    data_only = {
        "splitexit.configs"
    }  # the shipped configs: listed so that setuptools ships them quietly
    assert set(_setuptools()["packages"]) == set(dirs) | nested | data_only


def test_import_names_map_to_the_top_level_folders() -> None:
    cfg = _setuptools()
    assert cfg["package-dir"] == {"splitexit_server": "server", "splitexit_device": "device"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["splitexit-server"] == "splitexit_server.cli:main"
    assert scripts["splitexit-device"] == "splitexit_device.cli:main"
