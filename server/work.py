"""What the scheduler works on: sessions, their queued work, groups of batch entries, and the sinks
their answers go to. A leaf module (numpy and the standard library only), so every other module
can name these types without an import cycle.

A session's hot fields (positions, last use, groups in flight, generation) live in the columns of
its table, one numpy array per field indexed by the session's slot, so a batch of hundreds of
sessions is checked and advanced with array operations; ``Session`` reads and writes its own row.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "Action",
    "Columns",
    "EndReason",
    "Graph",
    "Group",
    "RowSink",
    "Session",
    "Sink",
    "StepResult",
    "Work",
]

Action = Literal["step", "reset", "close"]
EndReason = Literal["closed", "expired", "moved"]
Graph = Literal["step", "sequence"]


class Columns:
    """Per-slot fields of every session, one array each (``capacity`` rows)."""

    def __init__(self, capacity: int) -> None:
        self.position = np.zeros(capacity, np.int64)  # frames applied
        self.accepted = np.zeros(capacity, np.int64)  # position after every queued request
        self.last_used = np.zeros(capacity, np.float64)
        self.queued = np.zeros(capacity, np.bool_)  # has work queued or in a running round
        self.holds = np.zeros(capacity, np.int32)  # batch groups queued or running with it
        self.last_group = np.zeros(capacity, np.int64)  # number of the latest such group
        # Bumped whenever a slot is given back, so (slot, generation) names one session for good.
        self.generation = np.zeros(capacity, np.int64)
        self.synced = np.full(capacity, -1, np.int64)  # head last written to the shared store
        self.saved = np.zeros(capacity, np.int64)  # position of its last full checkpoint there
        # Loaded from a checkpoint that may be behind what was applied, and not advanced since.
        self.restored = np.zeros(capacity, np.bool_)

    def detach(self, slot: int) -> Columns:
        """A one-row copy of ``slot``'s fields: what an ended session keeps when its slot goes
        back to the bank (and may be another session's a moment later)."""
        row = Columns(1)
        for name, column in vars(self).items():
            getattr(row, name)[0] = column[slot]
        return row

    def reset(self, slot: int, position: int, last_used: float) -> None:
        """A fresh row for a session taking ``slot``."""
        self.position[slot] = self.accepted[slot] = position
        self.last_used[slot] = last_used
        self.queued[slot] = False
        self.holds[slot] = self.last_group[slot] = 0
        self.synced[slot] = -1
        self.saved[slot] = 0
        self.restored[slot] = False


@dataclass(slots=True, eq=False)
class Session:
    """A live (or ended) session: its id, owner and slot, and accessors of its row in ``columns``
    (``row`` is the slot while it lives; once it ends, row 0 of a detached copy)."""

    id: str
    slot: int
    columns: Columns
    row: int
    generation: int = 0
    owner: str = ""  # the principal that opened it ("" when authentication is off)
    # Work items in order, made on first use (an empty deque is 760 B, and most sessions are idle
    # most of the time).
    pending: deque[Work] | None = None
    ended: EndReason | None = None

    @property
    def position(self) -> int:
        return int(self.columns.position[self.row])

    @position.setter
    def position(self, value: int) -> None:
        self.columns.position[self.row] = value

    @property
    def accepted(self) -> int:
        return int(self.columns.accepted[self.row])

    @accepted.setter
    def accepted(self, value: int) -> None:
        self.columns.accepted[self.row] = value

    @property
    def last_used(self) -> float:
        return float(self.columns.last_used[self.row])

    @last_used.setter
    def last_used(self, value: float) -> None:
        self.columns.last_used[self.row] = value

    @property
    def holds(self) -> int:
        return int(self.columns.holds[self.row])

    @property
    def synced(self) -> int:
        return int(self.columns.synced[self.row])

    @synced.setter
    def synced(self, value: int) -> None:
        self.columns.synced[self.row] = value

    @property
    def saved(self) -> int:
        return int(self.columns.saved[self.row])

    @saved.setter
    def saved(self, value: int) -> None:
        self.columns.saved[self.row] = value

    @property
    def restored(self) -> bool:
        """Loaded from a checkpoint (snapshot, shared store) and not advanced since."""
        return bool(self.columns.restored[self.row])

    @restored.setter
    def restored(self, value: bool) -> None:
        self.columns.restored[self.row] = value

    @property
    def scheduled(self) -> bool:
        """In the scheduler's ready queue or in a running round."""
        return bool(self.columns.queued[self.row])

    @scheduled.setter
    def scheduled(self, value: bool) -> None:
        self.columns.queued[self.row] = value


@dataclass(slots=True)
class StepResult:
    session_id: str
    position: int
    probabilities: np.ndarray  # [frames, classes]
    next_position: int
    replayed: bool = False
    ended: bool = False
    version: int = 0  # the model version that answered


class Sink(Protocol):
    """Where a work item's outcome goes: an ``asyncio.Future``, or a batch entry's sink."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...  # a StepResult, or a Session for controls
    def set_exception(self, exception: BaseException, /) -> None: ...


class RowSink(Protocol):
    """Where a group's outcomes go: rows of a batch's result arrays."""

    def fill(
        self, rows: np.ndarray, probabilities: np.ndarray, next_positions: np.ndarray, version: int
    ) -> None: ...

    def fail_rows(self, rows: np.ndarray, exc: Exception) -> None: ...


@dataclass(slots=True, eq=False)
class Work:
    session: Session
    position: int
    frames: np.ndarray | None  # [T, F]; None for a control action
    future: Sink
    action: Action = "step"
    end: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    prefix: np.ndarray | None = None  # replayed rows of frames applied before this request ran


@dataclass(slots=True, eq=False)
class Group:
    """One frame for each of many sessions, each exactly at its position: the fast lane of a
    StepBatch. Admission counted the group in the sessions' ``holds``, so nothing else runs for
    them until the group's round finishes; results go straight into the batch's arrays at
    ``rows``. Sessions are named by (slot, generation): a slot given back meanwhile shows."""

    slots: np.ndarray  # intp: the sessions' slots
    generations: np.ndarray  # int64: their generations at admission
    positions: np.ndarray  # int64: the position of each frame
    frames: np.ndarray  # [n, F]
    rows: np.ndarray  # intp: the entries of ``batch`` these are
    batch: RowSink
    seq: int  # groups are numbered in arrival order
    after: int  # the latest earlier group sharing a session with this one (0: none)
    version: int = 0  # the model version whose sessions these are
    queued_at: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.slots)

    def subset(self, keep: np.ndarray) -> Group:
        """The same group restricted to the entries ``keep`` (a boolean mask or indices)."""
        return Group(
            self.slots[keep],
            self.generations[keep],
            self.positions[keep],
            self.frames[keep],
            self.rows[keep],
            self.batch,
            self.seq,
            self.after,
            self.version,
            self.queued_at,
        )
