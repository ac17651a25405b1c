"""Split-point profiling: where to cut a model, measured on this machine (Neurosurgeon style).

    for each split point p:  head_p ─ [encoder] ══ bottleneck frame ══ [decoder] ─ tail_p
        head, encoder ........ timed here at batch 1, times a device-speed factor
        decoder, tail ........ timed here at batch 1 (the server)
        bytes ................ split-point features raw (float32) and at 8 bits, and the
                               frame of a C-channel bottleneck at 1/2**d resolution and b bits
    predicted end-to-end latency per link rate (RTT added once per request):
        local only    = full model on the device
        full offload  = send the input image (PNG/JPEG bytes) + full model on the server
        split at p    = head + encoder on the device + send the frame + decoder + tail

`measure` times and sizes the cuts (`profile_model`, `profile_zoo`); `recommend` predicts
each option's latency and picks the fastest; `result` holds what comes out (`ModelProfile`,
its table and JSON); `images` provides the input image full offload would send. The
`splitexit profile` command is `splitexit.commands.profile`. Importing this package does
not import torch; profiling does.
"""

from __future__ import annotations

from .images import load_image, synthetic_image
from .measure import DEFAULT_LINKS, profile_model, profile_zoo
from .result import ModelProfile, SplitProfile

__all__ = [
    "DEFAULT_LINKS",
    "ModelProfile",
    "SplitProfile",
    "load_image",
    "profile_model",
    "profile_zoo",
    "synthetic_image",
]
