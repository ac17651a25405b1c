"""The exceptions splitexit raises, one small hierarchy.

Every message says what is wrong and, where it can, what to do about it.

    SplitexitError
    ├── FrameError                 a frame that fails to decode or validate
    │   └── FingerprintMismatch    a frame from a head with another fingerprint (HTTP 409)
    ├── BundleError                a bundle that is missing, malformed or tampered with
    │   └── BundleHashMismatch     a file whose sha256 differs from the manifest
    ├── SplitPointError            a split or exit point the model does not have
    ├── DatasetError               data that cannot be found or read
    ├── ConfigError                an experiment config that does not validate
    └── RuntimeUnavailable         a runtime backend or execution provider that is not here
"""

from __future__ import annotations


class SplitexitError(Exception):
    """Base class of every error splitexit raises on purpose."""


class FrameError(SplitexitError, ValueError):
    """A frame failed to decode: bad magic, version, field, size, checksum or payload."""


class FingerprintMismatch(FrameError):
    """A frame was produced by a head whose fingerprint is not the expected one."""

    def __init__(self, got: str, expected: str | list[str]) -> None:
        self.got = got
        self.expected = expected
        want = ", ".join(expected) if isinstance(expected, list) else expected
        super().__init__(
            f"frame fingerprint {got} does not match the model's fingerprint {want}; "
            "the device and the server run different bundles: deploy the same bundle to both"
        )


class BundleError(SplitexitError):
    """A bundle is missing files, has a malformed manifest, or cannot be loaded."""


class BundleHashMismatch(BundleError):
    """A bundle file's sha256 does not match the one recorded in its manifest."""


class SplitPointError(SplitexitError, KeyError):
    """A split or exit point was asked for that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetError(SplitexitError):
    """A dataset cannot be found, downloaded or parsed."""


class ConfigError(SplitexitError, ValueError):
    """An experiment configuration is invalid."""


class RuntimeUnavailable(SplitexitError):
    """The runtime asked for (torch, onnxruntime, an execution provider) cannot run here."""
