"""Prometheus metrics, built on an injected registry (a fresh one per test).

Request, inference, batch and session metrics carry ``model`` and ``version`` labels: their
cardinality is bounded by the repository (never a per-session label). A request that fails
before it reaches a model (unknown model, undecodable) is counted with ``model=""``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .observer import BatchObserver
from .work import Graph

__all__ = ["LATENCY_BUCKETS", "PROTOCOLS", "Metrics", "VersionGauges", "VersionObserver"]

# 50 µs doubling to ~6.5 s: the default buckets start at 5 ms and would hide every step.
LATENCY_BUCKETS = tuple(50e-6 * 2**k for k in range(18))
BATCH_BUCKETS = tuple(2**k for k in range(11))  # 1 .. 1024

# The ``protocol`` label of the request metrics: which front a request came through.
PROTOCOLS = ("native", "oip-grpc", "oip-http")
SESSION_EVENTS = ("opened", "closed", "expired", "refused", "claimed", "moved")
VERSION_STATES = ("loading", "ready", "draining", "unavailable")


class Metrics(BatchObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "seqserve_request_duration_seconds",
            "Time from receiving a request (one stream message or unary call) to its response",
            ["rpc", "protocol", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "seqserve_requests",
            "Requests (stream messages and unary calls) by RPC and status",
            ["rpc", "code", "protocol", "model", "version"],
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "seqserve_queue_wait_seconds",
            "Wait of a batch's oldest request before its run",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "seqserve_inference_seconds",
            "onnxruntime time per batch",
            ["graph", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "seqserve_batch_size",
            "Sessions per onnxruntime call",
            ["graph", "model", "version"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.steps = Counter(
            "seqserve_steps", "Frames applied to sessions", ["model", "version"], registry=registry
        )
        self.predict_frames = Counter(
            "seqserve_predict_frames",
            "Frames run by Predict (whole sequences)",
            ["model", "version"],
            registry=registry,
        )
        self.session_events = Counter(
            "seqserve_session_events",
            "Session lifecycle events: opened, closed, expired, refused (cap reached), claimed "
            "(resumed from the shared store), moved (taken over by another replica)",
            ["event", "model", "version"],
            registry=registry,
        )
        self.load_failures = Counter(
            "seqserve_model_load_failures",
            "Model versions that failed to load or validate",
            ["model", "version"],
            registry=registry,
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
        self._request_children: dict[tuple[str, str, str, str, str], tuple[Any, Any]] = {}

    def request(
        self, rpc: str, protocol: str, model: str, version: str, code: str, seconds: float
    ) -> None:
        """One request (a unary call or one stream message) answered with ``code``."""
        key = (rpc, protocol, model, version, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.request_seconds.labels(rpc, protocol, model, version),
                self.requests.labels(rpc, code, protocol, model, version),
            )
        children[0].observe(seconds)
        children[1].inc()

    def declare(
        self, rpcs: Iterable[str], codes: Iterable[str], protocol: str, model: str, version: str
    ) -> None:
        """Make series exist before their first sample, so ``rate()`` sees the first one."""
        for rpc in rpcs:
            for code in codes:
                self.requests.labels(rpc, code, protocol, model, version)

    def observer(self, model: str, version: int) -> VersionObserver:
        return VersionObserver(self, model, str(version))

    def store_call(self, kind: str, seconds: float, outcome: str) -> None:
        if outcome != "skipped":
            self.store_seconds.labels(kind).observe(seconds)
        self.store_calls.labels(kind, outcome).inc()

    def track_versions(self, versions: Callable[[], Iterable[VersionGauges]]) -> None:
        """Per-version gauges read at scrape time, so the hot path never updates them."""
        self.registry.register(_VersionCollector(versions))


class VersionObserver(BatchObserver):
    """The metrics of one model version, labels bound once."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.metrics = metrics
        self.model, self.version = model, version
        self._inference = {
            g: metrics.inference_seconds.labels(g, model, version) for g in ("step", "sequence")
        }
        self._batch = {
            g: metrics.batch_size.labels(g, model, version) for g in ("step", "sequence")
        }
        self._queue = metrics.queue_seconds.labels(model, version)
        self._steps = metrics.steps.labels(model, version)
        self.predict_frames = metrics.predict_frames.labels(model, version)
        self._events = {e: metrics.session_events.labels(e, model, version) for e in SESSION_EVENTS}

    def batch(self, graph: Graph, size: int, frames: int, seconds: float, waited: float) -> None:
        self._inference[graph].observe(seconds)
        self._batch[graph].observe(size)
        self._queue.observe(waited)
        self._steps.inc(frames)

    def session_event(self, event: str) -> None:
        counter = self._events.get(event)
        if counter is None:
            counter = self._events[event] = self.metrics.session_events.labels(
                event, self.model, self.version
            )
        counter.inc()

    def store_call(self, kind: str, seconds: float, outcome: str) -> None:
        self.metrics.store_call(kind, seconds, outcome)

    def predicted(self, frames: int) -> None:
        self.predict_frames.inc(frames)


class VersionGauges:
    """What the per-version gauges read of one version at scrape time."""

    def __init__(
        self,
        model: str,
        version: int,
        state: str,
        sessions: int,
        state_bytes: int,
        load_seconds: float,
    ) -> None:
        self.model, self.version, self.state = model, str(version), state
        self.sessions, self.state_bytes, self.load_seconds = sessions, state_bytes, load_seconds


class _VersionCollector(Collector):
    def __init__(self, versions: Callable[[], Iterable[VersionGauges]]) -> None:
        self.versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        live = GaugeMetricFamily("seqserve_live_sessions", "Sessions holding state", labels=labels)
        held = GaugeMetricFamily(
            "seqserve_state_bytes", "Bytes of recurrent state held", labels=labels
        )
        state = GaugeMetricFamily(
            "seqserve_model_version_state",
            "1 for the state each model version is in (loading, ready, draining, unavailable)",
            labels=[*labels, "state"],
        )
        load = GaugeMetricFamily(
            "seqserve_model_load_seconds",
            "Seconds the version took to load and validate",
            labels=labels,
        )
        for v in self.versions():
            live.add_metric([v.model, v.version], v.sessions)
            held.add_metric([v.model, v.version], v.state_bytes)
            load.add_metric([v.model, v.version], v.load_seconds)
            for name in VERSION_STATES:
                state.add_metric([v.model, v.version, name], 1.0 if v.state == name else 0.0)
        yield from (live, held, state, load)
