"""The `splitexit-server` command: serve bundles' tails over the Open Inference Protocol.

Flags are generated from `splitexit_server.settings.Settings`, so each has an environment variable
(`SPLITEXIT_SERVER_<NAME>`) with the same meaning; a flag beats the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import logging.config
import sys
import warnings
from pathlib import Path

from splitexit.errors import SplitexitError
from splitexit_server.settings import BOOL, ENV_PREFIX, RENAMED, Settings

log = logging.getLogger("splitexit_server.cli")

EPILOG = f"""\
Every flag can also be set with an environment variable {ENV_PREFIX}<FLAG>, e.g.
{ENV_PREFIX}MAX_BATCH_SIZE=64 or {ENV_PREFIX}BUNDLES=/models/a:/models/b; flags win.
The bearer token is read from {ENV_PREFIX}AUTH_TOKEN or --auth-token-file (never a flag).

Endpoints (Open Inference Protocol / KServe v2, Triton's binary-data extension):
  POST /v2/models/NAME/infer   input "frame" (BYTES) -> outputs "class", "probability",
                               and "logits" if asked; input "image" runs the whole model
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME/ready, /v2, /v2/models/NAME
  GET  /metrics                Prometheus
Status codes: 400 bad input, 401 auth, 404 no such model, 408 header or body too slow,
409 fingerprint mismatch, 413 too large, 415 bad media type, 429 overloaded (Retry-After),
503 not ready / draining, 504 deadline passed (see README, "The server under load").

Examples:
  splitexit-server --bundle bundles/fmnist-small
  splitexit-server --bundle a/ --bundle b.tar.gz --host 0.0.0.0 --max-batch-size 64
  splitexit-server --bundle a/ --check     # verify the bundles and exit
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitexit-server",
        description=(
            "Serve the tails of splitexit bundles: devices send bottleneck frames, the server "
            "batches them dynamically and answers with the class."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        help_text = f.metadata["help"]
        if f.name == "bundles":
            parser.add_argument(
                "--bundle", dest="bundles", action="append", metavar="PATH", help=help_text
            )
        elif f.name == "trusted_keys":
            parser.add_argument(
                "--trusted-key", dest="trusted_keys", action="append", metavar="PEM", help=help_text
            )
        elif f.name == "auth_token":
            parser.add_argument(
                "--auth-token-file",
                metavar="PATH",
                help=f"file holding the bearer token (or set {ENV_PREFIX}AUTH_TOKEN)",
            )
        elif f.metadata["parser"] is BOOL:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {getattr(defaults, f.name)})",
            )
        else:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                metavar=f.name.split("_")[-1].upper(),
                default=None,
                help=f"{help_text} (default: {getattr(defaults, f.name)})",
            )
    for old, new in RENAMED.items():
        parser.add_argument(
            "--" + old.replace("_", "-"),
            metavar=new.split("_")[-1].upper(),
            default=None,
            help=f"deprecated name of --{new.replace('_', '-')}",
        )
    parser.add_argument(
        "--check", action="store_true", help="load and verify the bundles, print them, exit"
    )
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Defaults < environment < flags."""
    overrides: dict[str, object] = {}
    for name in (*(f.name for f in dataclasses.fields(Settings)), *RENAMED):
        value = getattr(args, name, None)
        if value is None or name == "auth_token":
            continue
        if name in ("bundles", "trusted_keys"):
            overrides[name] = tuple(Path(p) for p in value)
        else:
            overrides[name] = value  # text: parsed by Settings.from_env
    if args.auth_token_file:
        try:
            token = Path(args.auth_token_file).read_text().strip()
        except OSError as e:
            raise SplitexitError(f"cannot read --auth-token-file: {e}") from e
        overrides["auth_token"] = token
    return Settings.from_env(environ, **overrides)


def check_runtime(settings: Settings, bundles: list) -> None:
    """Raise now, not in the background, if a model cannot run as asked: RuntimeUnavailable
    for a runtime that cannot run here, BundleError for a TorchScript part that cannot load."""
    from splitexit.runtime.backends import resolve_runtime

    options = settings.runtime_options()
    for b in bundles:
        if resolve_runtime(options.runtime, b.manifest) == "onnxruntime":
            from splitexit.runtime.onnx_backend import session_providers

            session_providers(options.providers)
        else:
            b.load_parts(("head", "tail") if settings.images else ("tail",))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as deprecated:
            warnings.simplefilter("always", FutureWarning)
            settings = settings_from_args(args)
    except SplitexitError as e:
        parser.error(str(e))
    for w in deprecated:
        print(f"splitexit-server: warning: {w.message}", file=sys.stderr)
    if not settings.bundles:
        parser.error(f"give at least one --bundle PATH (or set {ENV_PREFIX}BUNDLES)")

    from splitexit_server.logs import uvicorn_log_config

    logging.config.dictConfig(uvicorn_log_config(settings.log_level))
    from splitexit_server.model import load_bundles  # torch is imported here, after argument checks

    try:
        bundles = load_bundles(settings)
        check_runtime(settings, bundles)
    except (SplitexitError, OSError) as e:
        print(f"splitexit-server: refusing to start: {e}", file=sys.stderr)
        return 2
    if args.check:
        for b in bundles:
            print(json.dumps({"model": b.manifest.name, "fingerprint": b.fingerprint}))
        return 0

    from splitexit_server.app import create_app
    from splitexit_server.serve import make_server

    try:
        app = create_app(settings, bundles=bundles)
    except SplitexitError as e:
        print(f"splitexit-server: refusing to start: {e}", file=sys.stderr)
        return 2
    make_server(app, settings).run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
