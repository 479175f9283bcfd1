"""What the gRPC and REST fronts of the Open Inference Protocol share: the model index, server and
model metadata, configuration, statistics and repository answers as plain data (dicts shaped as
the REST API's JSON; the gRPC front parses them into its messages), the error table, and the
request metrics (``protocol`` label ``oip-grpc`` / ``oip-http``)."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..engine import Engine
from ..errors import (
    BadRequest,
    CapacityExceeded,
    Draining,
    PositionError,
    SeqServeError,
    SessionExists,
    SessionNotFound,
)
from ..metrics import Metrics
from ..settings import Settings
from ..store import SessionMoved, StoreUnavailable
from .infer import INPUT, OUTPUT, InferCall
from .infer import start as infer_start
from .models import ModelIndex, ModelNotFound, ModelUnavailable, RepositoryError
from .stats import RequestTotals, model_numbers

__all__ = ["EXTENSIONS", "PLATFORM", "OipFront", "status_of"]

PLATFORM = "onnxruntime_onnx"
# What this server implements of the protocol's extensions, exactly.
EXTENSIONS = (
    "classification",
    "sequence",
    "sequence(string_id)",
    "sequence_position",  # seqserve's: exactly-once steps (see README)
    "model_configuration",
    "model_repository",
    "statistics",
    "binary_tensor_data",
    "parameters",
)

# Domain errors -> (gRPC status code name, HTTP status). Anything else is INTERNAL / 500,
# logged, with a generic message.
_STATUS: dict[type[BaseException], tuple[str, int]] = {
    BadRequest: ("INVALID_ARGUMENT", 400),
    ModelNotFound: ("NOT_FOUND", 404),
    RepositoryError: ("NOT_FOUND", 404),
    ModelUnavailable: ("UNAVAILABLE", 503),
    SessionNotFound: ("NOT_FOUND", 404),
    PositionError: ("FAILED_PRECONDITION", 400),
    CapacityExceeded: ("RESOURCE_EXHAUSTED", 429),
    SessionExists: ("ALREADY_EXISTS", 409),
    Draining: ("UNAVAILABLE", 503),
    StoreUnavailable: ("UNAVAILABLE", 503),
    SessionMoved: ("ABORTED", 409),
}
INFER_RPCS = ("ModelInfer", "ModelStreamInfer")
_CODES = ("OK", *sorted({code for code, _ in _STATUS.values()}), "INTERNAL")


def status_of(exc: BaseException) -> tuple[str, int]:
    for kind in type(exc).__mro__:
        found = _STATUS.get(kind)
        if found is not None:
            return found
    return ("INTERNAL", 500)


def expected_position(exc: BaseException) -> int | None:
    if isinstance(exc, PositionError):
        return exc.expected
    return None


def _package_version() -> str:
    try:
        return version("seqserve")
    except PackageNotFoundError:
        return "0"


class OipFront:
    def __init__(self, engine: Engine, metrics: Metrics, settings: Settings) -> None:
        self.models = ModelIndex(engine)
        self.metrics = metrics
        self.settings = settings
        self.totals = RequestTotals()
        self.version = _package_version()
        self._seconds: dict[tuple[str, str], Any] = {}
        self._counts: dict[tuple[str, str, str], Any] = {}
        for protocol in ("oip-grpc", "oip-http"):  # every inference series exists from the start
            for rpc in INFER_RPCS if protocol == "oip-grpc" else ("ModelInfer",):
                for code in _CODES:
                    self._counter(rpc, code, protocol)

    # -- metrics ------------------------------------------------------------------------------

    def _counter(self, rpc: str, code: str, protocol: str) -> Any:
        key = (rpc, code, protocol)
        counter = self._counts.get(key)
        if counter is None:
            counter = self._counts[key] = self.metrics.requests.labels(rpc, code, protocol)
        return counter

    def done(self, rpc: str, protocol: str, started: float, code: str) -> None:
        """Record one request (a unary call or one stream message)."""
        seconds = time.perf_counter() - started
        histogram = self._seconds.get((rpc, protocol))
        if histogram is None:
            histogram = self._seconds[(rpc, protocol)] = self.metrics.request_seconds.labels(
                rpc, protocol
            )
        histogram.observe(seconds)
        self._counter(rpc, code, protocol).inc()
        if rpc in INFER_RPCS:
            self.totals.done(code == "OK", seconds)

    def start(self, call: InferCall, principal: str) -> asyncio.Future[Any]:
        """``infer.start``, counting a stateless request's frames as the native Predict's are."""
        future = infer_start(call, principal)
        if call.sequence is None:
            frames = call.frames.shape[0] * call.frames.shape[1]
            counter = self.metrics.predict_frames

            def count(done: asyncio.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    counter.inc(frames)

            future.add_done_callback(count)
        return future

    # -- health and metadata ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.models.engine.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "seqserve", "version": self.version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, model_version: str) -> dict[str, Any]:
        spec = self._known(name, model_version)
        return {
            "name": spec.name,
            "versions": [spec.version],
            "platform": PLATFORM,
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, -1, spec.features]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, -1, spec.classes]}],
        }

    def model_config(self, name: str, model_version: str) -> dict[str, Any]:
        """An honest minimal Triton model configuration: dims leave out the batch dimension
        (max_batch_size > 0); sequences are batched oldest first, one step each."""
        spec = self._known(name, model_version)
        settings = self.settings
        return {
            "name": spec.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "max_batch_size": settings.max_batch,
            "input": [{"name": INPUT, "data_type": "TYPE_FP32", "dims": [-1, spec.features]}],
            "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [-1, spec.classes]}],
            "sequence_batching": {
                "max_sequence_idle_microseconds": int(settings.session_idle_timeout * 1e6),
                "oldest": {
                    "max_candidate_sequences": settings.max_sessions,
                    "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
                    "preserve_ordering": True,
                },
            },
            "parameters": {
                "labels": {"string_value": ",".join(spec.labels)},
                "max_frames_per_request": {"string_value": str(settings.max_frames_per_request)},
                "replay_window": {"string_value": str(settings.replay_window)},
            },
        }

    def _known(self, name: str, model_version: str) -> Any:
        """The spec of a model this server knows (loaded or not)."""
        try:
            return self.models.resolve(name, model_version)[1]
        except ModelUnavailable:
            return self.models.spec

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self, name: str, model_version: str) -> list[dict[str, Any]]:
        spec = self.models.spec
        if name or model_version:
            spec = self._known(name, model_version)
        numbers = model_numbers(self.metrics.registry)
        totals = self.totals

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return [
            {
                "name": spec.name,
                "version": spec.version,
                "last_inference": totals.last_inference_ms,
                "inference_count": numbers.inference_count,
                "execution_count": numbers.execution_count,
                "inference_stats": {
                    "success": duration(totals.success.count, totals.success.ns),
                    "fail": duration(totals.fail.count, totals.fail.ns),
                    "queue": duration(numbers.queue.count, numbers.queue.ns),
                    "compute_input": duration(0, 0),
                    "compute_infer": duration(
                        numbers.compute_infer.count, numbers.compute_infer.ns
                    ),
                    "compute_output": duration(0, 0),
                    "cache_hit": duration(0, 0),
                    "cache_miss": duration(0, 0),
                },
                "batch_stats": [],
            }
        ]

    # -- the repository -----------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in self.models.entries()
            if e.state == "READY" or not ready_only
        ]

    def load(self, name: str, has_parameters: bool) -> None:
        if has_parameters:
            raise BadRequest(
                "load parameters (config, files) are not supported: this server has no "
                "model repository to load a new configuration into",
                reason="bad_parameter",
            )
        self.models.load(name)

    def unload(self, name: str) -> None:
        self.models.unload(name)


def error_message(exc: BaseException) -> str:
    """What a client is told: the domain error's own words, never an unexpected one's."""
    return str(exc) if isinstance(exc, SeqServeError) else "internal error"
