"""What the gRPC and REST fronts of the Open Inference Protocol share: the model index, server and
model metadata, configuration, statistics and repository answers as plain data (dicts shaped as
the REST API's JSON; the gRPC front parses them into its messages), the error table, and the
request metrics (``protocol`` label ``oip-grpc`` / ``oip-http``)."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..errors import (
    BadRequest,
    CapacityExceeded,
    Draining,
    NotAllowed,
    PositionError,
    SeqServeError,
    SessionExists,
    SessionNotFound,
    VersionDraining,
    VersionMismatch,
    VersionRetired,
)
from ..metrics import Metrics
from ..models import Models
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
    VersionRetired: ("NOT_FOUND", 404),
    VersionMismatch: ("FAILED_PRECONDITION", 400),
    VersionDraining: ("FAILED_PRECONDITION", 400),
    NotAllowed: ("PERMISSION_DENIED", 403),
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
    def __init__(self, models: Models, metrics: Metrics, settings: Settings) -> None:
        self.models = ModelIndex(models)
        self.metrics = metrics
        self.settings = settings
        self.totals = RequestTotals()
        self.version = _package_version()
        for protocol in ("oip-grpc", "oip-http"):  # every inference series exists from the start
            rpcs = INFER_RPCS if protocol == "oip-grpc" else ("ModelInfer",)
            metrics.declare(rpcs, _CODES, protocol, models.default, "")

    # -- metrics ------------------------------------------------------------------------------

    def done(
        self, rpc: str, protocol: str, started: float, code: str, model: str = "", version: str = ""
    ) -> None:
        """Record one request (a unary call or one stream message)."""
        seconds = time.perf_counter() - started
        self.metrics.request(rpc, protocol, model, version, code, seconds)
        if rpc in INFER_RPCS:
            self.totals.done(code == "OK", seconds)

    def start(self, call: InferCall, principal: str) -> asyncio.Future[Any]:
        """``infer.start``, counting a stateless request's frames as the native Predict's are."""
        return infer_start(call, principal)

    # -- health and metadata ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.models.models.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "seqserve", "version": self.version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, model_version: str) -> dict[str, Any]:
        spec = self._known(name, model_version)
        model = self.models.models.model(spec.name)
        return {
            "name": spec.name,
            "versions": [str(v) for v, found in sorted(model.versions.items()) if found.serving],
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
        """The spec of a model version this server serves."""
        return self.models.resolve(name, model_version)[1]

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self, name: str, model_version: str) -> list[dict[str, Any]]:
        engine, spec = self.models.resolve(name or self.models.models.default, model_version)
        numbers = model_numbers(self.metrics.registry, spec.name, str(engine.version))
        totals = self.totals

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return [
            {
                "name": spec.name,
                "version": str(engine.version),
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

    async def load(self, name: str, has_parameters: bool, principal: str) -> None:
        await self.models.load(name, principal, has_parameters)

    async def unload(self, name: str, principal: str) -> None:
        await self.models.unload(name, principal)


def error_message(exc: BaseException) -> str:
    """What a client is told: the domain error's own words, never an unexpected one's."""
    return str(exc) if isinstance(exc, SeqServeError) else "internal error"
