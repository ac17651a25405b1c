"""What the whole suite shares.

Fixtures are found by name: the ones here, and those of `tests/fixtures/` (bundles and
real servers, by group), registered below. Constants and pure helpers (no set-up, no
tear-down) are imported from `tests/support.py` (pytest puts this folder on `sys.path`);
`benchmarks/` is on pytest's `pythonpath` (pyproject) for the suite's modules. A free
loopback port is `splitexit.demo.free_port()`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest_plugins = ["fixtures.server", "fixtures.device", "fixtures.stream", "fixtures.runtime"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module: small models run faster so than on two contended
    cores (shared CI machines)."""
    import torch  # here, not at the top: collecting a device test needs no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
