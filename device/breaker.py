"""A circuit breaker: stop offloading to a server that keeps failing, try again later.

    closed ── `failure_threshold` failures in a row ──► open (offloads answered locally)
      ▲                                                  │ after `reset_s` (doubling up to
      │                                                  ▼ `max_reset_s` while it fails)
      └──────────── trial succeeds ──────────── half-open: one trial request goes through
                                                  └─ trial fails ─► open again

`hold(seconds)` pauses offloading without counting a failure: the server said 429 or 503
with `Retry-After`. The clock is injectable, so the state machine is tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """See the module docstring. Not thread-safe: use it from the agent's event loop."""

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_s: float = 0.5,
        max_reset_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not 0 < reset_s <= max_reset_s:
            raise ValueError(f"need 0 < reset_s <= max_reset_s, got {reset_s}, {max_reset_s}")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.max_reset_s = max_reset_s
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._cooldown = reset_s
        self._open_until = 0.0
        self._hold_until = 0.0
        self._trial_out = False
        self.opened = 0  # times it opened (for the summary)

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() >= self._open_until:
            return "half_open"
        return self._state

    @property
    def held(self) -> bool:
        """True while the server's Retry-After lasts."""
        return self._clock() < self._hold_until

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one trial at a time does."""
        now = self._clock()
        if now < self._hold_until:
            return False
        if self._state == "closed":
            return True
        if self._state == "open" and now < self._open_until:
            return False
        self._state = "half_open"
        if self._trial_out:
            return False
        self._trial_out = True
        return True

    def success(self) -> None:
        """A request got a proper answer: close the circuit."""
        self._state = "closed"
        self._failures = 0
        self._cooldown = self.reset_s
        self._trial_out = False

    def failure(self) -> None:
        """A request failed (unreachable, timed out, server error)."""
        self._failures += 1
        if self._state == "half_open":
            self._trip(self._cooldown * 2)
        elif self._state == "closed" and self._failures >= self.failure_threshold:
            self._trip(self.reset_s)

    def release(self) -> None:
        """A trial ended without telling us anything (cancelled): let another one try."""
        self._trial_out = False

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` (server asked to back off); not counted as a failure."""
        self._hold_until = max(self._hold_until, self._clock() + max(0.0, seconds))
        self._trial_out = False

    def _trip(self, cooldown: float) -> None:
        self._cooldown = min(max(cooldown, self.reset_s), self.max_reset_s)
        self._state = "open"
        self._open_until = self._clock() + self._cooldown
        self._trial_out = False
        self.opened += 1
