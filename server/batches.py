"""Many sessions in one request: the columnar results of a StepBatch and the sinks that fill them.

The scheduler answers each piece of work through a sink with the three methods of an
``asyncio.Future`` it uses (``done``, ``set_result``, ``set_exception``). A batch entry's sink
writes its row straight into the batch's result arrays, and the batch's one future resolves when
the last entry settles, so a batch of 256 sessions costs one future and one wakeup, not 256.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from .work import StepResult

__all__ = ["BatchResult", "EntrySink", "PendingBatch"]


@dataclass(slots=True)
class BatchResult:
    probabilities: np.ndarray  # [entries, classes]; zeros for failed entries
    next_positions: np.ndarray  # uint64 [entries]
    replayed: np.ndarray  # bool [entries]
    versions: np.ndarray  # uint64 [entries]: the model version that answered (0: failed)
    errors: dict[int, Exception] = field(default_factory=dict)


class PendingBatch:
    """The result of a batch being filled in; ``future`` resolves once every entry settled."""

    def __init__(self, entries: int, classes: int) -> None:
        self.result = BatchResult(
            np.zeros((entries, classes), np.float32),
            np.zeros(entries, np.uint64),
            np.zeros(entries, np.bool_),
            np.zeros(entries, np.uint64),
        )
        self.future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._left = entries
        if not entries:
            self.future.set_result(self.result)

    def sink(self, index: int) -> EntrySink:
        return EntrySink(self, index)

    def fail(self, index: int, exc: Exception) -> None:
        result = self.result
        result.errors[index] = exc
        position = getattr(exc, "expected", None)
        if position is None:
            position = getattr(exc, "position", 0)
        result.next_positions[index] = position
        self._settled()

    def fill(
        self, rows: np.ndarray, probabilities: np.ndarray, next_positions: np.ndarray, version: int
    ) -> None:
        """Many entries at once (the scheduler's fast lane)."""
        result = self.result
        result.probabilities[rows] = probabilities
        result.next_positions[rows] = next_positions
        result.versions[rows] = version
        self._settled(len(rows))

    def fail_rows(self, rows: np.ndarray, exc: Exception) -> None:
        for index in rows.tolist():
            self.result.errors[index] = exc
        self._settled(len(rows))

    def _settled(self, count: int = 1) -> None:
        self._left -= count
        if not self._left and not self.future.done():
            self.future.set_result(self.result)


class EntrySink:
    """Future-like handle of one entry, given to the scheduler as a work item's future."""

    __slots__ = ("_batch", "_done", "_index")

    def __init__(self, batch: PendingBatch, index: int) -> None:
        self._batch = batch
        self._index = index
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, value: object) -> None:
        assert isinstance(value, StepResult)
        self._done = True
        result = self._batch.result
        result.probabilities[self._index] = value.probabilities[-1]  # entries are one frame
        result.next_positions[self._index] = value.next_position
        result.replayed[self._index] = value.replayed
        result.versions[self._index] = value.version
        self._batch._settled()

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        assert isinstance(exc, Exception)
        self._batch.fail(self._index, exc)
