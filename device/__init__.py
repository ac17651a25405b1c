"""The device agent: run the head on the device, exit early or offload the bottleneck.

    sources ─ Input ─► agent (head in a worker thread, exits) ─┬─► local answer (exit, tail)
                │  policy: image / exit / offload at (k, bits) / tail here, priced by
                │  splitexit.cost from the estimator's measurements + the manifest
                └─► client ─ stream, or HTTP (KServe v2) ─► tail server (frame or image)
                       └─ failed / circuit open ─► best exit ("fallback")
    every input ─► one JSON-lines record (records) ─► summary

Modules: `sources` (inputs), `agent` (the loop) and `config` (its settings), `policy` (pure
decisions), `estimator` (link and cost measurements), `offloader` (client + circuit
`breaker` + measurements), `client` (KServe v2 over HTTP: timeouts, retries; `http` its
keep-alive pool), `stream` (the WebSocket stream, HTTP as fallback), `errors` (what goes
wrong), `records` (records and summary),
`cli` (`splitexit-device`). Names below are
imported lazily, so `splitexit-device --help` does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Agent": "agent",
    "AgentConfig": "config",
    "CircuitBreaker": "breaker",
    "ClientConfig": "client",
    "OffloadClient": "client",
    "StreamClient": "stream",
    "OffloadError": "errors",
    "FingerprintRejected": "errors",
    "Offloader": "offloader",
    "LinkEstimator": "estimator",
    "Measurements": "estimator",
    "at_bottleneck": "policy",
    "start": "policy",
    "Choices": "policy",
    "FixedRule": "policy",
    "AdaptiveRule": "policy",
    "Record": "records",
    "Summary": "records",
    "Input": "sources",
    "open_source": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'device' has no attribute {name!r}")
    return getattr(import_module(f"splitexit_device.{module}"), name)
