"""How a scheduler round's outcomes reach their callers.

Without a shared store (``Immediate``) every answer is given at once. With one (``WriteBack``),
answers wait for the store write that covers them: after each round the sessions it touched are
recorded with one ``Store.commit`` (the head always; state and output ring when the session is
new there, was reset, or ran ``checkpoint_every`` frames since its last full checkpoint, and on
close), and only then are its answers given. One write is in flight at a time; rounds finishing
meanwhile join the next one, so the store sees fewer, larger writes the busier it gets and rounds
never wait for it. A session the store says another replica owns now is dropped here, and its
answers become ``session_moved``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import numpy as np

from .observer import BatchObserver
from .sessions import SessionTable, gone_error
from .states import StateBank
from .store import CommitOutcome, Commits, Store
from .work import Group, Session, Sink

__all__ = ["Answers", "Immediate", "WriteBack", "checkpoint_commits", "resolve"]

log = logging.getLogger("seqserve.writeback")


def resolve(sink: Sink, value: object) -> None:
    if not sink.done():
        sink.set_result(value)


def fail(sink: Sink, exc: BaseException) -> None:
    if not sink.done():
        sink.set_exception(exc)


class Answers(Protocol):
    immediate: bool  # answers are given when the round is applied, with nothing to wait for

    def answer(self, sink: Sink, value: object, session: Session) -> None:
        """Give ``value`` to ``sink`` once what ``session`` did is recorded."""
        ...

    def fill(self, group: Group, probabilities: np.ndarray) -> None:
        """Give a group's outputs (its sessions advanced by one frame) once recorded."""
        ...

    def round_done(self) -> None:
        """A round finished: record what it did."""
        ...

    async def settle(self) -> None:
        """Return once every answer given to this object has been delivered."""
        ...

    async def save_all(self, sessions: list[Session]) -> int:
        """Checkpoint these sessions in full (a drain); how many were written."""
        ...


class Immediate:
    """No shared store: nothing to wait for."""

    immediate = True

    def answer(self, sink: Sink, value: object, session: Session) -> None:
        resolve(sink, value)

    def fill(self, group: Group, probabilities: np.ndarray) -> None:
        group.batch.fill(group.rows, probabilities, group.positions + 1, group.version)

    def round_done(self) -> None:
        pass

    async def settle(self) -> None:
        pass

    async def save_all(self, sessions: list[Session]) -> int:
        return 0  # nowhere to save them: a snapshot file is the app's business


def checkpoint_commits(
    sessions: list[Session], bank: StateBank, every: int
) -> tuple[Commits, np.ndarray]:
    """What a store write records for these sessions: the head always; the state and output
    ring when the session is new there, was reset, or ran ``every`` frames since its last full
    checkpoint (never for an ended one, whose slot is gone). Also says which are full."""
    n = len(sessions)
    positions = np.fromiter((s.position for s in sessions), np.int64, n)
    synced = np.fromiter((s.synced for s in sessions), np.int64, n)
    saved = np.fromiter((s.saved for s in sessions), np.int64, n)
    live = np.fromiter((s.ended is None for s in sessions), np.bool_, n)
    full = live & ((synced < 0) | (positions - saved >= every) | (positions < saved))
    record = 4 * (bank.states.shape[1] + bank.ring.shape[1] * bank.ring.shape[2])
    data = b""
    if full.any():
        slots = np.fromiter((s.slot for s in sessions), np.intp, n)[full]
        data = np.concatenate(
            [bank.states[slots], bank.ring[slots].reshape(len(slots), -1)], axis=1
        ).tobytes()
    lines = "".join(
        [
            f"{s.id}\t{old}\t{p}\t{int(s.ended == 'closed')}\t{int(f)}\t{s.owner}\n"
            for s, old, p, f in zip(
                sessions, synced.tolist(), positions.tolist(), full.tolist(), strict=True
            )
        ]
    )
    return Commits(lines, data, record, n), full


class WriteBack:
    immediate = False

    def __init__(
        self,
        store: Store,
        table: SessionTable,
        observer: BatchObserver,
        checkpoint_every: int = 1,
    ) -> None:
        self.store = store
        self.table = table
        self.observer = observer
        self.checkpoint_every = max(1, checkpoint_every)
        self._answers: list[tuple[Sink, object, Session]] = []
        self._filled: list[tuple[Group, list[Session], np.ndarray]] = []
        self._touched: dict[Session, None] = {}
        self._writing: asyncio.Task[None] | None = None

    def answer(self, sink: Sink, value: object, session: Session) -> None:
        self._touched[session] = None
        self._answers.append((sink, value, session))

    def fill(self, group: Group, probabilities: np.ndarray) -> None:
        sessions = self.table.at_slots(group.slots)
        self._touched.update(dict.fromkeys(sessions))
        self._filled.append((group, sessions, probabilities))

    def round_done(self) -> None:
        if self._touched and (self._writing is None or self._writing.done()):
            self._writing = asyncio.create_task(self._write())

    async def settle(self) -> None:
        while self._writing is not None:
            writing, self._writing = self._writing, None
            with contextlib.suppress(Exception):
                await writing
            if self._touched:  # a round finished while the last write ran
                self.round_done()

    async def save_all(self, sessions: list[Session]) -> int:
        changed = [s for s in sessions if s.saved != s.position or s.synced != s.position]
        if not changed:
            return 0
        commits, _ = checkpoint_commits(changed, self.table.bank, 1)
        written = await self.store.commit(commits)
        if written is None:
            log.error(
                "drain: the session store is unreachable; %d sessions were not saved there",
                len(changed),
            )
            return 0
        return sum(outcome is CommitOutcome.WRITTEN for outcome in written)

    async def _write(self) -> None:
        while self._touched:
            touched, answers, filled = list(self._touched), self._answers, self._filled
            self._touched, self._answers, self._filled = {}, [], []
            commits, full = checkpoint_commits(touched, self.table.bank, self.checkpoint_every)
            heads = [session.position for session in touched]
            written = None
            try:
                written = await self.store.commit(commits)
            finally:  # cancelled (stopping): answer from memory
                self._written(touched, heads, full, written, answers, filled)

    def _written(
        self,
        touched: list[Session],
        heads: list[int],
        full: np.ndarray,
        written: list[CommitOutcome] | None,
        answers: list[tuple[Sink, object, Session]],
        filled: list[tuple[Group, list[Session], np.ndarray]],
    ) -> None:
        moved: set[Session] = set()
        for session, outcome, head, is_full in zip(
            touched, written or (), heads, full.tolist(), strict=False
        ):
            if outcome is CommitOutcome.WRITTEN:
                if session.ended is None:
                    session.synced = head
                    if is_full:
                        session.saved = head
            elif outcome is CommitOutcome.MISSING:
                if session.ended is None:
                    session.synced = -1  # the store lost it: a full checkpoint next time
            elif session.ended in (None, "moved"):
                moved.add(session)
                if session.ended is None:
                    self.table.end(session, "moved")
                    self.observer.session_event("moved")
        for sink, value, session in answers:
            if session in moved:
                fail(sink, gone_error(session))
            else:
                resolve(sink, value)
        for group, sessions, probabilities in filled:
            _fill(group, sessions, probabilities, moved)


def _fill(group: Group, sessions: list[Session], probs: np.ndarray, moved: set[Session]) -> None:
    if not moved or not any(s in moved for s in sessions):
        group.batch.fill(group.rows, probs, group.positions + 1, group.version)
        return
    for j, session in enumerate(sessions):
        row = group.rows[j : j + 1]
        if session in moved:
            group.batch.fail_rows(row, gone_error(session))
        else:
            group.batch.fill(row, probs[j : j + 1], group.positions[j : j + 1] + 1, group.version)
