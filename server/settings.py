"""Typed server settings: defaults < `SPLITEXIT_SERVER_*` environment variables < CLI flags.

Every field is one setting; its metadata holds the parser that reads it from text and the help
text the CLI shows, so the flags, the environment variables and `--help` never drift apart.
`Settings.from_env()` reads the environment, `Settings.replace(**changes)` applies overrides,
and both validate. A renamed setting keeps its old name as a deprecated alias (`RENAMED`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitexit.errors import ConfigError
from splitexit.runtime.backends import RuntimeOptions

ENV_PREFIX = "SPLITEXIT_SERVER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
HTTP_PARSERS = ("auto", "httptools", "h11")
RENAMED = {"torch_threads": "threads"}  # old name -> new name; the old one still works, warns


@dataclass(frozen=True)
class Parser:
    """How a setting is read from text (environment variable or flag): `kind` is its type as
    error messages name it, `type` the field's annotation, `parse` the conversion."""

    kind: str
    type: Any
    parse: Callable[[str], Any]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _paths(text: str) -> tuple[Path, ...]:
    parts = text.replace(",", os.pathsep).split(os.pathsep)
    return tuple(Path(p.strip()) for p in parts if p.strip())


TEXT = Parser("str", str, str)
OPTIONAL_TEXT = Parser("str | None", str | None, str)
INT = Parser("int", int, int)
OPTIONAL_INT = Parser("int | None", int | None, int)
FLOAT = Parser("float", float, float)
BOOL = Parser("bool", bool, _bool)
PATHS = Parser("tuple[Path, ...]", tuple[Path, ...], _paths)


def _setting(parser: Parser, default: Any, help: str, *, secret: bool = False) -> Any:
    meta = {"parser": parser, "help": help, "secret": secret}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """What the tail server serves and how it protects itself. Safe defaults throughout."""

    bundles: tuple[Path, ...] = _setting(
        PATHS, (), "bundle directory or .tar[.gz] to serve (repeat for several models)"
    )
    trusted_keys: tuple[Path, ...] = _setting(
        PATHS,
        (),
        "ed25519 public key (PEM) one of which must have signed each bundle (splitexit sign); "
        "repeat for several; none: signatures are not required",
    )
    host: str = _setting(TEXT, "127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = _setting(INT, 8000, "TCP port to listen on")
    max_batch_size: int = _setting(
        INT, 32, "most samples run in one tail call; also the most samples one request may carry"
    )
    max_queue_delay_ms: float = _setting(
        FLOAT,
        2.0,
        "longest a request waits for others to fill its batch (0: no waiting; none either while "
        "such waits keep gathering nobody, as with one client)",
    )
    max_queue_size: int = _setting(
        INT, 256, "requests waiting per model before new ones get 429 + Retry-After"
    )
    queue_delay_target_ms: float = _setting(
        FLOAT,
        50.0,
        "longest a request should wait for its batch: one predicted to wait longer gets 429 "
        "at once, one that waited longer is dropped uncomputed (429)",
    )
    max_body_bytes: int = _setting(
        INT, 8 * 2**20, "largest request body accepted, checked on Content-Length and while reading"
    )
    request_timeout_s: float = _setting(
        FLOAT, 10.0, "server-side deadline of a request, body read to answer (504 when passed)"
    )
    client_timeout_s: float = _setting(
        FLOAT,
        5.0,
        "longest a request's header, or its body, may take to arrive (408 and the connection "
        "closed when passed: a client that stops short or stalls)",
    )
    retry_after_s: int = _setting(INT, 1, "seconds a 429 or 503 answer asks the client to wait")
    http_parser: str = _setting(
        TEXT,
        "auto",
        "HTTP/1.1 parser: httptools (C, the server extra), h11, or auto (httptools if installed)",
    )
    auth_token: str | None = _setting(
        OPTIONAL_TEXT,
        None,
        "bearer token inference and metadata require (health and /metrics stay open); "
        "prefer the environment variable or --auth-token-file to a flag",
        secret=True,
    )
    stream_window: int = _setting(
        INT, 64, "stream messages in flight per connection (1..256); more are answered 'busy'"
    )
    workers_per_model: int = _setting(INT, 1, "threads running batches per model")
    runtime: str = _setting(
        TEXT,
        "auto",
        "what runs the models: torch (TorchScript), onnxruntime (the bundle's ONNX graphs), or "
        "auto: onnxruntime when installed and the bundle has ONNX graphs, else torch",
    )
    providers: str = _setting(
        TEXT,
        "cpu",
        "onnxruntime execution providers in order, comma-separated: cpu, cuda, tensorrt",
    )
    threads: int | None = _setting(
        OPTIONAL_INT,
        None,
        "intra-op threads of the runtime (torch: process-wide; onnxruntime: per session)",
    )
    device: str = _setting(TEXT, "cpu", "torch device for the tails, e.g. cpu or cuda")
    images: bool = _setting(
        BOOL, True, "accept the `image` input (PNG/JPEG, whole model on the server): the baseline"
    )
    max_image_pixels: int = _setting(INT, 2048 * 2048, "largest decoded image, in pixels")
    warmup: bool = _setting(BOOL, True, "run real inferences at every operating point before ready")
    drain_s: float = _setting(
        FLOAT, 0.0, "on SIGTERM, answer 503 (not ready) this long before closing the listener"
    )
    graceful_timeout_s: float = _setting(
        FLOAT, 30.0, "after closing the listener, how long in-flight requests may take to finish"
    )
    log_level: str = _setting(TEXT, "info", f"log level: {', '.join(LOG_LEVELS)}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundles", tuple(Path(b) for b in self.bundles))
        object.__setattr__(self, "trusted_keys", tuple(Path(k) for k in self.trusted_keys))
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out = []
        positive = ("max_batch_size", "max_queue_size", "max_body_bytes", "workers_per_model")
        for name in (*positive, "retry_after_s", "max_image_pixels"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "drain_s", "graceful_timeout_s"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "client_timeout_s", "queue_delay_target_ms"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            out.append(f"port must be in 0..65535, got {self.port}")
        if not 1 <= self.stream_window <= 256:
            out.append(f"stream_window must be in 1..256, got {self.stream_window}")
        if self.queue_delay_target_ms <= self.max_queue_delay_ms:
            out.append(
                f"queue_delay_target_ms ({self.queue_delay_target_ms:g}) must exceed "
                f"max_queue_delay_ms ({self.max_queue_delay_ms:g}): a request waiting for its "
                "batch to fill would be dropped as late"
            )
        if self.http_parser not in HTTP_PARSERS:
            out.append(f"http_parser must be one of {HTTP_PARSERS}, got {self.http_parser!r}")
        if self.http_parser == "httptools" and importlib.util.find_spec("httptools") is None:
            out.append("http_parser httptools is not installed: pip install 'splitexit[server]'")
        try:
            self.runtime_options()
        except ValueError as e:
            out.append(str(e))
        if self.log_level not in LOG_LEVELS:
            out.append(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.auth_token is not None and not self.auth_token.strip():
            out.append("auth_token is empty; unset it to disable auth")
        return out

    def runtime_options(self) -> RuntimeOptions:
        """The runtime, providers and threads the models run with."""
        providers = tuple(p.strip() for p in self.providers.split(",") if p.strip())
        return RuntimeOptions(self.runtime, providers or ("cpu",), self.threads)

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def queue_delay_target_s(self) -> float:
        return self.queue_delay_target_ms / 1000.0

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (None values are ignored) and validated."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Defaults, then `SPLITEXIT_SERVER_<FIELD>` variables, then `overrides` (text values
        are parsed like the variables: `serve run ... key=value` arguments, flags).

        Lists (`SPLITEXIT_SERVER_BUNDLES`) are separated by the OS path separator (':' on
        Linux) or commas; booleans accept 1/0, true/false, yes/no, on/off.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in (*RENAMED, *(f.name for f in dataclasses.fields(cls))):
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip() != "":
                values[_current_name(name)] = parse_value(name, raw)
        for name, value in overrides.items():
            parser_of(name)  # an unknown name is a ConfigError, not a TypeError
            if value is not None:
                text = isinstance(value, str)
                values[_current_name(name)] = parse_value(name, value) if text else value
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values, secrets masked (for logs)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("secret") and v is not None:
                v = "***"
            elif f.name in ("bundles", "trusted_keys"):
                v = [str(p) for p in v]
            out[f.name] = v
        return out


_warned: set[str] = set()


def _current_name(name: str) -> str:
    """`name`, or what a renamed setting is called now (warning once per process)."""
    new = RENAMED.get(name)
    if new is None:
        return name
    if name not in _warned:
        _warned.add(name)
        old_flag, new_flag = (f"--{n.replace('_', '-')}" for n in (name, new))
        warnings.warn(
            f"the server setting {name} ({old_flag}, {ENV_PREFIX}{name.upper()}) is deprecated: "
            f"use {new} ({new_flag}, {ENV_PREFIX}{new.upper()})",
            FutureWarning,
            stacklevel=3,
        )
    return new


def parser_of(name: str) -> Parser:
    """The parser of setting `name` (a renamed setting's old name too)."""
    for f in dataclasses.fields(Settings):
        if f.name == RENAMED.get(name, name):
            parser: Parser = f.metadata["parser"]
            return parser
    raise ConfigError(f"no server setting is called {name!r}")


def parse_value(name: str, raw: str) -> Any:
    """Parse one setting from its string form (environment variable or CLI flag)."""
    parser = parser_of(name)
    try:
        return parser.parse(raw.strip())
    except ValueError as e:
        raise ConfigError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {parser.kind}: {e}"
        ) from e
