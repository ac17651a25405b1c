"""The old import path of the server fixtures, kept only for `test_server_admission.py`
(being rewritten elsewhere); new tests request `tiny_bundle`, `live_server` by name.
Delete this module once nothing imports it."""

from fixtures.server import LiveServer, TinyBundle
from fixtures.server import build_tiny_bundle as tiny_bundle
from support import LOOPBACK, OPERATING_POINTS
from support import server_settings as settings

__all__ = ["LOOPBACK", "OPERATING_POINTS", "LiveServer", "TinyBundle", "settings", "tiny_bundle"]
