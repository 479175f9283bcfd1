"""Hooks the serving core calls for metrics; the default does nothing (metrics.py fills them)."""

from __future__ import annotations

from .work import Graph

__all__ = ["BatchObserver"]


class BatchObserver:
    def batch(self, graph: Graph, size: int, frames: int, seconds: float, waited: float) -> None:
        pass

    def session_event(self, event: str) -> None:
        pass

    def store_call(self, kind: str, seconds: float, outcome: str) -> None:
        pass
