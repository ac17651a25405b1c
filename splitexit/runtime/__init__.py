"""Running a bundle: the head on the device, the tail on the server.

device:  x ─ HeadRunner.run ─┬─ confident exit ─► ExitAnswer (local)
                             └─ z ─ HeadRunner.frame(z, bits, keep) ─► bytes
server:  [bytes, ...] ─ TailRunner.run_frames ─► [TailAnswer, ...]   (one tail call)
"""

from .head import ExitAnswer, HeadResult, HeadRunner
from .tail import TailAnswer, TailRunner

__all__ = ["ExitAnswer", "HeadResult", "HeadRunner", "TailAnswer", "TailRunner"]
