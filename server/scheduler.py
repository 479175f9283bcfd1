"""Batches one pending request from each of many sessions into one onnxruntime call.

Every session has a FIFO of work; the ready queue holds sessions (not requests), so a batch takes
at most one request per session and a session's requests run strictly in order. Positions are
checked when a request reaches the head of its session's queue, which lets clients pipeline
requests. Single-frame requests share one ``step`` call; multi-frame requests of equal length share
one ``sequence`` call. States are gathered from the bank on the event loop, the graphs run in a
worker thread (small batches inline), and the new states are scattered back on the loop, so
nothing else ever touches a slot while its batch runs. Resets and closes travel through the same
queue, so they order cleanly against steps.

``StepBatch`` entries of sessions with nothing queued arrive as groups (``work.Group``): columns
of slots, positions and frames that join the step call and are advanced with array operations.
How answers reach their callers (at once, or after a shared-store write) is ``answers``' business.
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

import numpy as np

from .errors import PositionError, SessionMoved
from .observer import BatchObserver
from .runtime import ModelRunner
from .sessions import SessionTable, gap_error, gone_error
from .work import Action, EndReason, Graph, Group, Session, StepResult, Work
from .writeback import Answers, Immediate, fail, resolve

__all__ = ["Scheduler"]

log = logging.getLogger("seqserve.scheduler")

# graph, works, slots, frames, states, positions (each frame's index in its session)
_Job = tuple[Graph, list[Work], np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]
_Input = tuple[Graph, np.ndarray, list[np.ndarray], np.ndarray]
_Output = tuple[np.ndarray, list[np.ndarray], float]


@dataclass(slots=True, eq=False)
class _Round:
    """What one round took: sessions (their head request each), groups, and the calls to run."""

    taken: list[Session] = field(default_factory=list)
    held: list[Session] = field(default_factory=list)  # ready, but a group of theirs is ahead
    steps: list[Work] = field(default_factory=list)
    fast: list[Group] = field(default_factory=list)
    last_group: int = 0
    jobs: list[_Job] = field(default_factory=list)
    started: float = 0.0
    closed: bool = False

    @property
    def floats(self) -> int:
        return sum(job[3].size for job in self.jobs)

    def inputs(self) -> list[_Input]:
        return [(job[0], job[3], job[4], job[5]) for job in self.jobs]


class Scheduler:
    def __init__(
        self,
        runtime: ModelRunner,
        table: SessionTable,
        executor: Executor,
        *,
        max_batch: int,
        max_wait: float = 0.0,
        inline_batch: int = 0,
        observer: BatchObserver | None = None,
        answers: Answers | None = None,
        version: int = 0,
    ) -> None:
        self.runtime = runtime
        self.version = version  # the model version this scheduler runs, named in every answer
        self.table = table
        self.columns = table.columns
        self.bank = table.bank
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        # Frames, counted in floats, of batches small enough to run on the loop (a window
        # runtime does ``cost`` cell steps per frame).
        self.inline_floats = inline_batch * runtime.spec.features // runtime.cost
        self.observer = observer or BatchObserver()
        self.answers: Answers = answers or Immediate()
        self._ready: deque[Session] = deque()
        self._groups: deque[Group] = deque()
        self._groups_seq = 0  # the last number given to a group
        self._groups_done = 0  # every group up to this number has run
        self._unsure = False  # an inference failure left accepted positions that never came
        self._hot = False  # a request ran alone in this loop turn: the others queue
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
            if self._alone(work):
                self._run_alone()
            elif not self._wake.is_set():
                self._wake.set()
                self._idle.clear()

    def _alone(self, work: Work) -> bool:
        """A small request arriving while the scheduler is idle, with no other request seen in
        this loop turn: it runs at once, saving the loop turns of waking the scheduler. Requests
        arriving in the same turn as another one queue as usual, so they still batch."""
        return (
            self._idle.is_set()
            and not self._hot
            and not self.max_wait  # asked to wait for batches to fill
            and self._task is not None
            and self.answers.immediate
            and len(self._ready) == 1
            and not self._groups
            and work.frames is not None
            and work.frames.size <= self.inline_floats
        )

    def _run_alone(self) -> None:
        self._hot = True
        asyncio.get_running_loop().call_soon(self._cool)
        rnd = self._take()
        if rnd is None:
            return
        if rnd.jobs:
            self._run_inline(rnd)
        else:
            self._close(rnd)
        if (self._ready or self._groups) and not self._wake.is_set():
            self._wake.set()
            self._idle.clear()

    def _cool(self) -> None:
        self._hot = False

    def next_group(self) -> int:
        self._groups_seq += 1
        return self._groups_seq

    def submit_group(self, group: Group) -> None:
        self._groups.append(group)
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()

    def control(self, session: Session, action: Action) -> asyncio.Future[Session]:
        future: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
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
        await self.answers.settle()  # the last round's answers wait for its write

    async def _run(self) -> None:
        """Rounds back to back. While a round's batch runs in the worker thread, the loop
        admits requests and answers earlier rounds. Without --max-wait-ms, once a batch is done
        the next round is formed and handed to the worker *before* the done one is written back,
        so the worker waits only for a gather and the write-back overlaps the next batch. Two
        rounds never share a session: a session stays scheduled (a group's sessions held) until
        its round is written back, and groups sharing sessions run in order."""
        loop = asyncio.get_running_loop()
        running: tuple[_Round, asyncio.Future[list[_Output]]] | None = None
        while True:
            outputs: list[_Output] | None = None
            if running is not None:
                try:
                    outputs = await running[1]
                except asyncio.CancelledError:
                    self._close(running[0])
                    raise
                except Exception:
                    log.exception("inference failed")
                if self.max_wait:  # batches are to fill up: write back, then form the next
                    self._complete(running[0], outputs)
                    running = None
                    continue
            elif not self._ready and not self._groups:
                await self.answers.settle()  # idle means answered, so written too
                if self._ready or self._groups:
                    continue
                self._wake.clear()
                self._idle.set()
                await self._wake.wait()
                continue
            elif self.max_wait and len(self._ready) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            following: tuple[_Round, asyncio.Future[list[_Output]]] | None = None
            if self._ready or self._groups:
                rnd = self._take()
                if rnd is not None and not rnd.jobs:
                    self._close(rnd)
                elif rnd is not None and running is None and rnd.floats <= self.inline_floats:
                    self._run_inline(rnd)
                elif rnd is not None:
                    following = (
                        rnd,
                        loop.run_in_executor(self.executor, _run_jobs, self.runtime, rnd.inputs()),
                    )
            if running is not None:
                self._complete(running[0], outputs)
            running = following

    def _run_inline(self, rnd: _Round) -> None:
        """A small batch: a thread hop costs more than its run (measured: ~0.2 ms vs ~0.09 ms
        for one step), so it runs right here on the loop."""
        try:
            outputs = _run_jobs(self.runtime, rnd.inputs())
        except Exception:
            log.exception("inference failed")
            outputs = None
        self._complete(rnd, outputs)

    def _complete(self, rnd: _Round, outputs: list[_Output] | None) -> None:
        try:
            if outputs is None:
                self._failed(rnd)
            else:
                self._apply(rnd, outputs)
        except Exception:  # keep serving; the round's requests are failed in _close
            log.exception("scheduler round failed")
        finally:
            self._close(rnd)

    # -- one round ----------------------------------------------------------------------------

    def _take(self) -> _Round | None:
        """Form a round: groups whose earlier groups are done, and the head request of up to
        ``max_batch`` ready sessions (controls, replays and refusals are settled here)."""
        rnd = _Round()
        try:
            # Groups run in arrival order; one that shares a session with a group still queued
            # or running ahead of it waits for a later round.
            # At most max_batch frames of groups in a round (at least one group): a round that
            # took every group queued would leave nothing to overlap with its run.
            rows = 0
            while self._groups and self._groups[0].after <= self._groups_done:
                if rnd.fast and rows + len(self._groups[0]) > self.max_batch:
                    break
                rows += len(self._groups[0])
                rnd.fast.append(self._groups.popleft())
            rnd.last_group = rnd.fast[-1].seq if rnd.fast else 0
            holds = self.columns.holds
            sequences: dict[int, list[Work]] = {}
            for _ in range(min(len(self._ready), self.max_batch)):
                session = self._ready.popleft()
                if holds[session.slot]:  # a group has frames of it in flight: those go first
                    rnd.held.append(session)
                    continue
                rnd.taken.append(session)
                assert session.pending  # it is ready because it has work
                work = session.pending.popleft()
                if self._prepare(work):
                    assert work.frames is not None
                    if len(work.frames) == 1:
                        rnd.steps.append(work)
                    else:
                        sequences.setdefault(len(work.frames), []).append(work)
            if rnd.fast and self._unsure:
                rnd.fast = self._check_groups(rnd.fast)
            self._jobs(rnd, list(sequences.values()))
        except Exception:
            log.exception("scheduler round failed")
            self._failed(rnd)
            self._close(rnd)
            return None
        return rnd

    def _close(self, rnd: _Round) -> None:
        """The round is over: its groups count as done, its sessions may run again."""
        if rnd.closed:
            return
        rnd.closed = True
        if rnd.last_group:
            self._groups_done = max(self._groups_done, rnd.last_group)
            for lane in rnd.fast:
                self._release(lane)
        self._ready.extend(rnd.held)
        for session in rnd.taken:
            if session.ended:
                self._fail_pending(session)
            if session.pending:
                self._ready.append(session)
            else:
                session.pending = None  # idle again: give the deque back
                session.scheduled = False
        self.answers.round_done()

    def _alive(self, lane: Group) -> np.ndarray:
        """Which of a group's sessions still hold their slots (a boolean mask)."""
        return self.columns.generation[lane.slots] == lane.generations

    def _release(self, lane: Group) -> None:
        """The group's frames are done with: its sessions may run other work again."""
        alive = self._alive(lane)
        self.columns.holds[lane.slots[alive]] -= 1

    def _check_groups(self, fast: list[Group]) -> list[Group]:
        """A group's frames were admitted against positions that work ahead of it would reach;
        if that work failed (inference error), the entries it would have continued fail too."""
        out = []
        for lane in fast:
            wrong = self.columns.position[lane.slots] != lane.positions
            for j in np.flatnonzero(wrong).tolist():
                session = self.table.at(int(lane.slots[j]))
                assert session is not None  # holds keep it alive
                session.accepted = session.position
                self.columns.holds[session.slot] -= 1
                lane.batch.fail_rows(
                    lane.rows[j : j + 1], gap_error(session, int(lane.positions[j]))
                )
            kept = lane.subset(~wrong) if wrong.any() else lane
            if len(kept):
                out.append(kept)
        return out

    def _prepare(self, work: Work) -> bool:
        """Settle what needs no model run (controls, replays, errors); True if frames remain."""
        session = work.session
        future = work.future
        if session.ended:
            fail(future, gone_error(session))
            return False
        if work.action == "reset":
            self.bank.zero(session.slot)
            session.position = session.accepted = 0
            self.answers.answer(future, session, session)
            return False
        if work.action == "close":
            self._end(session, "closed")
            self.answers.answer(future, session, session)
            return False
        assert work.frames is not None
        position, applied, count = work.position, session.position, len(work.frames)
        if position > applied:
            session.accepted = applied
            fail(future, gap_error(session, position))
            return False
        if position < applied:
            done = min(count, applied - position)
            if position < applied - self.bank.window:
                fail(
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
                resolve(
                    future,
                    StepResult(
                        session.id,
                        position,
                        work.prefix,
                        applied,
                        replayed=True,
                        version=self.version,
                    ),
                )
                return False
            work.frames = work.frames[done:]
        return True

    def _jobs(self, rnd: _Round, sequences: list[list[Work]]) -> None:
        """The round's onnxruntime calls, states gathered: one step call for single frames
        and the groups, one sequence call per length of multi-frame requests."""
        bank = self.bank
        steps, fast = rnd.steps, rnd.fast
        if steps or fast:
            slots = np.fromiter((w.session.slot for w in steps), np.intp, len(steps))
            frames = (
                np.stack([w.frames[0] for w in steps if w.frames is not None])
                if steps
                else np.empty((0, self.runtime.spec.features), np.float32)
            )
            positions = np.fromiter((w.session.position for w in steps), np.int64, len(steps))
            if fast:
                slots = np.concatenate([slots, *(g.slots for g in fast)])
                frames = np.concatenate([frames, *(g.frames for g in fast)])
                positions = np.concatenate([positions, *(g.positions for g in fast)])
            rnd.jobs.append(("step", steps, slots, frames, bank.gather(slots), positions))
        for group in sequences:
            slots = np.fromiter((w.session.slot for w in group), np.intp, len(group))
            frames = np.stack([w.frames for w in group if w.frames is not None])
            positions = np.fromiter((w.session.position for w in group), np.int64, len(group))
            rnd.jobs.append(("sequence", group, slots, frames, bank.gather(slots), positions))
        rnd.started = time.perf_counter()

    def _failed(self, rnd: _Round) -> None:
        """Inference failed (or the round could not be formed): fail what it carried."""
        self._unsure = True
        error = RuntimeError("inference failed")
        for job in rnd.jobs:
            for work in job[1]:
                fail(work.future, error)
        for work in rnd.steps:
            fail(work.future, error)
        for lane in rnd.fast:
            lane.batch.fail_rows(lane.rows, error)

    def _apply(self, rnd: _Round, outputs: list[_Output]) -> None:
        for (graph, works, slots, frames, _, _), (probs, states, seconds) in zip(
            rnd.jobs, outputs, strict=True
        ):
            waited = rnd.started - min(
                [w.queued_at for w in works] + [g.queued_at for g in rnd.fast]
            )
            self.observer.batch(
                graph,
                len(slots),
                frames.shape[0] * (1 if graph == "step" else frames.shape[1]),
                seconds,
                waited,
            )
            if graph == "step":
                self._apply_steps(works, rnd.fast, slots, probs, states)
            else:
                self._apply_sequences(works, slots, probs, states)

    def _apply_steps(
        self,
        works: list[Work],
        fast: list[Group],
        slots: np.ndarray,
        probs: np.ndarray,
        states: list[np.ndarray],
    ) -> None:
        """Write back one step's results: single requests, then the groups' columns. Sessions
        that ended while it ran (taken over by another replica) keep nothing of it."""
        columns, bank = self.columns, self.bank
        alive = np.fromiter((w.session.ended is None for w in works), np.bool_, len(works))
        if fast:
            alive = np.concatenate([alive, *(self._alive(g) for g in fast)])
        everyone = bool(alive.all())
        keep = slots if everyone else slots[alive]
        bank.scatter(keep, states if everyone else [s[alive] for s in states])
        positions = columns.position[slots]
        bank.record_steps(keep, positions if everyone else positions[alive], probs[alive])
        for i, work in enumerate(works):
            if work.session.ended:
                fail(work.future, gone_error(work.session))
            else:
                self._finish(work, probs[i : i + 1])
        at = len(works)
        for lane in fast:
            n = len(lane)
            lane_alive = alive[at : at + n]
            if lane_alive.all():
                columns.position[lane.slots] += 1
                columns.restored[lane.slots] = False
                self.answers.fill(lane, probs[at : at + n])
            else:
                for j in np.flatnonzero(~lane_alive).tolist():
                    lane.batch.fail_rows(lane.rows[j : j + 1], self._gone_slot(lane, j))
                live = lane.subset(lane_alive)
                columns.position[live.slots] += 1
                columns.restored[live.slots] = False
                self.answers.fill(live, probs[at : at + n][lane_alive])
            at += n

    def _gone_slot(self, lane: Group, j: int) -> Exception:
        return SessionMoved(
            f"entry {int(lane.rows[j])}: the session was taken over by another replica; retry"
        )

    def _apply_sequences(
        self, works: list[Work], slots: np.ndarray, probs: np.ndarray, states: list[np.ndarray]
    ) -> None:
        alive = np.fromiter((w.session.ended is None for w in works), np.bool_, len(works))
        if alive.all():
            self.bank.scatter(slots, states)
        else:
            self.bank.scatter(slots[alive], [s[alive] for s in states])
        for i, work in enumerate(works):
            if work.session.ended:
                fail(work.future, gone_error(work.session))
                continue
            self.bank.record(work.session.slot, work.session.position, probs[i])
            self._finish(work, probs[i])

    def _finish(self, work: Work, probs: np.ndarray) -> None:
        session = work.session
        session.restored = False
        first = session.position
        position = first + len(probs)
        session.position = position
        if session.accepted < position:
            session.accepted = position
        if work.prefix is not None:
            probs = np.concatenate([work.prefix, probs])
            first -= len(work.prefix)
        if work.end:
            self._end(session, "closed")
        self.answers.answer(
            work.future,
            StepResult(session.id, first, probs, position, ended=work.end, version=self.version),
            session,
        )

    def _end(self, session: Session, reason: EndReason) -> None:
        self.table.end(session, reason)
        self.observer.session_event(reason)

    def _fail_pending(self, session: Session) -> None:
        while session.pending:
            fail(session.pending.popleft().future, gone_error(session))
        session.pending = None


def _run_jobs(runtime: ModelRunner, jobs: list[_Input]) -> list[_Output]:
    out = []
    for graph, frames, states, positions in jobs:
        started = time.perf_counter()
        run: Callable[..., tuple[np.ndarray, list[np.ndarray]]] = (
            runtime.step if graph == "step" else runtime.sequence
        )
        probs, new_states = run(frames, states, positions)
        out.append((probs, new_states, time.perf_counter() - started))
    return out
