"""What the whole suite shares.

Fixtures here are found by name. The helper modules beside this file (`device_fixtures`,
`server_fixtures`, `stream_fixtures`, `runtime_fixtures`) build bundles and real servers
for their groups of tests, and are imported by name (pytest puts this folder on
`sys.path`); `benchmarks/` is on pytest's `pythonpath` (pyproject) for the suite's modules.
A free loopback port is `splitexit.demo.free_port()`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module: small models run faster so than on two contended
    cores (shared CI machines)."""
    import torch  # here, not at the top: collecting a device test needs no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
