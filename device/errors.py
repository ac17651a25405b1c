"""Why an offload produced no answer: one small hierarchy, each with the record's `reason`.

OffloadError                      reason
├── OffloadTimeout                "timeout" (attempt timed out) / "deadline" (input's)
├── ServerUnreachable             "unreachable"   connection refused, reset, closed
├── ServerFailed                  "server_error"  5xx, or an answer that is no answer
├── ServerBusy                    "busy"          429 / 503 / 504: answer locally now
├── RequestRejected               "rejected"      400 / 413: this frame cannot work
└── OffloadRefused (fatal)        "refused"       401 / 403 / 404: stop offloading
    └── FingerprintRejected       "fingerprint"   409: the server runs another bundle

Each is the device's view of one server answer: the server found a `splitexit.errors.FrameError`
(answered 400 `BadRequest`: here `RequestRejected`) or a `FingerprintMismatch` (409 `Conflict`,
stream close 4409: here `FingerprintRejected`, which also stops offloading).
"""

from __future__ import annotations

from splitexit.errors import SplitexitError


class OffloadError(SplitexitError):
    """An offload that did not produce an answer; `reason` is the record's short word."""

    reason = "error"
    fatal = False  # True: stop offloading for the rest of the run

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = 0
        self.frame_bytes = 0  # frame bytes that went on the wire, over all attempts
        self.request_bytes = 0
        self.response_bytes = 0


class OffloadTimeout(OffloadError):
    """No answer within the attempt's timeout (`reason` "timeout") or before the input's
    deadline (`by_deadline`, `reason` "deadline": a slow link, not a dead server)."""

    by_deadline = False

    @property
    def reason(self) -> str:  # type: ignore[override]
        return "deadline" if self.by_deadline else "timeout"


class ServerUnreachable(OffloadError):
    """The connection failed (refused, reset, closed early)."""

    reason = "unreachable"


class ServerFailed(OffloadError):
    """The server answered 5xx or something that is not an inference response."""

    reason = "server_error"


class ServerBusy(OffloadError):
    """429, 503 or 504: answer locally now; `retry_after_s` is how long the server asked."""

    reason = "busy"

    def __init__(self, message: str, *, status: int, retry_after_s: float = 0.0) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class RequestRejected(OffloadError):
    """400 / 413: the server refuses this frame; retrying it cannot help."""

    reason = "rejected"


class OffloadRefused(OffloadError):
    """401 / 403 / 404: this device may not offload to this server at all."""

    reason = "refused"
    fatal = True


class FingerprintRejected(OffloadRefused):
    """409: the server runs another bundle than this device."""

    reason = "fingerprint"
