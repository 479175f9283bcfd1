"""Which sessions this process may serve from memory, and taking over the others.

Without a shared store (``Local``) every session lives here: nothing is claimed. With one
(``Shared``), a request for a session this replica does not hold *claims* it from the store first
(one pipelined round trip for every claim asked for in one loop turn), and every request for it
waits, in arrival order, until the claim is answered:

- ``ok``: the checkpoint becomes a live session here (its head may be ahead of the checkpoint
  when the previous owner died with ``checkpoint_every`` > 1: the client is told ``rolled_back``);
- ``none``: not in the store, so an ordinary unknown or new session;
- ``foreign``: another principal's, answered exactly like an unknown id (or ``session_exists``
  to a start);
- ``closed``: a tombstone with the final position.

When the store cannot be reached a request for an unknown session fails ``store_unavailable``,
except a start at position 0, which goes ahead in memory (the store catches up at its next write).
A request *ahead* of this replica's copy may mean another replica took the session over and moved
it on: the store is asked who owns it, and if it is another replica the copy is dropped and the
session claimed back. A ``StepBatch`` with entries to claim waits as a whole, and batches are
admitted in arrival order, so one batch's entries never overtake an earlier batch's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import (
    PositionError,
    SeqServeError,
    SessionExists,
    SessionNotFound,
    StoreUnavailable,
    VersionElsewhere,
)
from .observer import BatchObserver
from .sessions import SessionTable
from .store import Claim, Peek, Store
from .work import Session

__all__ = ["Handover", "Local", "Shared"]

log = logging.getLogger("seqserve.handover")

Admit = Callable[[], None]
Fail = Callable[[Exception], None]
AdmitBatch = Callable[[dict[str, Exception]], None]


class Handover(Protocol):
    @property
    def store(self) -> Store | None: ...

    def held(self, session_id: str) -> bool:
        """The session can be served from memory now (held here, or unknown to every replica),
        with no claim outstanding."""
        ...

    def after_claim(
        self, session_id: str, principal: str, creating: bool, admit: Admit, fail: Fail
    ) -> None:
        """Run ``admit`` once the store was asked for the session (after every request for it
        that came earlier); errors go to ``fail``. ``creating``: a start at position 0."""
        ...

    def recheck(
        self, session_id: str, principal: str, error: PositionError, admit: Admit, fail: Fail
    ) -> bool:
        """``error`` may mean another replica moved the session on: if the store must be
        asked, take the request over (``admit`` or ``fail`` later) and return True."""
        ...

    def admit_batch(self, ids: Iterable[str], principal: str, admit: AdmitBatch) -> bool:
        """A batch's entries: if some must be claimed first (or earlier batches still wait),
        queue it and return True; ``admit`` then runs with each failed claim's error by id."""
        ...

    async def claimed(self, session_id: str, principal: str) -> None:
        """Return once the session is held here (claimed first if need be)."""
        ...

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        """A session another replica holds, read from the store (None: not there)."""
        ...

    @property
    def busy(self) -> bool:
        """Claims or batches are waiting on the store."""
        ...

    async def close(self) -> None: ...


class Local:
    """Every session lives in this process."""

    store: Store | None = None
    busy = False

    def held(self, session_id: str) -> bool:
        return True

    def after_claim(
        self, session_id: str, principal: str, creating: bool, admit: Admit, fail: Fail
    ) -> None:
        _run(admit, fail)

    def recheck(
        self, session_id: str, principal: str, error: PositionError, admit: Admit, fail: Fail
    ) -> bool:
        return False

    def admit_batch(self, ids: Iterable[str], principal: str, admit: AdmitBatch) -> bool:
        return False

    async def claimed(self, session_id: str, principal: str) -> None:
        pass

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        return None

    async def close(self) -> None:
        pass


@dataclass(slots=True, eq=False)
class _Backlogged:
    """A batch waiting for claims (or for batches ahead of it) before its admission."""

    left: int  # claims still outstanding
    errors: dict[str, Exception]  # what a claim failed with, by session id
    admit: AdmitBatch


@dataclass(frozen=True, slots=True)
class _Waiter:
    admit: Admit
    fail: Fail
    creating: bool  # a start at position 0: may go ahead in memory when the store is down


class Adopt(Protocol):
    def __call__(self, session_id: str, principal: str, claim: Claim) -> None: ...


class Shared:
    """Sessions shared by replicas through ``store``. ``adopt`` makes a claimed checkpoint a live
    session here (the engine's, which owns the table and the state bank)."""

    def __init__(
        self, store: Store, table: SessionTable, observer: BatchObserver, adopt: Adopt
    ) -> None:
        self.store = store
        self.table = table
        self.observer = observer
        self.adopt = adopt
        # Sessions being claimed: what to admit, in arrival order, once the store answered.
        self._claims: dict[str, list[_Waiter]] = {}
        self._to_claim: list[tuple[str, str]] = []  # (id, principal) for the next store call
        self._backlog: deque[_Backlogged] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return bool(self._claims or self._backlog or self._tasks)

    def held(self, session_id: str) -> bool:
        return session_id not in self._claims and self.table.find(session_id) is not None

    def admit_batch(self, ids: Iterable[str], principal: str, admit: AdmitBatch) -> bool:
        find, claims = self.table.find, self._claims
        missing = {i for i in ids if i in claims or find(i) is None}
        if not missing and not self._backlog:
            return False
        waiting = _Backlogged(len(missing), {}, admit)
        self._backlog.append(waiting)
        for session_id in missing:
            self.after_claim(
                session_id,
                principal,
                False,
                lambda waiting=waiting, sid=session_id: self._unblock(waiting, sid, None),  # type: ignore[misc]
                lambda exc, waiting=waiting, sid=session_id: self._unblock(waiting, sid, exc),  # type: ignore[misc]
            )
        self._pump()
        return True

    def _unblock(self, waiting: _Backlogged, session_id: str, error: Exception | None) -> None:
        if error is not None:
            waiting.errors[session_id] = error
        waiting.left -= 1
        self._pump()

    def _pump(self) -> None:
        while self._backlog and not self._backlog[0].left:
            waiting = self._backlog.popleft()
            waiting.admit(waiting.errors)

    def recheck(
        self, session_id: str, principal: str, error: PositionError, admit: Admit, fail: Fail
    ) -> bool:
        session = self.table.find(session_id)
        if (
            session is None
            or error.reason != "position_gap"
            or session.pending
            or (session.scheduled or session.holds)
        ):
            return False
        self.after_claim(session_id, principal, False, admit, fail, probe=session)
        return True

    async def claimed(self, session_id: str, principal: str) -> None:
        if self.held(session_id):
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.after_claim(
            session_id, principal, False, lambda: done.set_result(None), done.set_exception
        )
        await done

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        return await self.store.peek(session_id, principal)

    def after_claim(
        self,
        session_id: str,
        principal: str,
        creating: bool,
        admit: Admit,
        fail: Fail,
        *,
        probe: Session | None = None,
    ) -> None:
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
        try:
            replies = await self.store.claim(items)
        except StoreUnavailable as exc:
            for session_id, principal in items:
                self._claimed(session_id, principal, Claim("none"), exc)
            return
        for (session_id, principal), claim in zip(items, replies, strict=True):
            self._claimed(session_id, principal, claim, None)

    async def _probe(self, session_id: str, principal: str, probe: Session) -> None:
        """The session is held here, but a request was ahead of it: claim it only if the store
        names another owner."""
        owner = await self.store.owner(session_id)
        if owner is None or owner in ("", self.store.replica) or probe.ended:
            self._claimed(session_id, principal, None, None)
            return
        log.info("session %r moved to replica %r; taking it back", session_id, owner)
        self.table.end(probe, "moved")
        self.observer.session_event("moved")
        await self._claim([(session_id, principal)])

    def _claimed(
        self, session_id: str, principal: str, claim: Claim | None, error: Exception | None
    ) -> None:
        """Take on what the store said (None: keep the copy held here), then admit every
        waiting request in arrival order."""
        try:
            if claim is not None and claim.kind == "ok":
                self.adopt(session_id, principal, claim)
            elif claim is not None and claim.kind == "closed":
                self.table.bury(session_id, "closed", claim.final_position, principal)
        except SeqServeError as exc:  # the session cap, a bad id
            error = exc
        except Exception as exc:  # a corrupt checkpoint: say so, never INTERNAL
            log.exception("resuming session %r from the store failed", session_id)
            error = StoreUnavailable(
                f"session {session_id!r} could not be resumed from the shared store: {exc}"
            )
        foreign = claim is not None and claim.kind == "foreign"
        if claim is not None and claim.kind == "elsewhere":
            error = VersionElsewhere(
                f"session {session_id!r} lives on version {claim.where} of its model",
                where=claim.where,
            )
        for waiter in self._claims.pop(session_id, []):
            problem = error
            if isinstance(error, VersionElsewhere):
                problem = error
            elif isinstance(error, StoreUnavailable) and (
                waiter.creating or self.table.find(session_id) is not None
            ):
                problem = None  # a new session starts in memory; the store catches up
            elif foreign:
                problem = (
                    SessionExists(f"session {session_id!r} already exists")
                    if waiter.creating
                    else SessionNotFound(f"session {session_id!r} is unknown")
                )
            _run(waiter.admit, waiter.fail, problem)

    async def close(self) -> None:
        await self.store.close()


def _run(admit: Admit, fail: Fail, problem: Exception | None = None) -> None:
    try:
        if problem is not None:
            raise problem
        admit()
    except SeqServeError as exc:
        fail(exc)


def restore_rows(
    data: bytes, state_floats: int, ring_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's bytes as (state row, output ring); ValueError if they do not fit."""
    values = np.frombuffer(data, np.float32)
    ring = int(np.prod(ring_shape))
    if values.size != state_floats + ring:
        raise ValueError(
            f"checkpoint holds {values.size} values; this model and replay window need "
            f"{state_floats} + {ring}"
        )
    return values[:state_floats], values[state_floats:].reshape(ring_shape)
