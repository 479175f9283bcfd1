"""ONNX-vs-Keras parity on whole sequences, step-by-step feeding and random chunkings."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ParityError
from .runner import Runner

__all__ = ["TOLERANCE", "Parity", "check"]

TOLERANCE = 1e-5
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parity:
    """Max absolute differences of probabilities against Keras per-step outputs."""

    sequence_max_abs: float
    step_max_abs: float
    sequence_t1_max_abs: float
    batched_step_max_abs: float
    chunked_max_abs: float
    samples: int
    chunkings: int

    def as_json(self) -> dict[str, float | int]:
        return asdict(self)

    def worst(self) -> float:
        return max(
            self.sequence_max_abs,
            self.step_max_abs,
            self.sequence_t1_max_abs,
            self.batched_step_max_abs,
            self.chunked_max_abs,
        )


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def check(
    sequence: Runner,
    step: Runner,
    x: np.ndarray,
    lengths: np.ndarray,
    expected: np.ndarray,
    *,
    chunkings: int = 3,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> Parity:
    """Compare both graphs with `expected` [n, T, C]; raise `ParityError` beyond `tolerance`."""
    rng = np.random.default_rng(seed)
    seq = t1 = st = ch = 0.0
    for i, length in enumerate(int(v) for v in lengths):
        frames = x[i : i + 1, :length]
        want = expected[i : i + 1, :length]
        seq = max(seq, _diff(sequence(frames, sequence.zeros(1))[0], want))
        st = max(st, _diff(step.stepped(frames), want))
        t1 = max(t1, _diff(sequence.stepped(frames, sequence=True), want))
        for _ in range(chunkings):
            pieces = int(rng.integers(1, max(2, length // 4)))
            cuts: list[int] = rng.integers(1, length, size=pieces).tolist() if length > 1 else []
            ch = max(ch, _diff(sequence.chunked(frames, cuts), want))
    shortest = int(lengths.min())
    batched = _diff(step.stepped(x[:, :shortest]), expected[:, :shortest])
    parity = Parity(seq, st, t1, batched, ch, len(lengths), chunkings)
    _log.info("parity: %s", parity)
    if parity.worst() > tolerance:
        raise ParityError(
            f"ONNX differs from Keras by {parity.worst():.3g} > {tolerance}: {parity}"
        )
    return parity
