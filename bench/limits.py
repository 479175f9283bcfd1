"""In-process onnxruntime, with the server's own ``Runtime`` and options (one intra-op thread, no
spin-waiting): what the model costs with no server around it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from seqserve.server.model import ModelSpec
from seqserve.server.runtime import Runtime

__all__ = ["OrtPoint", "ort_curve", "sequence_pass"]


@dataclass(frozen=True, slots=True)
class OrtPoint:
    graph: str  # "step", or "sequence" run at T=1
    batch: int
    seconds: float  # per call

    @property
    def rate(self) -> float:
        return self.batch / self.seconds


def _per_call(call: Callable[[], object], budget: float, blocks: int = 5) -> float:
    """Median over ``blocks`` of the mean time per call, ``budget`` seconds in all."""
    for _ in range(3):
        call()
    means = []
    for _ in range(blocks):
        calls, started = 0, time.perf_counter()
        stop = started + budget / blocks
        while (now := time.perf_counter()) < stop or calls == 0:
            call()
            calls += 1
        means.append((now - started) / calls)
    return statistics.median(means)


def ort_curve(spec: ModelSpec, x: np.ndarray, batches: list[int], budget: float) -> list[OrtPoint]:
    """Seconds per call of the step graph and of the sequence graph at T=1, per batch size.
    Row b of a batch is frame b // recordings of recording b % recordings of ``x``."""
    runtime = Runtime(spec)
    points = []
    for batch in batches:
        rows = np.arange(batch)
        frames = np.ascontiguousarray(x[rows % len(x), (rows // len(x)) % x.shape[1]])
        states = runtime.zero_states(batch)
        points.append(
            OrtPoint("step", batch, _per_call(partial(runtime.step, frames, states), budget))
        )
        points.append(
            OrtPoint(
                "sequence",
                batch,
                _per_call(partial(runtime.sequence, frames[:, None], states), budget),
            )
        )
    return points


def sequence_pass(runtime: Runtime, sequences: np.ndarray, chunk: int) -> float:
    """Seconds to run every sequence of ``[N, T, F]`` from zero state through the sequence graph,
    ``chunk`` sequences per call (what the server's Predict does with ``--max-batch``)."""
    started = time.perf_counter()
    for lo in range(0, len(sequences), chunk):
        batch = sequences[lo : lo + chunk]
        runtime.sequence(batch, runtime.zero_states(len(batch)))
    return time.perf_counter() - started
