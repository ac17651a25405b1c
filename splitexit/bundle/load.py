"""Load a bundle: verify every file against the manifest, then load only the parts asked for.

    directory or .tar[.gz] ─ (safe extract) ─ manifest.json ─ validate
        ─ sha256 of every listed file == manifest? no unlisted files? fingerprint recomputes?
        ─ (trusted keys given) manifest.sig by one of them?
        ─ torch.jit.load the parts asked for ─► Bundle

Nothing here unpickles arbitrary objects: models are TorchScript (`torch.jit.load`) and the
state dict goes through `torch.load(weights_only=True)`. torch is imported only to load
TorchScript parts: `parts=()` verifies and reads a bundle without it (the ONNX runtime
backend opens the graphs itself).
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import zstandard

from splitexit.errors import BundleError, BundleHashMismatch

from .manifest import (
    MANIFEST_FILE,
    TAIL_FILE,
    WEIGHTS_FILE,
    Manifest,
    check_relative_path,
    exit_file,
    read_manifest,
    sha256_file,
)
from .sign import SIGNATURE_FILE, verify_signature

if TYPE_CHECKING:
    import torch

_Part = TypeVar("_Part")

PARTS = ("head", "exits", "tail")
MAX_ARCHIVE_BYTES = 8 * 2**30  # refuse archives that would extract to more than this
_DOC_SUFFIXES = (".md", ".txt")  # unlisted documentation files are tolerated, nothing else


class Bundle:
    """A loaded bundle: its manifest and the TorchScript parts that were asked for.

    Attributes: `path` (the bundle directory; a temporary one for archives, kept alive as
    long as this object), `manifest`, `fingerprint`, `device`; `segments`, `exits` and
    `tail` (raising BundleError if that part was not loaded); `preprocess`, `dictionary` and
    `state_dict()` load on first use.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        *,
        device: Any,
        segments: list[torch.jit.ScriptModule] | None = None,
        exits: OrderedDict[str, torch.jit.ScriptModule] | None = None,
        tail: torch.jit.ScriptModule | None = None,
        keepalive: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        self._segments = segments
        self._exits = exits
        self._tail = tail
        self._keepalive = keepalive  # a TemporaryDirectory for extracted archives
        self._preprocess: Any = None
        self._dictionary: zstandard.ZstdCompressionDict | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def segments(self) -> list[torch.jit.ScriptModule]:
        """Head segments, run in order; the last one outputs the code z."""
        return self._need(self._segments, "head")

    @property
    def exits(self) -> OrderedDict[str, torch.jit.ScriptModule]:
        """Exit branches by name, in the order the head reaches them."""
        return self._need(self._exits, "exits")

    @property
    def tail(self) -> torch.jit.ScriptModule:
        """Decoder + tail: zero-filled dequantized code [N, C, h, w] to logits [N, K]."""
        return self._need(self._tail, "tail")

    @property
    def preprocess(self) -> Any:
        """`splitexit.preprocess.Preprocess` built from the manifest's preprocessing."""
        if self._preprocess is None:
            from splitexit.preprocess import Preprocess

            self._preprocess = Preprocess.from_dict(self.manifest.preprocessing)
        return self._preprocess

    @property
    def dictionary(self) -> zstandard.ZstdCompressionDict | None:
        """The zstd dictionary frames are compressed with, or None."""
        name = self.manifest.codec.dictionary
        if name is not None and self._dictionary is None:
            self._dictionary = zstandard.ZstdCompressionDict((self.path / name).read_bytes())
        return self._dictionary

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full SplitExitNet state dict (weights only; loaded on each call)."""
        import torch

        weights: dict[str, torch.Tensor] = torch.load(
            self.path / WEIGHTS_FILE, map_location=self.device, weights_only=True
        )
        return weights

    def load_parts(self, parts: Iterable[str]) -> None:
        """Load TorchScript parts ("head", "exits", "tail") not loaded yet, on `device`."""
        parts = _check_parts(parts)
        if parts and isinstance(self.device, str):
            import torch

            self.device = torch.device(self.device)
        if "head" in parts and self._segments is None:
            self._segments = [
                _load_script(self.path, r, self.device) for r in self.manifest.segment_files
            ]
        if "exits" in parts and self._exits is None:
            self._exits = OrderedDict(
                (e.name, _load_script(self.path, exit_file(e.name), self.device))
                for e in self.manifest.exits
            )
        if "tail" in parts and self._tail is None:
            self._tail = _load_script(self.path, TAIL_FILE, self.device)

    def _need(self, value: _Part | None, part: str) -> _Part:
        if value is None:
            raise BundleError(
                f"bundle {self.manifest.name!r} was loaded without its {part!r} part; "
                f"load it with parts=(..., {part!r})"
            )
        return value

    def __repr__(self) -> str:
        loaded = [
            p for p, v in zip(PARTS, (self._segments, self._exits, self._tail), strict=True) if v
        ]
        return (
            f"Bundle({self.manifest.name!r}, fingerprint={self.fingerprint[:16]}, "
            f"parts={loaded}, path={str(self.path)!r})"
        )


def load_bundle(
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    parts: Iterable[str] = PARTS,
    device: str | torch.device = "cpu",
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
) -> Bundle:
    """Load a bundle directory or `.tar` / `.tar.gz` archive.

    Args:
        verify: check every file's sha256 and the fingerprint (always, unless you have just
            done so yourself); raises BundleHashMismatch / BundleError naming the file.
        parts: which TorchScript parts to load: any of "head", "exits", "tail". A device
            loads ("head", "exits"), a tail server ("tail",). All files are verified anyway.
        device: where the modules go (`map_location`).
        trusted_keys: ed25519 public keys (PEM files); when given, the bundle must be signed
            by one of them (`splitexit sign`, see `splitexit.bundle.sign`), and is verified.
    """
    parts = _check_parts(parts)
    src = Path(path)
    keepalive = None
    if src.is_file():
        keepalive, src = _extract(src)
    elif not src.is_dir():
        raise BundleError(f"bundle {src} does not exist")
    try:
        manifest = read_manifest(src)
    except BundleError as e:
        if str(src) in str(e):
            raise
        raise BundleError(f"bundle {src}: {e}; re-export or re-download it") from None
    if verify or trusted_keys:
        verify_files(src, manifest)
    if trusted_keys:
        verify_signature(src, trusted_keys)
    bundle = Bundle(src, manifest, device=device, keepalive=keepalive)
    bundle.load_parts(parts)
    try:
        bundle.preprocess  # noqa: B018 - checked now, not at the first input
    except ValueError as e:
        raise BundleError(f"bundle {src} has invalid preprocessing: {e}") from None
    return bundle


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"unknown bundle parts {bad}; choose from {PARTS}")
    return parts


def _load_script(root: Path, rel: str, device: Any) -> torch.jit.ScriptModule:
    import torch

    file = root / rel
    if not file.is_file():
        raise BundleError(f"{rel} is missing from bundle {root}; re-export or re-download it")
    try:
        with quiet_torchscript():
            module: torch.jit.ScriptModule = torch.jit.load(str(file), map_location=device)
            return module.eval()
    except Exception as e:  # torch says RuntimeError (PytorchStreamReader ...) and more
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise BundleError(
            f"{rel} in bundle {root} is not a loadable TorchScript module "
            f"({type(e).__name__}: {first}); the file is damaged or was written by another "
            "tool: re-export or re-download the bundle"
        ) from None


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's FutureWarning that TorchScript is deprecated (torch >= 2.10).

    Bundle format 1 stores TorchScript on purpose: it loads without Python model code on
    every torch a Jetson or a Raspberry Pi can install.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.*deprecated", FutureWarning)
        yield


def verify_files(root: str | os.PathLike[str], manifest: Manifest | None = None) -> Manifest:
    """Check a bundle directory against its manifest; returns the manifest.

    Raises BundleHashMismatch for a file whose sha256 differs or a fingerprint that does not
    recompute, BundleError for a missing, linked or unlisted file.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    fix = "the bundle was modified or corrupted; re-export or re-download it"
    for rel, expected in sorted(manifest.files.items()):
        file = root / rel
        if file.is_symlink():
            raise BundleError(f"{rel} in bundle {root} is a link; bundles hold plain files only")
        if not file.is_file():
            raise BundleError(f"{rel} is listed in {MANIFEST_FILE} but missing: {fix}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleHashMismatch(
                f"{rel}: sha256 is {actual}, but {MANIFEST_FILE} expects {expected}: {fix}"
            )
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if file.is_dir() or rel == MANIFEST_FILE or rel in manifest.files or _tolerated(rel):
            continue
        raise BundleError(
            f"{rel} is in bundle {root} but not listed in {MANIFEST_FILE}; a bundle lists "
            f"every file it holds: remove it, or re-export the bundle"
        )
    actual_fp = manifest.compute_fingerprint()
    if actual_fp != manifest.fingerprint:
        raise BundleHashMismatch(
            f"{MANIFEST_FILE} fingerprint {manifest.fingerprint} does not match {actual_fp}, "
            f"computed from the bundle's files and codec settings: {fix}"
        )
    return manifest


def _tolerated(rel: str) -> bool:
    name = PurePosixPath(rel).name
    in_root = "/" not in rel
    temp_manifest = name.startswith(f".{MANIFEST_FILE}.") and name.endswith(".tmp")
    signature = name == SIGNATURE_FILE  # signs the manifest, so it cannot be listed in it
    return in_root and (name.lower().endswith(_DOC_SUFFIXES) or temp_manifest or signature)


def _extract(archive: Path) -> tuple[tempfile.TemporaryDirectory[str], Path]:
    """Extract a tar archive safely into a temporary directory; returns (tmp, bundle root).

    Only regular files and directories with relative paths free of `..` are accepted; links,
    devices and absolute paths are refused before anything is written.
    """
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError as e:
        raise BundleError(f"cannot read bundle archive {archive}: {e}") from None
    if not is_tar:
        raise BundleError(f"{archive} is neither a bundle directory nor a tar archive")
    tmp = tempfile.TemporaryDirectory(prefix="splitexit-bundle-")
    root = Path(tmp.name)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tuple[str, tarfile.TarInfo]] = []
            seen: set[str] = set()
            total = 0
            for m in tar.getmembers():
                name = _member_name(m.name)
                if not (m.isfile() or m.isdir()):
                    raise BundleError(
                        f"archive {archive} holds {m.name!r}, which is not a regular file or "
                        "directory (links and devices are refused)"
                    )
                if name is None:  # the archive's "." entry
                    continue
                if m.isfile() and name in seen:
                    raise BundleError(f"archive {archive} holds {m.name!r} twice; refused")
                seen.add(name)
                members.append((name, m))
                total += m.size
            if total > MAX_ARCHIVE_BYTES:
                raise BundleError(f"archive {archive} would extract to {total} bytes; refused")
            for name, m in members:
                target = root / name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(target, "xb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
        return tmp, _bundle_root(root, archive)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # a truncated or damaged archive
        tmp.cleanup()
        raise BundleError(
            f"archive {archive} is damaged or truncated ({type(e).__name__}: {e}); "
            "re-download or re-pack it"
        ) from None
    except BaseException:
        tmp.cleanup()
        raise


def _member_name(name: str) -> str | None:
    """A member's safe relative path ("./a/b/" -> "a/b"), None for "."; refuses the rest."""
    stripped = name.rstrip("/")
    while stripped.startswith("./"):
        stripped = stripped[2:]
    if stripped in ("", "."):
        return None if name.startswith(".") else check_relative_path(name)
    return check_relative_path(stripped)


def _bundle_root(root: Path, archive: Path) -> Path:
    if (root / MANIFEST_FILE).is_file():
        return root
    tops = list(root.iterdir())
    if len(tops) == 1 and (tops[0] / MANIFEST_FILE).is_file():
        return tops[0]
    raise BundleError(
        f"archive {archive} has no {MANIFEST_FILE} at its top level or in a single top "
        "directory: it is not a splitexit bundle"
    )
