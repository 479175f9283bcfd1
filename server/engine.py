"""The data plane: what any front (gRPC today, another protocol tomorrow) calls.

Plain Python + numpy: requests come in as ids, positions and ``float32`` arrays, results go out as
dataclasses, failures as ``errors.SeqServeError`` subclasses. The engine admits requests (checks,
ownership, positions, the session API) and hands them to the scheduler; which sessions live here
and taking over the others is ``handover``'s business, and how answers wait for the shared store
is ``writeback``'s.

Every session call takes the caller's ``principal`` (a plain str; "" when authentication is off).
A session belongs to the principal that opened it: to anyone else it is ``unknown``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
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
    SessionNotFound,
    StoreUnavailable,
    VersionDraining,
    VersionElsewhere,
)
from .handover import Handover, Local, Shared, restore_rows
from .model import ModelSpec
from .observer import BatchObserver
from .runtime import ModelRunner, inference_executor
from .scheduler import Scheduler
from .sessions import Quota, SessionTable, check_session_id, gap_error
from .settings import Settings
from .states import StateBank
from .store import Claim, Store
from .work import Group, Session, StepResult, Work
from .writeback import Answers, Immediate, WriteBack

__all__ = ["BatchResult", "Engine", "SessionStatus", "StepResult", "make_store", "store_namespace"]

log = logging.getLogger("seqserve.engine")

_PLANS = 64  # batches' id lists remembered (a gateway re-sends the same sessions every step)


def _version_number(version: str) -> int:
    """A model.json version as the integer the wire carries (non-integer versions: 1)."""
    return int(version) if version.isdigit() and int(version) > 0 else 1


def store_namespace(spec: ModelSpec) -> str:
    """Where a version's sessions live in the shared store: by model, version and graphs, so
    sessions of one name and version with other graphs never mix."""
    return f"seqserve:{spec.name}:{spec.version}:{spec.fingerprint[:16]}"


def make_store(settings: Settings, spec: ModelSpec) -> Store | None:
    if settings.store == "memory":
        return None
    from .redis_store import RedisStore

    replica = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
    return RedisStore(
        settings.store,
        namespace=store_namespace(spec),
        where=f"seqserve:{spec.name}:where:",
        tag=f"{spec.version}|{spec.fingerprint[:16]}",
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
    model: str = ""
    version: int = 0  # the model version the session is pinned to


def _duplicate(session_id: str) -> BadRequest:
    return BadRequest(
        f"session {session_id!r} appears twice in one batch", reason="duplicate_session"
    )


class Engine:
    def __init__(
        self,
        spec: ModelSpec,
        runtime: ModelRunner,
        settings: Settings,
        observer: BatchObserver | None = None,
        *,
        store: Store | None = None,
        executor: Executor | None = None,
        quota: Quota | None = None,
        version: int | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.settings = settings
        self.observer = observer or BatchObserver()
        self.model = spec.name
        self.version = version if version is not None else _version_number(spec.version)
        # Accepts new sessions; a version leaving the policy keeps only its own (draining).
        self.accepting = True
        self.bank = StateBank(spec, settings.max_sessions, settings.replay_window)
        self.table = SessionTable(
            self.bank,
            max_sessions=settings.max_sessions,
            idle_timeout=settings.session_idle_timeout,
            max_per_owner=settings.max_sessions_per_principal,
            quota=quota,
        )
        self.columns = self.table.columns
        self._owns_executor = executor is None
        self.executor = executor or inference_executor()
        self.store = store if store is not None else make_store(settings, spec)
        self.handover: Handover
        answers: Answers
        if self.store is None:
            self.handover, answers = Local(), Immediate()
        else:
            self.store.observe = self.observer.store_call
            self.handover = Shared(self.store, self.table, self.observer, self._adopt)
            answers = WriteBack(self.store, self.table, self.observer, settings.checkpoint_every)
        self.answers = answers
        self.scheduler = Scheduler(
            runtime,
            self.table,
            self.executor,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000.0,
            inline_batch=settings.inline_batch,
            observer=self.observer,
            answers=answers,
            version=self.version,
        )
        # (principal, ids) -> (slots, generations, unique): the batches' id lists seen last.
        self._plans: OrderedDict[tuple[str, tuple[str, ...]], tuple[np.ndarray, np.ndarray, bool]]
        self._plans = OrderedDict()
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="seqserve-expiry")

    async def drain(self) -> None:
        """Refuse new work, then wait until every accepted request has been answered."""
        self.draining = True
        while self.handover.busy:  # accepted, waiting on the store
            await asyncio.sleep(0.01)
        await self.scheduler.idle()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.scheduler.stop()
        if self._owns_executor:
            self.executor.shutdown(wait=True)
        await self.handover.close()

    async def save_to_store(self) -> int:
        """Write every session's state to the shared store, if there is one (on drain, after
        the scheduler stopped), so another replica resumes them with nothing lost. Returns
        how many."""
        return await self.answers.save_all(list(self.table))

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
            session.ended is not None,
            session.restored,
            self.model,
            self.version,
        )

    def open(self, session_id: str | None = None, principal: str = "") -> SessionStatus:
        self._refuse_if_draining()
        return self.status(self._create(session_id or None, principal))

    def _create(self, session_id: str | None, principal: str) -> Session:
        if not self.accepting:
            raise VersionDraining(
                f"model {self.model!r} version {self.version} is draining: it serves only the "
                "sessions it has; start new ones on the latest version"
            )
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
        if self.table.find(session_id) is not None:
            return self.get(session_id, principal)
        check_session_id(session_id)
        found = await self.handover.peek(session_id, principal)
        if found is not None and found.where:
            raise VersionElsewhere(
                f"session {session_id!r} lives on version {found.where} of its model",
                where=found.where,
            )
        if found is None:
            return self.get(session_id, principal)  # unknown, or a tombstone here
        if found.closed:
            raise SessionNotFound(
                f"session {session_id!r} closed at position {found.head}",
                reason="closed",
                position=found.head,
            )
        idle = max(0.0, self.settings.session_idle_timeout - found.expires_in)
        # A step here claims the session from its checkpoint: that is where it resumes.
        return SessionStatus(
            session_id,
            found.position,
            idle,
            found.expires_in,
            rolled_back=found.head > found.position,
            model=self.model,
            version=self.version,
        )

    async def reset(self, session_id: str, principal: str = "") -> SessionStatus:
        self._refuse_if_draining()
        await self.handover.claimed(session_id, principal)
        session = self.table.get(session_id, principal)
        self.table.touch(session)
        await self.scheduler.control(session, "reset")
        return self.status(session)

    async def close(self, session_id: str, principal: str = "") -> SessionStatus:
        # Refused while draining like every other change: the session is in the snapshot, and a
        # close queued behind the stopped scheduler would otherwise hang until the server stops.
        self._refuse_if_draining()
        await self.handover.claimed(session_id, principal)
        session = self.table.get(session_id, principal)
        await self.scheduler.control(session, "close")
        return self.status(session)

    # -- steps --------------------------------------------------------------------------------

    def submit(
        self,
        session_id: str,
        position: int | None,
        frames: np.ndarray,
        *,
        start: bool = False,
        end: bool = False,
        principal: str = "",
    ) -> asyncio.Future[StepResult]:
        """Queue frames for a session; the future gives the outputs or a SeqServeError. A
        request refused before it is queued raises instead.

        ``position=None`` appends: the frames go at the session's next position as of their
        admission (0 for a new one), so requests are applied in the order they arrive, with no
        retry detection. A start then only creates: an existing session is not restarted."""
        self._refuse_if_draining()
        self.check_frames(frames)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

        def admit() -> None:
            at = self._next_position(session_id, start) if position is None else position
            session = self._admit(session_id, at, len(frames), start, principal)
            self.scheduler.submit(Work(session, at, frames, future, end=end))

        handover = self.handover
        if not handover.held(session_id):
            handover.after_claim(
                session_id, principal, start and not position, admit, future.set_exception
            )
            return future
        try:
            admit()
        except PositionError as exc:
            if not handover.recheck(session_id, principal, exc, admit, future.set_exception):
                raise
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
        ids = tuple(session_ids)
        entries = len(ids)
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
        wanted = np.fromiter(positions, np.int64, entries)
        batch = PendingBatch(entries, self.spec.classes)
        if not entries:
            return batch.future

        def admit(errors: dict[str, Exception]) -> None:
            self._admit_batch(batch, ids, wanted, frames, start, principal, errors)

        if not self.handover.admit_batch(ids, principal, admit):
            admit({})
        return batch.future

    def _plan(self, ids: tuple[str, ...], principal: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """Slots and generations of a batch's sessions (-1: not live here, or another
        principal's), and whether its ids are unique. The id lists of recent batches are
        remembered while every session in them lives, so a stream that steps the same sessions
        message after message resolves them with one dict lookup, not one per entry."""
        key = (principal, ids)
        plan = self._plans.get(key)
        if plan is not None:
            slots, generations, _ = plan
            if (self.columns.generation[slots] == generations).all():
                self._plans.move_to_end(key)
                return plan
            del self._plans[key]
        slots, generations = self.table.lookup(ids, principal)
        plan = (slots, generations, len(set(ids)) == len(ids))
        if (slots >= 0).all():
            self._plans[key] = plan
            if len(self._plans) > _PLANS:
                self._plans.popitem(last=False)
        return plan

    def _admit_batch(
        self,
        batch: PendingBatch,
        ids: tuple[str, ...],
        wanted: np.ndarray,
        frames: np.ndarray,
        start: bool,
        principal: str,
        errors: dict[str, Exception],
    ) -> None:
        """Admit a batch's entries. The fast lane: sessions with nothing queued, exactly at
        their position, are checked and advanced as columns and run as one group with no
        per-entry future. Anything else (new, queued, replayed, failing) goes on its own."""
        entries = len(ids)
        slots, generations, unique = self._plan(ids, principal)
        finite = np.isfinite(frames).all(axis=1)
        if not unique:
            self._admit_each(batch, ids, wanted, frames, finite, start, principal, errors)
            return
        settled = np.zeros(entries, np.bool_)
        unheld = slots < 0
        if errors or unheld.any():
            if errors:
                unheld |= np.fromiter((i in errors for i in ids), np.bool_, entries)
            created = False
            for i in np.flatnonzero(unheld).tolist():
                session_id, position = ids[i], int(wanted[i])
                error = errors.get(session_id)
                if error is not None and not (
                    isinstance(error, StoreUnavailable) and start and position == 0
                ):
                    batch.fail(i, error)  # a new session may start in memory; nothing else
                    settled[i] = True
                elif slots[i] < 0 and start and position == 0 and finite[i]:
                    try:
                        self._create(session_id, principal)
                        created = True
                    except SeqServeError as exc:  # bad id, session cap, taken
                        batch.fail(i, exc)
                        settled[i] = True
            if created:
                slots, generations, _ = self._plan(ids, principal)
        columns = self.columns
        ok = (slots >= 0) & ~settled & finite
        live = np.where(ok, slots, 0)
        ok &= (columns.accepted[live] == wanted) & ~columns.queued[live]
        rows = np.flatnonzero(ok)
        if len(rows) < entries:
            for i in np.flatnonzero(~ok & ~settled).tolist():
                self._admit_entry(
                    batch, i, ids[i], int(wanted[i]), frames, start, principal, bool(finite[i])
                )
            if not len(rows):
                return
        everyone = len(rows) == entries
        lane = slots if everyone else slots[rows]
        positions = wanted if everyone else wanted[rows]
        columns.accepted[lane] = positions + 1
        columns.holds[lane] += 1
        seq = self.scheduler.next_group()
        after = int(columns.last_group[lane].max())
        columns.last_group[lane] = seq
        self.table.touch_slots(lane)
        self.scheduler.submit_group(
            Group(
                lane,
                generations if everyone else generations[rows],
                positions,
                frames if everyone else frames[rows],
                rows,
                batch,
                seq,
                after,
                self.version,
            )
        )

    def _admit_each(
        self,
        batch: PendingBatch,
        ids: tuple[str, ...],
        wanted: np.ndarray,
        frames: np.ndarray,
        finite: np.ndarray,
        start: bool,
        principal: str,
        errors: dict[str, Exception],
    ) -> None:
        """A batch naming a session twice: every entry on its own, in order; the first entry of
        an id runs, later ones fail ``duplicate_session``."""
        seen: set[str] = set()
        for i, session_id in enumerate(ids):
            position = int(wanted[i])
            error = errors.get(session_id)
            if error is not None and not (
                isinstance(error, StoreUnavailable) and start and position == 0
            ):
                batch.fail(i, error)
                continue
            if session_id in seen:
                batch.fail(i, _duplicate(session_id))
                continue
            seen.add(session_id)
            self._admit_entry(
                batch, i, session_id, position, frames, start, principal, bool(finite[i])
            )

    def _admit_entry(
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
        """One batch entry on its own, queued behind the session's earlier work."""
        if not finite:
            batch.fail(i, BadRequest(f"entry {i}: the frame holds NaN or Inf", reason="non_finite"))
            return

        def admit() -> None:
            session = self._admit(session_id, position, 1, start, principal)
            self.scheduler.submit(Work(session, position, frames[i : i + 1], batch.sink(i)))

        def fail(exc: Exception) -> None:
            batch.fail(i, exc)

        handover = self.handover
        if not handover.held(session_id):
            handover.after_claim(session_id, principal, start and position == 0, admit, fail)
            return
        try:
            admit()
        except PositionError as exc:
            if not handover.recheck(session_id, principal, exc, admit, fail):
                fail(exc)
        except SeqServeError as exc:
            fail(exc)

    # -- the shared store ---------------------------------------------------------------------

    def _adopt(self, session_id: str, principal: str, claim: Claim) -> None:
        """Make a claimed checkpoint a live session here."""
        found = claim.checkpoint
        assert found is not None
        state, ring = restore_rows(found.data, self.spec.state_floats, self.bank.ring.shape[1:])
        session = self.table.create(session_id, position=found.position, owner=principal)
        self.bank.states[session.slot] = state
        self.bank.ring[session.slot] = ring
        session.synced = session.saved = found.position
        session.restored = found.head > found.position
        self.observer.session_event("claimed")
        log.debug(
            "claimed session %r at position %d (head was %d)",
            session_id,
            found.position,
            found.head,
        )

    def _next_position(self, session_id: str, start: bool) -> int:
        """Where appended frames go: after everything accepted for the session. A start for a
        live session is refused: without positions it cannot tell a retry from a new sequence."""
        session = self.table.find(session_id)
        if session is None:
            return 0
        if start:
            raise SessionExists(
                f"session {session_id!r} is already active (position {session.accepted}); "
                "end it first, or send its position to resume it"
            )
        return session.accepted

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
        self.observer.predicted(total)
        return [r for r in results if r is not None]
