"""Admission control: admit only what can be answered in time, refuse the rest at once.

    request ─ at the door, before its body is read:
            │   predicted wait = batches ahead x measured batch time > queue_delay_target? ─ 429
            ├ body parsed: its own deadline (the `timeout` parameter a device sends) shorter
            │   than the predicted wait + one batch? ── 429 (504 if not even one batch fits)
            └ its batch starts: it waited longer than queue_delay_target? ─ 429, not computed
              (CoDel's sojourn rule: an answer that late is of no use to a device; computing it
              would only make everyone behind it late too)

Every refusal is `Overloaded` (429 + Retry-After), which a device reads as "answer locally
now". The batch time is an exponentially weighted mean of the measured batches, so the
prediction follows the model, the batch size and the machine without configuration.
"""

from __future__ import annotations

import math

from server.errors import DeadlineExceeded, Overloaded, ServerError, with_retry_after


class Admission:
    """Predicts a new request's queue wait and refuses what would wait past the target.

    Args:
        target_s: the longest a request should wait for its batch to start.
        max_batch_size: samples per batch (the queue drains this many per batch).
        workers: batches run at once.
        retry_after_s: the `Retry-After` of a refusal.
    """

    def __init__(
        self, target_s: float, max_batch_size: int, workers: int = 1, retry_after_s: int = 1
    ) -> None:
        self.target_s = target_s
        self.max_batch_size = max_batch_size
        self.workers = workers
        self.retry_after_s = retry_after_s
        self.batch_s = 0.0  # mean seconds per batch (decode + model), 0 until one ran
        self.entering = 0  # requests past the door, not yet queued (their bodies are read)
        self._weight = 0.2

    def record_batch(self, seconds: float) -> None:
        """Note how long a batch took."""
        if math.isfinite(seconds) and seconds >= 0:
            w = self._weight if self.batch_s else 1.0
            self.batch_s += w * (seconds - self.batch_s)

    def expected_wait(self, queued: int, running: bool) -> float:
        """Seconds a request arriving now waits for its batch: the full batches queued ahead
        of it, and the one running, shared among the workers."""
        ahead = queued // self.max_batch_size + (1 if running else 0)
        return ahead * self.batch_s / self.workers

    def at_door(self, model: str, queued: int, running: bool) -> ServerError | None:
        """The 429 for a request that would wait past the target, else None. `queued`
        counts the requests queued; those let in and still reading are added here."""
        wait = self.expected_wait(queued + self.entering, running)
        if wait <= self.target_s:
            return None
        return self._refuse(
            f"model {model!r} is overloaded: a request now would wait about {wait * 1e3:.0f} ms "
            f"for its batch, over the {self.target_s * 1e3:g} ms target "
            "(queue_delay_target_ms); answer locally or retry later"
        )

    def within(self, model: str, queued: int, running: bool, left_s: float) -> ServerError | None:
        """For a request whose own deadline is `left_s` from now: 504 if not even one batch
        fits before it, 429 if the predicted wait plus one batch does not, else None."""
        need = self.expected_wait(queued, running) + self.batch_s
        if need <= left_s:
            return None
        if left_s < self.batch_s:
            return DeadlineExceeded(
                f"the request's timeout ({max(left_s, 0) * 1e3:.3g} ms) is shorter than one "
                f"batch of model {model!r} ({self.batch_s * 1e3:.3g} ms): its deadline would "
                "pass before an answer; not computed"
            )
        return self._refuse(
            f"model {model!r} cannot answer within the request's timeout ({left_s * 1e3:.0f} ms"
            f"; about {need * 1e3:.0f} ms now): answer locally"
        )

    def late(self, model: str, waited_s: float) -> ServerError:
        """The 429 for a request that waited past the target and is dropped uncomputed."""
        return self._refuse(
            f"model {model!r} is overloaded: the request waited {waited_s * 1e3:.0f} ms for its "
            f"batch, over the {self.target_s * 1e3:g} ms target (queue_delay_target_ms), and "
            "was dropped uncomputed; answer locally or retry later"
        )

    def _refuse(self, message: str) -> ServerError:
        return with_retry_after(Overloaded(message), self.retry_after_s)
