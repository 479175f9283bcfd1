"""The data plane: what any front (gRPC today, another protocol tomorrow) calls.

Plain Python + numpy: requests come in as ids, positions and ``float32`` arrays, results go out as
dataclasses, failures as ``errors.SeqServeError`` subclasses.

Every session call takes the caller's ``principal`` (a plain str; "" when authentication is off).
A session belongs to the principal that opened it: to anyone else it is ``unknown``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batches import BatchResult, PendingBatch
from .errors import (
    BadRequest,
    CapacityExceeded,
    Draining,
    PositionError,
    SeqServeError,
    SessionExists,
    SessionNotFound,
)
from .model import ModelSpec
from .runtime import Runtime
from .scheduler import BatchObserver, Group, Scheduler, StepResult, Work, gap_error
from .sessions import Session, SessionTable, check_session_id
from .settings import Settings
from .states import StateBank
from .store import Checkpoint, RedisStore, StoreUnavailable, checkpoint_commits

__all__ = ["BatchResult", "Engine", "SessionStatus", "StepResult"]

log = logging.getLogger("seqserve.engine")


@dataclass(slots=True, eq=False)
class _Backlogged:
    """A batch waiting for claims (or for batches ahead of it) before its admission."""

    left: int  # claims still outstanding
    errors: dict[str, Exception]  # what a claim failed with, by session id
    admit: Callable[[dict[str, Exception]], None]


@dataclass(frozen=True, slots=True)
class _Waiter:
    admit: Callable[[], None]
    fail: Callable[[Exception], None]
    creating: bool  # a start at position 0: may go ahead in memory when the store is down


def _duplicate(session_id: str) -> BadRequest:
    return BadRequest(
        f"session {session_id!r} appears twice in one batch", reason="duplicate_session"
    )


def make_store(settings: Settings, spec: ModelSpec) -> RedisStore | None:
    if settings.store == "memory":
        return None
    replica = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
    return RedisStore(
        settings.store,
        namespace=f"seqserve:{spec.name}:{spec.version}",
        replica=replica,
        ttl=settings.session_idle_timeout,
        timeout=settings.store_timeout,
        retry_after=settings.store_retry,
    )


@dataclass(frozen=True, slots=True)
class SessionStatus:
    session_id: str
    position: int
    idle_seconds: float
    expires_in_seconds: float
    closed: bool = False
    rolled_back: bool = False  # position is a checkpoint behind frames that were applied


class Engine:
    def __init__(
        self,
        spec: ModelSpec,
        runtime: Runtime,
        settings: Settings,
        observer: BatchObserver | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.settings = settings
        self.observer = observer or BatchObserver()
        self.bank = StateBank(spec, settings.max_sessions, settings.replay_window)
        self.table = SessionTable(
            self.bank,
            max_sessions=settings.max_sessions,
            idle_timeout=settings.session_idle_timeout,
            max_per_owner=settings.max_sessions_per_principal,
        )
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="seqserve-infer")
        self.store = make_store(settings, spec)
        if self.store is not None:
            self.store.observe = self.observer.store_call
        self.scheduler = Scheduler(
            runtime,
            self.table,
            self.executor,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000.0,
            inline_batch=settings.inline_batch,
            observer=self.observer,
            store=self.store,
            checkpoint_every=settings.checkpoint_every,
        )
        # Sessions being claimed from the store: what to admit, in arrival order, once it is.
        self._claims: dict[str, list[_Waiter]] = {}
        self._to_claim: list[tuple[str, str]] = []  # (id, principal) for the next store call
        self._backlog: deque[_Backlogged] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="seqserve-expiry")

    async def drain(self) -> None:
        """Refuse new work, then wait until every accepted request has been answered."""
        self.draining = True
        while self._claims or self._backlog or self._tasks:  # accepted, waiting on the store
            await asyncio.sleep(0.01)
        await self.scheduler.idle()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.scheduler.stop()
        self.executor.shutdown(wait=True)
        if self.store is not None:
            await self.store.close()

    async def save_to_store(self) -> int:
        """Write every session's state to the shared store (on drain, after the scheduler
        stopped), so another replica resumes them with nothing lost. Returns how many."""
        if self.store is None:
            return 0
        sessions = [s for s in self.table if s.saved != s.position or s.synced != s.position]
        if not sessions:
            return 0
        commits, _ = checkpoint_commits(sessions, self.bank, 1)
        written = await self.store.commit(commits)
        if written is None:
            log.error(
                "drain: the session store is unreachable; %d sessions were not saved there",
                len(sessions),
            )
            return 0
        return written.count("1")

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

    def check_frames(
        self, frames: np.ndarray, what: str = "frames", *, finite: bool = True
    ) -> np.ndarray:
        if frames.ndim != 2 or frames.shape[0] < 1:
            raise BadRequest(f"{what}: need at least one frame", reason="bad_frames")
        if frames.shape[1] != self.spec.features:
            raise BadRequest(
                f"{what}: {frames.shape[1]} features per frame, model "
                f"{self.spec.name!r} expects {self.spec.features}",
                reason="feature_count",
            )
        if frames.shape[0] > self.settings.max_frames_per_request:
            raise BadRequest(
                f"{what}: {frames.shape[0]} frames, at most "
                f"{self.settings.max_frames_per_request} per request",
                reason="too_many_frames",
            )
        if finite and not np.isfinite(frames).all():
            bad = int(np.argwhere(~np.isfinite(frames))[0][0])
            raise BadRequest(f"{what}: frame {bad} holds NaN or Inf", reason="non_finite")
        return frames

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Draining("server is draining; retry on another replica or after restart")

    # -- sessions -----------------------------------------------------------------------------

    def status(self, session: Session) -> SessionStatus:
        return SessionStatus(
            session.id,
            session.position,
            max(0.0, self.table.clock() - session.last_used),
            self.table.expires_in(session),
            bool(session.ended),
            session.restored,
        )

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
        """A session held here (no store lookup)."""
        return self.status(self.table.get(session_id, principal))

    async def lookup(self, session_id: str, principal: str = "") -> SessionStatus:
        """Like ``get``, but with a shared store a session held elsewhere is read from there
        (not taken over: its next step does that), so a client can resume on any replica."""
        if self.store is None or self.table.find(session_id) is not None:
            return self.get(session_id, principal)
        check_session_id(session_id)
        found = await self.store.peek(session_id, principal)
        if found is None:
            return self.get(session_id, principal)  # unknown, or a tombstone here
        head, closed, expires_in, saved = found
        if closed:
            raise SessionNotFound(
                f"session {session_id!r} closed at position {head}", reason="closed", position=head
            )
        # A step here claims the session from its checkpoint: that is where it resumes.
        return SessionStatus(
            session_id,
            saved,
            max(0.0, self.settings.session_idle_timeout - expires_in),
            expires_in,
            rolled_back=head > saved,
        )

    async def reset(self, session_id: str, principal: str = "") -> SessionStatus:
        self._refuse_if_draining()
        await self._held(session_id, principal)
        session = self.table.get(session_id, principal)
        self.table.touch(session)
        await self.scheduler.control(session, "reset")
        return self.status(session)

    async def close(self, session_id: str, principal: str = "") -> SessionStatus:
        # Refused while draining like every other change: the session is in the snapshot, and a
        # close queued behind the stopped scheduler would otherwise hang until the server stops.
        self._refuse_if_draining()
        await self._held(session_id, principal)
        session = self.table.get(session_id, principal)
        await self.scheduler.control(session, "close")
        return self.status(session)

    # -- steps --------------------------------------------------------------------------------

    def submit(
        self,
        session_id: str,
        position: int,
        frames: np.ndarray,
        *,
        start: bool = False,
        end: bool = False,
        principal: str = "",
    ) -> asyncio.Future[StepResult]:
        """Queue frames for a session; the future gives the outputs or a SeqServeError."""
        self._refuse_if_draining()
        self.check_frames(frames)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        if self.store is None:
            session = self._admit(session_id, position, len(frames), start, principal)
            self.scheduler.submit(Work(session, position, frames, future, end=end))
            return future

        def admit() -> None:
            session = self._admit(session_id, position, len(frames), start, principal)
            self.scheduler.submit(Work(session, position, frames, future, end=end))

        if self._must_claim(session_id):
            self._after_claim(
                session_id, principal, start and position == 0, admit, future.set_exception
            )
        else:
            try:
                admit()
            except PositionError as exc:
                self._recheck(session_id, principal, exc, admit, future.set_exception)
        return future

    def submit_batch(
        self,
        session_ids: Sequence[str],
        positions: Sequence[int],
        frames: np.ndarray,
        *,
        start: bool = False,
        principal: str = "",
    ) -> asyncio.Future[BatchResult]:
        """One frame for each of many sessions. A malformed batch raises; otherwise every entry
        is admitted or failed on its own and the future gives the columnar results."""
        self._refuse_if_draining()
        entries = len(session_ids)
        if len(positions) != entries:
            raise BadRequest(
                f"{entries} session ids but {len(positions)} positions", reason="bad_request"
            )
        if entries:
            self.check_frames(frames, finite=False)  # a NaN fails its own entry only
        if frames.shape[0] != entries:
            raise BadRequest(
                f"{frames.shape[0]} frames for {entries} session ids: a batch has "
                "one frame per entry",
                reason="bad_frames",
            )
        finite = np.isfinite(frames).all(axis=1).tolist() if entries else []
        ids, wanted = list(session_ids), list(positions)
        batch = PendingBatch(entries, self.spec.classes)
        if self.store is not None:
            missing = {i for i in ids if i in self._claims or self.table.find(i) is None}
            if missing or self._backlog:
                # Claim what is not held here first; batches are admitted in arrival order.
                waiting = _Backlogged(
                    len(missing),
                    {},
                    lambda errors: self._admit_batch(
                        batch, ids, wanted, frames, finite, start, principal, errors
                    ),
                )
                self._backlog.append(waiting)
                for session_id in missing:
                    self._after_claim(
                        session_id,
                        principal,
                        False,
                        functools.partial(self._unblock, waiting, session_id, None),
                        functools.partial(self._unblock, waiting, session_id),
                    )
                self._pump()
                return batch.future
        self._admit_batch(batch, ids, wanted, frames, finite, start, principal, {})
        return batch.future

    def _unblock(self, waiting: _Backlogged, session_id: str, error: Exception | None) -> None:
        if error is not None:
            waiting.errors[session_id] = error
        waiting.left -= 1
        self._pump()

    def _pump(self) -> None:
        while self._backlog and not self._backlog[0].left:
            waiting = self._backlog.popleft()
            waiting.admit(waiting.errors)

    def _admit_batch(
        self,
        batch: PendingBatch,
        ids: list[str],
        wanted: list[int],
        frames: np.ndarray,
        finite: list[bool],
        start: bool,
        principal: str,
        errors: dict[str, Exception],
    ) -> None:
        entries = len(ids)
        check_dups = len(set(ids)) != entries
        seen: set[str] = set()
        # The fast lane: sessions with nothing queued, exactly at their position, run as one
        # group with no per-entry future. Anything else queues on its own, behind the session's
        # earlier work.
        fast: list[Session] = []
        rows: list[int] = []
        at: list[int] = []
        slots: list[int] = []
        get = self.table.find
        claiming = self.store is not None
        seq = self.scheduler.next_group()
        after = 0
        for i in range(entries):
            session_id, position = ids[i], wanted[i]
            session = get(session_id)
            if errors and session_id in errors:
                error = errors[session_id]
                if not (isinstance(error, StoreUnavailable) and start and position == 0):
                    batch.fail(i, error)  # a new session may start in memory; nothing else
                    continue
            if session is None and start and position == 0 and finite[i]:
                try:
                    session = self._create(session_id, principal)
                except SeqServeError as exc:  # bad id, session cap
                    batch.fail(i, exc)
                    continue
            if check_dups:
                if session_id in seen:
                    batch.fail(i, _duplicate(session_id))
                    continue
                seen.add(session_id)
            if (
                session is not None
                and position == session.accepted
                and not session.pending
                and not session.scheduled
                and session.owner == principal
                and finite[i]
            ):
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
            if claiming:
                self._defer_entry(
                    batch, i, session_id, position, frames, start, principal, bool(finite[i])
                )
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
            self.scheduler.submit_group(
                Group(
                    fast,
                    np.array(slots, np.intp),
                    np.array(at, np.int64),
                    frames if len(rows) == entries else frames[index],
                    index,
                    batch,
                    seq,
                    after,
                )
            )

    def _defer_entry(
        self,
        batch: PendingBatch,
        i: int,
        session_id: str,
        position: int,
        frames: np.ndarray,
        start: bool,
        principal: str,
        finite: bool,
    ) -> None:
        """A batch entry for a session not held here: admitted on its own once claimed."""
        if not finite:
            batch.fail(i, BadRequest(f"entry {i}: the frame holds NaN or Inf", reason="non_finite"))
            return

        def admit() -> None:
            session = self._admit(session_id, position, 1, start, principal)
            self.scheduler.submit(Work(session, position, frames[i : i + 1], batch.sink(i)))

        def fail(exc: Exception) -> None:
            batch.fail(i, exc)

        if self._must_claim(session_id):
            self._after_claim(session_id, principal, start and position == 0, admit, fail)
            return
        try:
            admit()
        except PositionError as exc:
            self._recheck(session_id, principal, exc, admit, fail)
        except SeqServeError as exc:
            fail(exc)

    # -- the shared store ---------------------------------------------------------------------

    def _must_claim(self, session_id: str) -> bool:
        return self.store is not None and (
            session_id in self._claims or self.table.find(session_id) is None
        )

    def _recheck(
        self,
        session_id: str,
        principal: str,
        error: PositionError,
        admit: Callable[[], None],
        fail: Callable[[Exception], None],
    ) -> None:
        """A request ahead of this replica's copy may mean another replica took the session
        over and moved it on. Ask the store (requests for the session queue meanwhile): if it
        names another owner, the copy is dropped and the session claimed back; otherwise the
        gap is real and the request fails with it."""
        session = self.table.find(session_id)
        if (
            session is None
            or error.reason != "position_gap"
            or session.pending
            or session.scheduled
            or session.holds
        ):
            fail(error)
            return
        self._after_claim(session_id, principal, False, admit, fail, probe=session)

    async def _held(self, session_id: str, principal: str) -> None:
        """With a store: claim the session first if it is not held here."""
        if self._must_claim(session_id):
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._after_claim(
                session_id, principal, False, lambda: done.set_result(None), done.set_exception
            )
            await done

    def _after_claim(
        self,
        session_id: str,
        principal: str,
        creating: bool,
        admit: Callable[[], None],
        fail: Callable[[Exception], None],
        *,
        probe: Session | None = None,
    ) -> None:
        """Run ``admit`` once the store was asked for the session (and it was taken over if
        there), after every request for it that came earlier; errors go to ``fail``. Claims
        asked for in one loop turn go to the store in one round trip."""
        waiters = self._claims.get(session_id)
        if waiters is None:
            waiters = self._claims[session_id] = []
            if probe is not None:
                self._spawn(self._probe(session_id, principal, probe))
            else:
                if not self._to_claim:
                    asyncio.get_running_loop().call_soon(self._flush_claims)
                self._to_claim.append((session_id, principal))
        waiters.append(_Waiter(admit, fail, creating))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush_claims(self) -> None:
        items, self._to_claim = self._to_claim, []
        self._spawn(self._claim(items))

    async def _claim(self, items: list[tuple[str, str]]) -> None:
        assert self.store is not None
        try:
            replies = await self.store.claim(items)
        except StoreUnavailable as exc:
            for session_id, principal in items:
                self._claimed(session_id, principal, "none", None, exc)
            return
        for (session_id, principal), (kind, found) in zip(items, replies, strict=True):
            self._claimed(session_id, principal, kind, found, None)

    async def _probe(self, session_id: str, principal: str, probe: Session) -> None:
        """The session is held here, but a request was ahead of it: claim it only if the store
        names another owner."""
        assert self.store is not None
        owner = await self.store.owner(session_id)
        if owner is None or owner in ("", self.store.replica) or probe.ended:
            self._claimed(session_id, principal, "held", None, None)
            return
        log.info("session %r moved to replica %r; taking it back", session_id, owner)
        self.table.end(probe, "moved")
        self.observer.session_event("moved")
        await self._claim([(session_id, principal)])

    def _claimed(
        self,
        session_id: str,
        principal: str,
        kind: str,
        found: Checkpoint | int | None,
        error: Exception | None,
    ) -> None:
        """Take on what the store said, then admit every waiting request in arrival order."""
        try:
            if kind == "ok":
                assert isinstance(found, Checkpoint)
                self._adopt(session_id, principal, found)
            elif kind == "closed":
                assert isinstance(found, int)
                self.table.bury(session_id, "closed", found, principal)
        except SeqServeError as exc:  # the session cap, a bad id
            error = exc
        except Exception as exc:  # a corrupt checkpoint: say so, never INTERNAL
            log.exception("resuming session %r from the store failed", session_id)
            error = StoreUnavailable(
                f"session {session_id!r} could not be resumed from the shared store: {exc}"
            )
        for waiter in self._claims.pop(session_id, []):
            problem = error
            if isinstance(error, StoreUnavailable) and (
                waiter.creating or self.table.find(session_id) is not None
            ):
                problem = None  # a new session starts in memory; the store catches up
            elif kind == "foreign":
                problem = (
                    SessionExists(f"session {session_id!r} already exists")
                    if waiter.creating
                    else SessionNotFound(f"session {session_id!r} is unknown")
                )
            try:
                if problem is not None:
                    raise problem
                waiter.admit()
            except SeqServeError as exc:
                waiter.fail(exc)

    def _adopt(self, session_id: str, principal: str, found: Checkpoint) -> None:
        """Make a claimed checkpoint a live session here."""
        data = np.frombuffer(found.data, np.float32)
        ring = self.bank.ring.shape[1] * self.bank.ring.shape[2]
        if data.size != self.spec.state_floats + ring:
            raise ValueError(
                f"checkpoint holds {data.size} values; this model and replay "
                f"window need {self.spec.state_floats} + {ring}"
            )
        session = self.table.create(session_id, position=found.position, owner=principal)
        at = self.spec.state_floats
        self.bank.states[session.slot] = data[:at]
        self.bank.ring[session.slot] = data[at:].reshape(self.bank.ring.shape[1:])
        session.synced = session.saved = found.position
        session.restored = found.head > found.position
        self.observer.session_event("claimed")
        log.debug(
            "claimed session %r at position %d (head was %d)",
            session_id,
            found.position,
            found.head,
        )

    def _admit(
        self, session_id: str, position: int, count: int, start: bool, principal: str
    ) -> Session:
        """The session these frames go to (created when ``start``), after the checks that need
        no queue: ownership, and that ``position`` leaves no gap after what is accepted."""
        session = self.table.find(session_id)
        if session is not None and session.owner != principal:
            if start:  # ids are one namespace: say it is taken, nothing more
                raise SessionExists(f"session {session_id!r} already exists")
            self.table.get(session_id, principal)  # raises unknown
        if session is None:
            if not start or position != 0:  # only a start at 0 creates a session
                self.table.get(session_id, principal)  # raises unknown / expired / closed
            session = self._create(session_id, principal)
        elif position > session.accepted:
            raise gap_error(session, position)
        self.table.touch(session)
        if position + count > session.accepted:
            session.accepted = position + count
        return session

    async def step(
        self,
        session_id: str,
        position: int,
        frames: np.ndarray,
        *,
        start: bool = False,
        end: bool = False,
        principal: str = "",
    ) -> StepResult:
        return await self.submit(
            session_id, position, frames, start=start, end=end, principal=principal
        )

    # -- whole sequences ----------------------------------------------------------------------

    async def predict(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-step probabilities ``[T_i, C]`` of independent sequences, from zero state."""
        self._refuse_if_draining()
        if not sequences:
            raise BadRequest("no sequences given", reason="no_sequences")
        total = 0
        for i, frames in enumerate(sequences):
            self.check_frames(frames, what=f"sequence {i}")
            total += len(frames)
        if total > self.settings.max_predict_frames:
            raise BadRequest(
                f"{total} frames in all, at most {self.settings.max_predict_frames} "
                "per Predict call",
                reason="too_many_frames",
            )
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
                    self.executor,
                    self.runtime.sequence,
                    batch,
                    self.runtime.zero_states(len(chunk)),
                )
                for row, i in enumerate(chunk):
                    results[i] = probs[row]
        return [r for r in results if r is not None]
