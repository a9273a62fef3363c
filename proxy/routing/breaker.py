"""A route's circuit breaker: after repeated failed requests the route is skipped for a while, where
another route can serve, then tried again with one probe request."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class CircuitBreaker:
    """Closed -> open after `threshold` failed requests in a row -> half-open after `cooldown`.

    Half-open lets one probe request through at a time: its success closes the breaker, its failure
    opens it for another cooldown.
    """

    threshold: int = 5
    cooldown: float = 30.0
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half_open"

    def allow(self) -> bool:
        """Whether a request may use the route now; in half-open, claims the one probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool, probe: bool = True) -> None:
        """The outcome of a request on the route. Only the probe frees the probe slot (a success closes
        the breaker, so it frees it too): a request that started before the breaker opened and ends
        during a probe must not let a second probe through."""
        if probe or ok:
            self.probing = False
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown

    def release(self, probe: bool = True) -> None:
        """The request ended without judging the route (client error, cancelled): the probe frees its slot."""
        if probe:
            self.probing = False
