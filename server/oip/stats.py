"""Numbers for ``ModelStatistics`` (Triton's statistics extension), from seqserve's own metrics.

- ``success`` / ``fail``: inference requests through the Open Inference Protocol (gRPC and REST),
  counted and timed by the fronts (receipt to answer, as ``seqserve_request_duration_seconds``);
- ``queue``, ``compute_infer``: per onnxruntime call of the scheduler, whichever protocol fed it
  (``seqserve_queue_wait_seconds``, ``seqserve_inference_seconds``); ``execution_count`` is the
  number of those calls;
- ``inference_count``: frames run, by sessions and by stateless requests (``seqserve_steps`` +
  ``seqserve_predict_frames``).

Durations are nanoseconds, as the protocol has them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

__all__ = ["Duration", "ModelNumbers", "RequestTotals", "model_numbers"]


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(slots=True)
class RequestTotals:
    """Inference requests through the protocol fronts, by outcome."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0  # milliseconds since the epoch of the last success

    def done(self, ok: bool, seconds: float) -> None:
        slot = self.success if ok else self.fail
        slot.count += 1
        slot.ns += int(seconds * 1e9)
        if ok:
            self.last_inference_ms = int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ModelNumbers:
    inference_count: int
    execution_count: int
    queue: Duration
    compute_infer: Duration


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (whatever other labels they have)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def model_numbers(registry: CollectorRegistry, model: str, version: str) -> ModelNumbers:
    """The numbers of one model version."""
    infer = Duration()
    own = {"model": model, "version": version}
    infer.count = int(_value(registry, "seqserve_inference_seconds_count", **own))
    infer.ns = int(_value(registry, "seqserve_inference_seconds_sum", **own) * 1e9)
    queue = Duration(
        int(_value(registry, "seqserve_queue_wait_seconds_count", **own)),
        int(_value(registry, "seqserve_queue_wait_seconds_sum", **own) * 1e9),
    )
    frames = _value(registry, "seqserve_steps_total", **own) + _value(
        registry, "seqserve_predict_frames_total", **own
    )
    return ModelNumbers(int(frames), infer.count, queue, infer)
