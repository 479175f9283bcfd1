"""The data plane: what any front (gRPC today, another protocol tomorrow) calls.

Plain Python + numpy: requests come in as ids, positions and ``float32`` arrays, results go out as
dataclasses, failures as ``errors.SeqServeError`` subclasses.

Every session call takes the caller's ``principal`` (a plain str; "" when authentication is off).
A session belongs to the principal that opened it: to anyone else it is ``unknown``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .batches import BatchResult, PendingBatch
from .errors import (
    BadRequest,
    CapacityExceeded,
    Draining,
    PositionError,
    SeqServeError,
    SessionExists,
)
from .model import ModelSpec
from .runtime import Runtime
from .scheduler import BatchObserver, Group, Scheduler, StepResult, Work, gap_error
from .sessions import Session, SessionTable
from .settings import Settings
from .states import StateBank

__all__ = ["BatchResult", "Engine", "SessionStatus", "StepResult"]

log = logging.getLogger("seqserve.engine")


@dataclass(frozen=True, slots=True)
class SessionStatus:
    session_id: str
    position: int
    idle_seconds: float
    expires_in_seconds: float
    closed: bool = False


class Engine:
    def __init__(self, spec: ModelSpec, runtime: Runtime, settings: Settings,
                 observer: BatchObserver | None = None) -> None:
        self.spec = spec
        self.runtime = runtime
        self.settings = settings
        self.observer = observer or BatchObserver()
        self.bank = StateBank(spec, settings.max_sessions, settings.replay_window)
        self.table = SessionTable(self.bank, max_sessions=settings.max_sessions,
                                  idle_timeout=settings.session_idle_timeout,
                                  max_per_owner=settings.max_sessions_per_principal)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="seqserve-infer")
        self.scheduler = Scheduler(runtime, self.table, self.executor,
                                   max_batch=settings.max_batch,
                                   max_wait=settings.max_wait_ms / 1000.0,
                                   inline_batch=settings.inline_batch, observer=self.observer)
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="seqserve-expiry")

    async def drain(self) -> None:
        """Refuse new work, then wait until every accepted request has been answered."""
        self.draining = True
        await self.scheduler.idle()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.scheduler.stop()
        self.executor.shutdown(wait=True)

    async def _sweep(self) -> None:
        interval = min(1.0, self.settings.session_idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def expire(self) -> int:
        expired = self.table.expired()
        for session in expired:
            self.table.end(session, "expired")
            self.observer.session_event("expired")
        if expired:
            log.debug("expired %d idle sessions", len(expired))
        return len(expired)

    # -- validation ---------------------------------------------------------------------------

    def check_frames(self, frames: np.ndarray, what: str = "frames", *,
                     finite: bool = True) -> np.ndarray:
        if frames.ndim != 2 or frames.shape[0] < 1:
            raise BadRequest(f"{what}: need at least one frame", reason="bad_frames")
        if frames.shape[1] != self.spec.features:
            raise BadRequest(f"{what}: {frames.shape[1]} features per frame, model "
                             f"{self.spec.name!r} expects {self.spec.features}",
                             reason="feature_count")
        if frames.shape[0] > self.settings.max_frames_per_request:
            raise BadRequest(f"{what}: {frames.shape[0]} frames, at most "
                             f"{self.settings.max_frames_per_request} per request",
                             reason="too_many_frames")
        if finite and not np.isfinite(frames).all():
            bad = int(np.argwhere(~np.isfinite(frames))[0][0])
            raise BadRequest(f"{what}: frame {bad} holds NaN or Inf", reason="non_finite")
        return frames

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Draining("server is draining; retry on another replica or after restart")

    # -- sessions -----------------------------------------------------------------------------

    def status(self, session: Session) -> SessionStatus:
        return SessionStatus(session.id, session.position,
                             max(0.0, self.table.clock() - session.last_used),
                             self.table.expires_in(session), bool(session.ended))

    def open(self, session_id: str | None = None, principal: str = "") -> SessionStatus:
        self._refuse_if_draining()
        return self.status(self._create(session_id or None, principal))

    def _create(self, session_id: str | None, principal: str) -> Session:
        try:
            session = self.table.create(session_id, owner=principal)
        except CapacityExceeded:
            self.observer.session_event("refused")
            raise
        self.observer.session_event("opened")
        return session

    def get(self, session_id: str, principal: str = "") -> SessionStatus:
        return self.status(self.table.get(session_id, principal))

    async def reset(self, session_id: str, principal: str = "") -> SessionStatus:
        self._refuse_if_draining()
        session = self.table.get(session_id, principal)
        self.table.touch(session)
        await self.scheduler.control(session, "reset")
        return self.status(session)

    async def close(self, session_id: str, principal: str = "") -> SessionStatus:
        # Refused while draining like every other change: the session is in the snapshot, and a
        # close queued behind the stopped scheduler would otherwise hang until the server stops.
        self._refuse_if_draining()
        session = self.table.get(session_id, principal)
        await self.scheduler.control(session, "close")
        return self.status(session)

    # -- steps --------------------------------------------------------------------------------

    def submit(self, session_id: str, position: int, frames: np.ndarray, *, start: bool = False,
               end: bool = False, principal: str = "") -> asyncio.Future[StepResult]:
        """Queue frames for a session; the future gives the outputs or a SeqServeError."""
        self._refuse_if_draining()
        self.check_frames(frames)
        session = self._admit(session_id, position, len(frames), start, principal)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self.scheduler.submit(Work(session, position, frames, future, end=end))
        return future

    def submit_batch(self, session_ids: Sequence[str], positions: Sequence[int],
                     frames: np.ndarray, *, start: bool = False,
                     principal: str = "") -> asyncio.Future[BatchResult]:
        """One frame for each of many sessions. A malformed batch raises; otherwise every entry
        is admitted or failed on its own and the future gives the columnar results."""
        self._refuse_if_draining()
        entries = len(session_ids)
        if len(positions) != entries:
            raise BadRequest(f"{entries} session ids but {len(positions)} positions",
                             reason="bad_request")
        if entries:
            self.check_frames(frames, finite=False)  # a NaN fails its own entry only
        if frames.shape[0] != entries:
            raise BadRequest(f"{frames.shape[0]} frames for {entries} session ids: a batch has "
                             "one frame per entry", reason="bad_frames")
        finite = np.isfinite(frames).all(axis=1).tolist() if entries else []
        ids, wanted = list(session_ids), list(positions)
        check_dups = len(set(ids)) != entries
        batch = PendingBatch(entries, self.spec.classes)
        seen: set[str] = set()
        # The fast lane: sessions with nothing queued, exactly at their position, run as one
        # group with no per-entry future. Anything else queues on its own, behind the session's
        # earlier work.
        fast: list[Session] = []
        rows: list[int] = []
        at: list[int] = []
        slots: list[int] = []
        get = self.table.find
        seq = self.scheduler.next_group()
        after = 0
        for i in range(entries):
            session_id, position = ids[i], wanted[i]
            session = get(session_id)
            if session is None and start and position == 0 and finite[i]:
                try:
                    session = self._create(session_id, principal)
                except SeqServeError as exc:  # bad id, session cap
                    batch.fail(i, exc)
                    continue
            if check_dups:
                if session_id in seen:
                    batch.fail(i, BadRequest(f"session {session_id!r} appears twice in one "
                                             "batch", reason="duplicate_session"))
                    continue
                seen.add(session_id)
            if (session is not None and position == session.accepted and not session.pending
                    and not session.scheduled and session.owner == principal and finite[i]):
                session.accepted = position + 1
                session.holds += 1
                if session.last_group > after:
                    after = session.last_group
                session.last_group = seq
                fast.append(session)
                rows.append(i)
                at.append(position)
                slots.append(session.slot)
                continue
            try:
                if not finite[i]:
                    raise BadRequest(f"entry {i}: the frame holds NaN or Inf", reason="non_finite")
                session = self._admit(session_id, position, 1, start, principal)
            except SeqServeError as exc:
                batch.fail(i, exc)
                continue
            self.scheduler.submit(Work(session, position, frames[i : i + 1], batch.sink(i)))
        if fast:
            self.table.touch_many(fast)
            index = np.array(rows, np.intp)
            self.scheduler.submit_group(Group(
                fast, np.array(slots, np.intp), np.array(at, np.int64),
                frames if len(rows) == entries else frames[index], index, batch, seq, after))
        return batch.future

    def _admit(self, session_id: str, position: int, count: int, start: bool,
               principal: str) -> Session:
        """The session these frames go to (created when ``start``), after the checks that need
        no queue: ownership, and that ``position`` leaves no gap after what is accepted."""
        session = self.table.find(session_id)
        if session is not None and session.owner != principal:
            if start:  # ids are one namespace: say it is taken, nothing more
                raise SessionExists(f"session {session_id!r} already exists")
            self.table.get(session_id, principal)  # raises unknown
        if session is None:
            if not start:
                self.table.get(session_id, principal)  # raises unknown / expired / closed
            if position != 0:
                raise PositionError(f"a new session starts at position 0, not {position}",
                                    reason="position_gap", expected=0)
            session = self._create(session_id, principal)
        elif position > session.accepted:
            raise gap_error(session, position)
        self.table.touch(session)
        if position + count > session.accepted:
            session.accepted = position + count
        return session

    async def step(self, session_id: str, position: int, frames: np.ndarray, *,
                   start: bool = False, end: bool = False, principal: str = "") -> StepResult:
        return await self.submit(session_id, position, frames, start=start, end=end,
                                 principal=principal)

    # -- whole sequences ----------------------------------------------------------------------

    async def predict(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-step probabilities ``[T_i, C]`` of independent sequences, from zero state."""
        self._refuse_if_draining()
        if not sequences:
            raise BadRequest("no sequences given", reason="bad_frames")
        total = 0
        for i, frames in enumerate(sequences):
            self.check_frames(frames, what=f"sequence {i}")
            total += len(frames)
        if total > self.settings.max_predict_frames:
            raise BadRequest(f"{total} frames in all, at most {self.settings.max_predict_frames} "
                             "per Predict call", reason="too_many_frames")
        by_length: dict[int, list[int]] = {}
        for i, frames in enumerate(sequences):
            by_length.setdefault(len(frames), []).append(i)
        results: list[np.ndarray | None] = [None] * len(sequences)
        loop = asyncio.get_running_loop()
        for indices in by_length.values():
            for lo in range(0, len(indices), self.settings.max_batch):
                chunk = indices[lo : lo + self.settings.max_batch]
                batch = np.stack([sequences[i] for i in chunk])
                probs, _ = await loop.run_in_executor(
                    self.executor, self.runtime.sequence, batch,
                    self.runtime.zero_states(len(chunk)))
                for row, i in enumerate(chunk):
                    results[i] = probs[row]
        return [r for r in results if r is not None]
