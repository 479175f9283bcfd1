"""Prometheus metrics, built on an injected registry (a fresh one per test)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .observer import BatchObserver
from .work import Graph

__all__ = ["LATENCY_BUCKETS", "PROTOCOLS", "Metrics"]

# 50 µs doubling to ~6.5 s: the default buckets start at 5 ms and would hide every step.
LATENCY_BUCKETS = tuple(50e-6 * 2**k for k in range(18))
BATCH_BUCKETS = tuple(2**k for k in range(11))  # 1 .. 1024


# The ``protocol`` label of the request metrics: which front a request came through.
PROTOCOLS = ("native", "oip-grpc", "oip-http")


class Metrics(BatchObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "seqserve_request_duration_seconds",
            "Time from receiving a request (one stream message or unary call) to its response",
            ["rpc", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "seqserve_requests",
            "Requests (stream messages and unary calls) by RPC and status",
            ["rpc", "code", "protocol"],
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "seqserve_queue_wait_seconds",
            "Wait of a batch's oldest request before its run",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "seqserve_inference_seconds",
            "onnxruntime time per batch",
            ["graph"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "seqserve_batch_size",
            "Sessions per onnxruntime call",
            ["graph"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.steps = Counter("seqserve_steps", "Frames applied to sessions", registry=registry)
        self.predict_frames = Counter(
            "seqserve_predict_frames", "Frames run by Predict (whole sequences)", registry=registry
        )
        self.session_events = Counter(
            "seqserve_session_events",
            "Session lifecycle events: opened, closed, expired, refused (cap reached), claimed "
            "(resumed from the shared store), moved (taken over by another replica)",
            ["event"],
            registry=registry,
        )
        self.live_sessions = Gauge(
            "seqserve_live_sessions", "Sessions holding state", registry=registry
        )
        self.state_bytes = Gauge(
            "seqserve_state_bytes", "Bytes of recurrent state held", registry=registry
        )
        self.store_seconds = Histogram(
            "seqserve_store_call_seconds",
            "Calls to the shared session store (commit: one "
            "round's writes; claim: taking sessions over; peek, owner: reads)",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_calls = Counter(
            "seqserve_store_calls",
            "Calls to the shared session store by outcome: ok, failed "
            "(unreachable, timed out), skipped (backing off after a failure: serving from "
            "memory)",
            ["call", "outcome"],
            registry=registry,
        )
        self._inference = {g: self.inference_seconds.labels(g) for g in ("step", "sequence")}
        self._batch = {g: self.batch_size.labels(g) for g in ("step", "sequence")}
        for event in ("opened", "closed", "expired", "refused", "claimed", "moved"):
            self.session_events.labels(event)

    def batch(self, graph: Graph, size: int, frames: int, seconds: float, waited: float) -> None:
        self._inference[graph].observe(seconds)
        self._batch[graph].observe(size)
        self.queue_seconds.observe(waited)
        self.steps.inc(frames)

    def session_event(self, event: str) -> None:
        self.session_events.labels(event).inc()

    def store_call(self, kind: str, seconds: float, outcome: str) -> None:
        if outcome != "skipped":
            self.store_seconds.labels(kind).observe(seconds)
        self.store_calls.labels(kind, outcome).inc()

    def track_sessions(self, live: Callable[[], int], bytes_per_session: int) -> None:
        """Gauges read at scrape time, so the hot path never updates them."""
        self.live_sessions.set_function(live)
        self.state_bytes.set_function(lambda: live() * bytes_per_session)
