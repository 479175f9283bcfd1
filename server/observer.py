"""Hooks the serving core calls for metrics; the default does nothing (metrics.py fills them)."""

from __future__ import annotations

from typing import Literal

from .store import CallKind, CallOutcome
from .work import EndReason, Graph

__all__ = ["BatchObserver", "SessionEvent"]

# What happened to a session: how it started (or was refused), how it ended, or that it was
# taken over from the shared store.
SessionEvent = Literal["opened", "refused", "claimed"] | EndReason


class BatchObserver:
    def batch(self, graph: Graph, size: int, frames: int, seconds: float, waited: float) -> None:
        pass

    def session_event(self, event: SessionEvent) -> None:
        pass

    def predicted(self, frames: int) -> None:
        """Frames run by a stateless (whole-sequence) request."""

    def store_call(self, kind: CallKind, seconds: float, outcome: CallOutcome) -> None:
        pass
