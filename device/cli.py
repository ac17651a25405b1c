"""The `splitexit-device` command: run the device agent over a source of inputs.

splitexit-device run --bundle BUNDLE --server http://tail:8000 --source images/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from splitexit.errors import BundleError, RuntimeUnavailable, SplitexitError

if TYPE_CHECKING:
    from splitexit.bundle import Bundle
    from splitexit.link import LinkEmulator
    from splitexit.runtime.backends import RuntimeOptions

    from .agent import Agent
    from .client import OffloadClient
    from .config import AgentConfig
    from .stream import StreamClient

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
TOKEN_ENV = "SPLITEXIT_TOKEN"

EPILOG = """\
sources:
  DIR          every image under DIR, recursive and sorted; DIR/<class name>/... labels
               the inputs, so the summary reports accuracy
  FILE.png     one image;   -   image paths on stdin, one per line
  FILE.mp4     a video;     camera:N   camera N   (both need OpenCV)

output: one JSON line per input on stdout (or --out FILE), the summary on stderr.
exit status: 0 done, 1 error, 2 bad usage or a bundle that cannot load, 3 server
unreachable or serving another bundle (fingerprint mismatch), 130 interrupted (the
summary is still printed).

examples:
  splitexit-device run --bundle fmnist-small --server http://127.0.0.1:8000 --source test/
  splitexit-device run --bundle fmnist-small --server http://127.0.0.1:8000 --source test/ \\
      --deadline-ms 50 --link 5mbit:20ms          # adaptive, over an emulated link
  find imgs -name '*.jpg' | splitexit-device run --bundle b --local-only --source -
"""


def build_parser() -> argparse.ArgumentParser:
    from .config import AgentConfig  # its defaults are the flags' defaults

    parser = argparse.ArgumentParser(
        prog="splitexit-device",
        description="The splitexit device agent: run a bundle's head with early exits and "
        "offload the rest to a tail server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="answer every input of a source, locally or through the server",
        description="Answer every input of a source once: locally at a confident exit, or by "
        "sending the compressed bottleneck to the tail server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = run.add_argument_group("what and where")
    g.add_argument("--bundle", required=True, type=Path, help="bundle directory or .tar[.gz]")
    g.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        type=Path,
        metavar="PEM",
        help="ed25519 public key one of which must have signed the bundle (repeatable)",
    )
    g.add_argument("--server", help="tail server URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--source", required=True, help="inputs: DIR, FILE, -, video or camera:N")
    g.add_argument("--model", help="model name on the server (default: the bundle's name)")
    g.add_argument("--local-only", action="store_true", help="never offload; no server needed")
    g.add_argument("--limit", type=int, help="stop after this many inputs")

    g = run.add_argument_group("decisions")
    g.add_argument(
        "--policy",
        choices=("fixed", "adaptive"),
        default="adaptive",
        help="fixed: always --channels x --bits; adaptive (default): choose per input from "
        "the measured link and compute, the deadline and the accuracy floor: send the image, "
        "answer at an exit, offload at (k, bits) or finish the tail here",
    )
    g.add_argument(
        "--no-tail", action="store_true", help="adaptive: never finish the tail on the device"
    )
    g.add_argument("--no-images", action="store_true", help="adaptive: never send the image")
    g.add_argument("--channels", type=int, help="fixed policy: channels sent")
    g.add_argument("--bits", type=int, help="fixed policy: bits per value")
    g.add_argument(
        "--deadline-ms",
        type=float,
        help="per-input latency budget: answer locally when no action can meet it",
    )
    g.add_argument("--accuracy-floor", type=float, help="lowest accuracy an action may have")
    g.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="EXIT=VALUE",
        help="override an exit's confidence threshold (repeatable; > 1 disables the exit)",
    )
    g.add_argument(
        "--explore-ms",
        type=float,
        default=AgentConfig.explore_s * 1e3,
        help="adaptive: take an action not taken for this long once, so that a stale estimate "
        "of its cost cannot keep it from being chosen; 0: never (%(default)g)",
    )

    g = run.add_argument_group("network")
    g.add_argument(
        "--window",
        type=int,
        default=AgentConfig.window,
        help="frames in flight at most (%(default)s)",
    )
    g.add_argument("--timeout-ms", type=float, default=2000, help="one attempt, at most (2000)")
    g.add_argument("--connect-timeout-ms", type=float, default=1000, help="connecting (1000)")
    g.add_argument(
        "--budget-ms",
        type=float,
        default=5000,
        help="one request over all attempts, when no --deadline-ms (5000)",
    )
    g.add_argument("--retries", type=int, default=2, help="retries after a failed attempt (2)")
    g.add_argument("--backoff-ms", type=float, default=50, help="first retry's backoff cap (50)")
    g.add_argument(
        "--token-file", type=Path, help=f"bearer token file (or the {TOKEN_ENV} variable)"
    )
    g.add_argument(
        "--transport",
        choices=("auto", "stream", "http"),
        default="auto",
        help="auto (default): the WebSocket stream when the server offers it, else KServe "
        "HTTP; stream: the stream only; http: KServe v2 HTTP only (Triton, KServe)",
    )
    g.add_argument(
        "--ping-ms",
        type=float,
        default=1000,
        help="stream liveness: ping this often, and a server silent this long is dead (1000)",
    )
    g.add_argument(
        "--probe-interval-ms",
        type=float,
        default=AgentConfig.probe_interval_s * 1e3,
        help="time the link with a small request this often while no answers come in (more "
        "seldom while they do), for the link estimate the choices rest on; 0: never "
        "(%(default)g)",
    )
    g.add_argument(
        "--link",
        metavar="RATE:RTT",
        help="emulate a link to a loopback server, e.g. 5mbit:20ms (for demos and tests)",
    )

    g = run.add_argument_group("output")
    g.add_argument("--out", type=Path, help="write the JSON lines here instead of stdout")
    g.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    g = run.add_argument_group("runtime")
    add_runtime_arguments(g)
    g.add_argument("--device", default="cpu", help="--runtime torch: device (cpu, cuda)")
    return parser


def add_runtime_arguments(g: argparse._ActionsContainer) -> None:
    """--runtime, --providers, --threads (shared with splitexit-server)."""
    from splitexit.runtime.backends import PROVIDERS, RUNTIMES

    g.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the model: onnxruntime (the bundle's ONNX graphs, no torch needed), "
        "torch (TorchScript), or auto (default): onnxruntime when installed and the bundle "
        "has ONNX graphs, else torch",
    )
    g.add_argument(
        "--providers",
        default="cpu",
        metavar="LIST",
        help=f"onnxruntime execution providers in order, comma-separated ({', '.join(PROVIDERS)}"
        "; default cpu; CPU is always the last fallback)",
    )
    g.add_argument(
        "--threads", type=int, help="intra-op threads (leave a core to the network side)"
    )


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """RuntimeOptions from --runtime/--providers/--threads; ValueError names a bad value."""
    from splitexit.runtime.backends import RuntimeOptions

    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    return RuntimeOptions(args.runtime, providers or ("cpu",), args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.local_only and not args.server:
        parser.error("--server is required unless --local-only is given")
    if not args.local_only and not _is_server_url(args.server):
        parser.error(f"--server must be http(s)://HOST[:PORT], got {args.server!r}")
    if not args.ping_ms > 0:
        parser.error(f"--ping-ms must be > 0, got {args.ping_ms:g}")
    for flag, ms in (
        ("--probe-interval-ms", args.probe_interval_ms),
        ("--explore-ms", args.explore_ms),
    ):
        if not ms >= 0:
            parser.error(f"{flag} must be >= 0 (0: never), got {ms:g}")
    try:
        config = agent_config(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        return asyncio.run(_run(args, config))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BundleError as e:
        _say(f"cannot use the bundle: {e}")
        return EXIT_USAGE
    except RuntimeUnavailable as e:  # the runtime asked for cannot run here: a usage error
        _say(f"error: {e}")
        return EXIT_USAGE
    except (SplitexitError, ValueError, ImportError, OSError) as e:
        _say(f"error: {e}")
        return EXIT_ERROR


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The AgentConfig the flags ask for; ValueError names a bad value."""
    from .config import AgentConfig

    thresholds = _thresholds(args.threshold)
    return AgentConfig(
        policy=args.policy,
        channels=args.channels,
        bits=args.bits,
        deadline_s=None if args.deadline_ms is None else args.deadline_ms / 1e3,
        accuracy_floor=args.accuracy_floor,
        images=not args.no_images,
        tail_here=not args.no_tail,
        thresholds=thresholds or None,
        window=args.window,
        local_only=args.local_only,
        probe_interval_s=args.probe_interval_ms / 1e3,
        explore_s=args.explore_ms / 1e3,
        runtime=runtime_options(args),
    )


async def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    from splitexit.bundle import load_bundle

    from .agent import Agent
    from .client import ClientConfig, OffloadClient, OffloadError
    from .records import RecordWriter
    from .sources import limit, open_source

    # the runner loads what its runtime needs: TorchScript parts, or the ONNX graphs
    bundle = load_bundle(args.bundle, parts=(), device=args.device, trusted_keys=args.trusted_key)
    source = limit(open_source(args.source), args.limit)
    link = None
    client = None
    with contextlib.ExitStack() as stack:
        out: IO[str] = sys.stdout
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(args.out, "w", encoding="utf-8"))
        if not args.local_only:
            url = args.server
            if args.link:
                link = stack.enter_context(_link(args.server, args.link))
                url = link.url
            client = OffloadClient(
                url,
                args.model or bundle.manifest.name,
                ClientConfig(
                    timeout_s=args.timeout_ms / 1e3,
                    connect_timeout_s=args.connect_timeout_ms / 1e3,
                    budget_s=args.budget_ms / 1e3,
                    retries=args.retries,
                    backoff_s=args.backoff_ms / 1e3,
                    token=_token(args.token_file),
                    max_connections=max(args.window, 1),
                ),
            )
            if args.transport != "http":
                client = _stream_client(client, bundle, args)  # type: ignore[assignment]
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        agent = Agent(bundle, config, client, writer=RecordWriter(out), progress=progress)
        try:
            try:
                await agent.start()
            except OffloadError as e:
                _say(f"cannot offload to {args.server}: {e}")
                if e.reason != "fingerprint":
                    _say("start the tail server, check --server, or run with --local-only")
                return EXIT_SERVER
            interrupted = _install_signals(agent)
            summary = await agent.run(source)
        finally:
            if client is not None:
                await client.aclose()
        _say("summary\n" + summary.format())
        if args.summary_json is not None:
            args.summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        return EXIT_INTERRUPTED if interrupted() else EXIT_OK


def _stream_client(http: OffloadClient, bundle: Bundle, args: argparse.Namespace) -> StreamClient:
    from .stream import StreamClient, StreamConfig, bundle_session

    timeout_s = args.timeout_ms / 1e3
    if args.deadline_ms is not None:
        timeout_s = min(timeout_s, args.deadline_ms / 1e3)
    config = StreamConfig(
        transport=args.transport,
        ping_interval_s=args.ping_ms / 1e3,
        ping_timeout_s=args.ping_ms / 1e3,
    )
    return StreamClient(http, bundle_session(bundle, http.model, timeout_s), config, log=_say)


def _install_signals(agent: Agent) -> Callable[[], bool]:
    """First Ctrl-C / SIGTERM: stop taking inputs; second Ctrl-C: cancel the run now."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    count = [0]

    def on_signal(sig: int) -> None:
        count[0] += 1
        if count[0] == 1:
            _say("stopping: answering inputs in flight locally (Ctrl-C again to quit now)")
            agent.stop()
        elif sig == signal.SIGINT and task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, on_signal, sig)
    return lambda: count[0] > 0


def _is_server_url(text: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@contextlib.contextmanager
def _link(server: str, spec: str) -> Iterator[LinkEmulator]:
    from urllib.parse import urlsplit

    from splitexit.link import LinkEmulator

    parts = urlsplit(server)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--link emulates a link to a loopback http server, not {server}")
    with LinkEmulator(("127.0.0.1", parts.port or 80), spec) as link:
        _say(f"emulated link {link.spec} in front of {server}")
        yield link


def _thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--threshold wants EXIT=VALUE, e.g. layer1=0.9, got {item!r}")
    return out


def _token(path: Path | None) -> str | None:
    if path is not None:
        return path.read_text(encoding="utf-8").strip() or None
    return os.environ.get(TOKEN_ENV) or None


def _say(message: str) -> None:
    print(f"splitexit-device: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
