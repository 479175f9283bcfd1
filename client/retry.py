"""Reconnect policy: exponential backoff with jitter, bounded in attempts and in total time."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "Contact"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays ``initial * multiplier**n`` capped at ``maximum``, each scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``; give up after ``max_attempts`` consecutive failures or once
    ``max_elapsed`` seconds have passed since the first of them. ``Backoff.none()`` never retries.
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 30
    max_elapsed: float = 60.0

    @classmethod
    def none(cls) -> Backoff:
        return cls(max_attempts=0, max_elapsed=0.0)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        base = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))

    def allows(self, attempt: int, elapsed: float) -> bool:
        """May retry number ``attempt`` happen ``elapsed`` seconds after the first failure?"""
        return attempt < self.max_attempts and elapsed < self.max_elapsed


class Contact:
    """Whether the server has ever answered this client. Until it has, an unreachable server
    fails fast (a wrong target should not hang for the whole retry budget); after that, drops
    are retried under the ``Backoff``."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False
