"""splitexit: split computing with a learned bottleneck and early exits for edge devices.

    image ─ head ─┬─ exit: confident? ─► answer on the device
                  └─ encoder ─ quantize(k, bits) ─ frame ══ HTTP ══ tail server ─► answer

Where things live: `models` (zoo and split surgery), `bottleneck`, `exits`, `codec` (the
frame), `train` (the pipeline), `bundle` (export / load), `runtime` (head and tail runners),
`calibrate`, `profile`, `data`, `preprocess`, `link` (link emulator), `demo`, `cli` (the
entry point) and `commands` (one module per subcommand).
Submodules are imported on use, so `import splitexit` stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splitexit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
