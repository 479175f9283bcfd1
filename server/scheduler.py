"""Batches one pending request from each of many sessions into one onnxruntime call.

Every session has a FIFO of work; the ready queue holds sessions (not requests), so a batch takes
at most one request per session and a session's requests run strictly in order. Positions are
checked when a request reaches the head of its session's queue, which lets clients pipeline
requests. Single-frame requests share one ``step`` call; multi-frame requests of equal length share
one ``sequence`` call. States are gathered from the bank on the event loop, the graphs run in a
worker thread, and the new states are scattered back on the loop, so nothing else ever touches a
slot while its batch runs. Resets and closes travel through the same queue, so they order cleanly
against steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .errors import PositionError, SeqServeError, SessionNotFound
from .runtime import Runtime
from .sessions import Session, SessionTable
from .store import RedisStore, SessionMoved, checkpoint_commits

__all__ = ["BatchObserver", "Scheduler", "Sink", "StepResult", "Work", "gap_error"]

log = logging.getLogger("seqserve.scheduler")


@dataclass(slots=True)
class StepResult:
    session_id: str
    position: int
    probabilities: np.ndarray  # [frames, classes]
    next_position: int
    replayed: bool = False
    ended: bool = False


class Sink(Protocol):
    """Where a work item's outcome goes: an ``asyncio.Future``, or a batch entry's sink."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True, eq=False)
class Work:
    session: Session
    position: int
    frames: np.ndarray | None  # [T, F]; None for a control action
    future: Sink
    action: str = "step"  # "step", "reset", "close"
    end: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    prefix: np.ndarray | None = None  # replayed rows of frames applied before this request ran


@dataclass(slots=True, eq=False)
class Group:
    """One frame for each of many idle sessions, each exactly at its position: the fast lane of a
    StepBatch. Admission marks the sessions scheduled, so nothing else touches them until the
    group's round finishes; results go straight into the batch's arrays at ``rows``."""

    sessions: list[Session]
    slots: np.ndarray  # intp: the sessions' state slots
    positions: np.ndarray  # int64: the position of each frame
    frames: np.ndarray  # [n, F]
    rows: np.ndarray  # intp: the entries of ``batch`` these are
    batch: Any  # batches.PendingBatch
    seq: int  # groups are numbered in arrival order
    after: int  # the latest earlier group sharing a session with this one (0: none)
    queued_at: float = field(default_factory=time.perf_counter)


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch(self, graph: str, size: int, frames: int, seconds: float, waited: float) -> None:
        pass

    def session_event(self, event: str) -> None:
        pass

    def store_call(self, kind: str, seconds: float, outcome: str) -> None:
        pass


class Scheduler:
    def __init__(
        self,
        runtime: Runtime,
        table: SessionTable,
        executor: Executor,
        *,
        max_batch: int,
        max_wait: float = 0.0,
        inline_batch: int = 0,
        observer: BatchObserver | None = None,
        store: RedisStore | None = None,
        checkpoint_every: int = 1,
    ) -> None:
        self.runtime = runtime
        self.table = table
        self.bank = table.bank
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.inline_floats = inline_batch * runtime.spec.features  # frames, counted in floats
        self.observer = observer or BatchObserver()
        self.store = store
        self.checkpoint_every = max(1, checkpoint_every)
        # With a store, answers wait for the round's write to it: (sink, value, session).
        self._answers: list[tuple[Sink, Any, Session]] = []
        self._filled: list[tuple[Group, np.ndarray]] = []
        self._touched: dict[Session, None] = {}
        self._writing: asyncio.Task[None] | None = None  # the latest round's store write
        self._ready: deque[Session] = deque()
        self._groups: deque[Group] = deque()
        self._groups_seq = 0  # the last number given to a group
        self._groups_done = 0  # every group up to this number has run
        self._unsure = False  # an inference failure left accepted positions that never came
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    # -- submission (event loop) --------------------------------------------------------------

    def submit(self, work: Work) -> None:
        session = work.session
        if session.pending is None:
            session.pending = deque()
        session.pending.append(work)
        if not session.scheduled:
            session.scheduled = True
            self._ready.append(session)
            if not self._wake.is_set():
                self._wake.set()
                self._idle.clear()

    def next_group(self) -> int:
        self._groups_seq += 1
        return self._groups_seq

    def submit_group(self, group: Group) -> None:
        self._groups.append(group)
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()

    def control(self, session: Session, action: str) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.submit(Work(session, 0, None, future, action=action))
        return future

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="seqserve-scheduler")

    async def idle(self) -> None:
        """Returns once nothing is queued or running."""
        await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writing is not None:  # the last round's answers wait for its write
            with contextlib.suppress(Exception):
                await self._writing
            self._writing = None

    async def _run(self) -> None:
        while True:
            if not self._ready and not self._groups:
                if self._writing is not None:  # idle means answered, so written too
                    writing, self._writing = self._writing, None
                    with contextlib.suppress(Exception):
                        await writing
                    continue
                self._wake.clear()
                self._idle.set()
                await self._wake.wait()
                continue
            if self.max_wait and len(self._ready) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving; the round's requests were already failed
                log.exception("scheduler round failed")

    # -- one round ----------------------------------------------------------------------------

    async def _round(self) -> None:
        taken: list[Session] = []
        held: list[Session] = []
        steps: list[Work] = []
        groups: dict[int, list[Work]] = {}
        fast: list[Group] = []
        try:
            # Groups run in arrival order; one that shares a session with a group still queued
            # or running ahead of it waits for a later round.
            while self._groups and self._groups[0].after <= self._groups_done:
                fast.append(self._groups.popleft())
            last_group = fast[-1].seq if fast else 0
            for _ in range(min(len(self._ready), self.max_batch)):
                session = self._ready.popleft()
                if session.holds:  # a group has frames of it in flight: those go first
                    held.append(session)
                    continue
                taken.append(session)
                assert session.pending  # it is ready because it has work
                work = session.pending.popleft()
                if self._prepare(work):
                    assert work.frames is not None
                    if len(work.frames) == 1:
                        steps.append(work)
                    else:
                        groups.setdefault(len(work.frames), []).append(work)
            if fast and self._unsure:
                self._check_groups(fast)
            if steps or groups or fast:
                await self._compute(steps, list(groups.values()), fast)
            if self.store is not None and self._touched:
                self._commit()
        finally:
            if last_group:
                self._groups_done = last_group
                for lane in fast:
                    for session in lane.sessions:
                        session.holds -= 1
            self._ready.extend(held)
            for session in taken:
                if session.ended:
                    self._fail_pending(session)
                if session.pending:
                    self._ready.append(session)
                else:
                    session.pending = None  # idle again: give the deque back
                    session.scheduled = False

    def _check_groups(self, fast: list[Group]) -> None:
        """A group's frames were admitted against positions that work ahead of it would reach;
        if that work failed (inference error), the entries it would have continued fail too."""
        for i, lane in enumerate(fast):
            actual = np.fromiter((s.position for s in lane.sessions), np.int64, len(lane.sessions))
            wrong = np.flatnonzero(actual != lane.positions)
            if not len(wrong):
                continue
            for j in wrong.tolist():
                session = lane.sessions[j]
                session.accepted = session.position
                lane.batch.fail(int(lane.rows[j]), gap_error(session, int(lane.positions[j])))
            keep = np.flatnonzero(actual == lane.positions)
            for j in wrong.tolist():
                lane.sessions[j].holds -= 1
            fast[i] = Group(
                [lane.sessions[j] for j in keep.tolist()],
                lane.slots[keep],
                lane.positions[keep],
                lane.frames[keep],
                lane.rows[keep],
                lane.batch,
                lane.seq,
                lane.after,
                lane.queued_at,
            )
        fast[:] = [lane for lane in fast if lane.sessions]

    def _prepare(self, work: Work) -> bool:
        """Settle what needs no model run (controls, replays, errors); True if frames remain."""
        session = work.session
        future = work.future
        if session.ended:
            _fail(future, self._gone(session))
            return False
        if work.action == "reset":
            self.bank.zero(session.slot)
            session.position = session.accepted = 0
            self._answer(future, session, session)
            return False
        if work.action == "close":
            self._end(session, "closed")
            self._answer(future, session, session)
            return False
        assert work.frames is not None
        position, applied, count = work.position, session.position, len(work.frames)
        if position > applied:
            session.accepted = applied
            _fail(future, gap_error(session, position))
            return False
        if position < applied:
            done = min(count, applied - position)
            if position < applied - self.bank.window:
                _fail(
                    future,
                    PositionError(
                        f"position {position} is older than the replay window "
                        f"({self.bank.window} frames before {applied})",
                        reason="stale_position",
                        expected=applied,
                    ),
                )
                return False
            work.prefix = self.bank.replay(session.slot, position, position + done)
            if done == count:
                _resolve(
                    future, StepResult(session.id, position, work.prefix, applied, replayed=True)
                )
                return False
            work.frames = work.frames[done:]
        return True

    async def _compute(
        self, steps: list[Work], groups: list[list[Work]], fast: list[Group]
    ) -> None:
        bank = self.bank
        jobs: list[tuple[str, list[Work], np.ndarray, np.ndarray, list[np.ndarray]]] = []
        if steps or fast:
            slots = np.fromiter((w.session.slot for w in steps), np.intp, len(steps))
            frames = (
                np.stack([w.frames[0] for w in steps])  # type: ignore[index]
                if steps
                else np.empty((0, self.runtime.spec.features), np.float32)
            )
            if fast:
                slots = np.concatenate([slots, *(g.slots for g in fast)])
                frames = np.concatenate([frames, *(g.frames for g in fast)])
            jobs.append(("step", steps, slots, frames, bank.gather(slots)))
        for group in groups:
            slots = np.fromiter((w.session.slot for w in group), np.intp, len(group))
            frames = np.stack([w.frames for w in group])  # type: ignore[misc]
            jobs.append(("sequence", group, slots, frames, bank.gather(slots)))
        started = time.perf_counter()
        inputs = [(j[0], j[3], j[4]) for j in jobs]
        try:
            if sum(frames.size for _, frames, _ in inputs) <= self.inline_floats:
                # A thread hop costs more than a small batch's run (measured: ~0.2 ms vs
                # ~0.09 ms for one step), so small batches run right here on the loop.
                outputs = _run_jobs(self.runtime, inputs)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self.executor, _run_jobs, self.runtime, inputs
                )
        except Exception:
            log.exception("inference failed for %d requests", sum(len(j[1]) for j in jobs))
            self._unsure = True
            for job in jobs:
                for work in job[1]:
                    _fail(work.future, RuntimeError("inference failed"))
            for lane in fast:
                lane.batch.fail_rows(lane.rows, RuntimeError("inference failed"))
            return
        if self.store is not None:
            jobs, outputs = self._drop_moved(jobs, outputs, fast)
        for (graph, works, slots, frames, _), (probs, states, seconds) in zip(
            jobs, outputs, strict=True
        ):
            if not len(slots):
                continue
            waited = started - min([w.queued_at for w in works] + [g.queued_at for g in fast])
            self.observer.batch(
                graph,
                len(slots),
                frames.shape[0] * (1 if graph == "step" else frames.shape[1]),
                seconds,
                waited,
            )
            bank.scatter(slots, states)
            if graph == "step":
                positions = np.fromiter((w.session.position for w in works), np.int64, len(works))
                if fast:
                    positions = np.concatenate([positions, *(g.positions for g in fast)])
                bank.record_steps(slots, positions, probs)
                for i, work in enumerate(works):
                    self._finish(work, probs[i : i + 1])
                at = len(works)
                for lane in fast:
                    self._finish_group(lane, probs[at : at + len(lane.sessions)])
                    at += len(lane.sessions)
            else:
                for i, work in enumerate(works):
                    bank.record(work.session.slot, work.session.position, probs[i])
                    self._finish(work, probs[i])

    def _drop_moved(
        self, jobs: list[Any], outputs: list[Any], fast: list[Group]
    ) -> tuple[list[Any], list[Any]]:
        """Sessions the previous round's store write found taken over (ended while this round
        ran): their slots may be reused already, so none of their results is written back."""
        out_jobs, out_outputs = [], []
        for job, output in zip(jobs, outputs, strict=True):
            graph, works, slots, frames, inputs = job
            sessions = [w.session for w in works]
            if graph == "step":
                sessions += [s for lane in fast for s in lane.sessions]
            keep = np.fromiter((not s.ended for s in sessions), np.bool_, len(sessions))
            if keep.all():
                out_jobs.append(job)
                out_outputs.append(output)
                continue
            for work in works:
                if work.session.ended:
                    _fail(work.future, self._gone(work.session))
            if graph == "step":
                for i, lane in enumerate(fast):
                    alive = np.fromiter(
                        (not s.ended for s in lane.sessions), np.bool_, len(lane.sessions)
                    )
                    if alive.all():
                        continue
                    for j in np.flatnonzero(~alive).tolist():
                        lane.sessions[j].holds -= 1
                        lane.batch.fail_rows(lane.rows[j : j + 1], self._gone(lane.sessions[j]))
                    fast[i] = Group(
                        [s for s in lane.sessions if not s.ended],
                        lane.slots[alive],
                        lane.positions[alive],
                        lane.frames[alive],
                        lane.rows[alive],
                        lane.batch,
                        lane.seq,
                        lane.after,
                        lane.queued_at,
                    )
            probs, states, seconds = output
            out_jobs.append(
                (
                    graph,
                    [w for w in works if not w.session.ended],
                    slots[keep],
                    frames[keep],
                    inputs,
                )
            )
            out_outputs.append((probs[keep], [st[keep] for st in states], seconds))
        return out_jobs, out_outputs

    def _finish(self, work: Work, probs: np.ndarray) -> None:
        session = work.session
        session.restored = False
        first = session.position
        session.position += len(probs)
        if session.accepted < session.position:
            session.accepted = session.position
        if work.prefix is not None:
            probs = np.concatenate([work.prefix, probs])
            first -= len(work.prefix)
        if work.end:
            self._end(session, "closed")
        self._answer(
            work.future,
            StepResult(session.id, first, probs, session.position, ended=work.end),
            session,
        )

    def _finish_group(self, group: Group, probs: np.ndarray) -> None:
        for session in group.sessions:
            session.restored = False
            session.position += 1
        if self.store is not None:
            self._touched.update(dict.fromkeys(group.sessions))
            self._filled.append((group, probs))
            return
        group.batch.fill(group.rows, probs, group.positions + 1)

    def _answer(self, sink: Sink, value: Any, session: Session) -> None:
        if self.store is None:
            _resolve(sink, value)
        else:
            self._touched[session] = None
            self._answers.append((sink, value, session))

    def _commit(self) -> None:
        """Record what rounds did in the shared store, then answer them. One write is in flight
        at a time; rounds that finish meanwhile join the next one, so the store sees fewer,
        larger writes the busier it gets, and rounds never wait for it."""
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write())

    async def _write(self) -> None:
        assert self.store is not None
        while self._touched:
            touched, answers, filled = list(self._touched), self._answers, self._filled
            self._touched, self._answers, self._filled = {}, [], []
            commits, full = checkpoint_commits(touched, self.bank, self.checkpoint_every)
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
        full: list[bool],
        written: str | None,
        answers: list[tuple[Sink, Any, Session]],
        filled: list[tuple[Group, np.ndarray]],
    ) -> None:
        moved: set[Session] = set()
        for session, outcome, head, is_full in zip(
            touched, written or "", heads, full, strict=False
        ):
            if outcome == "1":
                session.synced = head
                if is_full:
                    session.saved = head
            elif outcome == "2":
                session.synced = -1  # the store lost it: a full checkpoint next time
            elif not session.ended or session.ended == "moved":
                moved.add(session)
                if not session.ended:
                    self._end(session, "moved")
        for sink, value, session in answers:
            if session in moved:
                _fail(sink, self._gone(session))
            else:
                _resolve(sink, value)
        for group, probs in filled:
            self._fill(group, probs, moved)

    def _fill(self, group: Group, probs: np.ndarray, moved: set[Session]) -> None:
        if not moved or not any(s in moved for s in group.sessions):
            group.batch.fill(group.rows, probs, group.positions + 1)
            return
        for j, session in enumerate(group.sessions):
            row = group.rows[j : j + 1]
            if session in moved:
                group.batch.fail_rows(row, self._gone(session))
            else:
                group.batch.fill(row, probs[j : j + 1], group.positions[j : j + 1] + 1)

    def _end(self, session: Session, reason: str) -> None:
        self.table.end(session, reason)
        self.observer.session_event(reason)

    def _gone(self, session: Session) -> SeqServeError:
        if session.ended == "moved":
            return SessionMoved(
                f"session {session.id!r} was taken over by another replica; "
                "retry (it resumes where that replica left it)"
            )
        return SessionNotFound(
            f"session {session.id!r} {session.ended} at position {session.position}",
            reason=session.ended,
            position=session.position,
        )

    def _fail_pending(self, session: Session) -> None:
        while session.pending:
            _fail(session.pending.popleft().future, self._gone(session))
        session.pending = None


def gap_error(session: Session, position: int) -> PositionError:
    """Frames are missing before ``position``. For a session restored from a checkpoint (a
    snapshot, or the shared store) that was behind what had been applied, and not advanced since,
    they were lost in a crash: say so, and name the last durable position."""
    expected = session.accepted
    if session.restored:
        return PositionError(
            f"session {session.id!r} was restored from its last checkpoint, at position "
            f"{expected}, after an unclean stop; frames from {expected} on were lost: resend "
            f"from {expected}",
            reason="rolled_back",
            expected=expected,
        )
    return PositionError(
        f"position {position} leaves a gap: session {session.id!r} expects {expected}",
        reason="position_gap",
        expected=expected,
    )


def _run_jobs(
    runtime: Runtime, jobs: list[tuple[str, np.ndarray, list[np.ndarray]]]
) -> list[tuple[np.ndarray, list[np.ndarray], float]]:
    out = []
    for graph, frames, states in jobs:
        started = time.perf_counter()
        run: Callable[..., tuple[np.ndarray, list[np.ndarray]]] = (
            runtime.step if graph == "step" else runtime.sequence
        )
        probs, new_states = run(frames, states)
        out.append((probs, new_states, time.perf_counter() - started))
    return out


def _resolve(future: Sink, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: Sink, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
