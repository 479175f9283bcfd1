"""Live sessions: ids, owners, the cap, idle expiry, and what became of ended ones.

Each live session has a slot in the state bank and a row in the table's ``columns`` (positions,
last use, groups in flight); the dict maps ids to sessions. Ended sessions leave a bounded
tombstone, so a late request learns ``expired`` or ``closed`` (and the final position) instead of
a bare ``unknown``. Expiry scans the last-use column, so touching a session is one array write.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import (
    BadRequest,
    CapacityExceeded,
    PositionError,
    SeqServeError,
    SessionExists,
    SessionMoved,
    SessionNotFound,
)
from .states import StateBank
from .work import Columns, EndReason, Session

__all__ = [
    "Quota",
    "Session",
    "SessionTable",
    "Tombstone",
    "check_session_id",
    "gap_error",
    "gone_error",
]

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def check_session_id(session_id: str) -> str:
    if not _ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "…"
        raise BadRequest(
            f"session id {shown!r} must be 1-128 characters of [A-Za-z0-9._:@-]",
            reason="bad_session_id",
        )
    return session_id


@dataclass(slots=True)
class Quota:
    """The caps on live sessions, shared by every session table of a server (one per model
    version): ``max_sessions`` in all, ``max_per_owner`` per principal (0: none)."""

    max_sessions: int
    max_per_owner: int = 0
    live: int = 0
    owned: dict[str, int] = field(default_factory=dict)

    def take(self, owner: str, per_owner_limit: bool = True) -> None:
        if self.live >= self.max_sessions:
            raise CapacityExceeded(f"session limit reached ({self.max_sessions} live sessions)")
        owned = self.owned.get(owner, 0)
        if per_owner_limit and self.max_per_owner and owned >= self.max_per_owner:
            raise CapacityExceeded(
                f"this principal already has {owned} live sessions (at most "
                f"{self.max_per_owner}); close one first",
                reason="principal_session_limit",
            )
        self.live += 1
        self.owned[owner] = owned + 1

    def give_back(self, owner: str) -> None:
        self.live -= 1
        left = self.owned[owner] - 1
        if left:
            self.owned[owner] = left
        else:
            del self.owned[owner]


@dataclass(frozen=True, slots=True)
class Tombstone:
    reason: EndReason
    position: int
    at: float
    owner: str = ""


class SessionTable:
    def __init__(
        self,
        bank: StateBank,
        *,
        max_sessions: int,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        max_tombstones: int = 100_000,
        max_per_owner: int = 0,
        quota: Quota | None = None,
    ) -> None:
        self.bank = bank
        self.max_sessions = min(max_sessions, bank.capacity)
        self.quota = quota or Quota(self.max_sessions, max_per_owner)
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.columns = Columns(bank.capacity)
        self._live: dict[str, Session] = {}
        self._by_slot: list[Session | None] = [None] * bank.capacity
        self._ended: OrderedDict[str, Tombstone] = OrderedDict()
        self._max_tombstones = max_tombstones
        # The live session by that id, or None: the dict's own get, on every step's hot path.
        self.find: Callable[[str], Session | None] = self._live.get

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._live.values()))

    def at(self, slot: int) -> Session | None:
        """The live session in ``slot``."""
        return self._by_slot[slot]

    def at_slots(self, slots: np.ndarray) -> list[Session]:
        """The live sessions in ``slots`` (each must hold one)."""
        by_slot = self._by_slot
        return [by_slot[s] for s in slots.tolist()]

    def create(
        self,
        session_id: str | None = None,
        *,
        position: int = 0,
        last_used: float | None = None,
        owner: str = "",
        per_owner_limit: bool = True,
    ) -> Session:
        if session_id is None:
            session_id = uuid.uuid4().hex
        check_session_id(session_id)
        if session_id in self._live:
            raise SessionExists(f"session {session_id!r} already exists")
        if len(self._live) >= self.max_sessions:
            raise CapacityExceeded(f"session limit reached ({self.max_sessions} live sessions)")
        self.quota.take(owner, per_owner_limit)
        slot = self.bank.allocate()
        columns = self.columns
        columns.reset(slot, position, self.clock() if last_used is None else last_used)
        session = Session(
            session_id, slot, columns, slot, int(columns.generation[slot]), owner=owner
        )
        self._live[session_id] = session
        self._by_slot[slot] = session
        self._ended.pop(session_id, None)
        return session

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The live session, or SessionNotFound. With ``owner`` given, another principal's
        session (live or ended) is answered exactly like one that never existed."""
        session = self._live.get(session_id)
        if session is not None and (owner is None or session.owner == owner):
            return session
        check_session_id(session_id)
        tomb = self._ended.get(session_id)
        if session is not None or tomb is None or (owner is not None and tomb.owner != owner):
            raise SessionNotFound(f"session {session_id!r} is unknown", reason="unknown")
        raise SessionNotFound(
            f"session {session_id!r} {tomb.reason} at position {tomb.position}; "
            "start a new one (position 0, start=true)",
            reason=tomb.reason,
            position=tomb.position,
        )

    def knows(self, session_id: str) -> bool:
        """Live here, or ended here (a tombstone)."""
        return session_id in self._live or session_id in self._ended

    def touch(self, session: Session) -> None:
        self.columns.last_used[session.slot] = self.clock()

    def touch_slots(self, slots: np.ndarray) -> None:
        self.columns.last_used[slots] = self.clock()

    def tombstones(self) -> list[tuple[str, Tombstone]]:
        """The sessions that ended here (as far as remembered), oldest first."""
        return list(self._ended.items())

    def bury(self, session_id: str, reason: EndReason, position: int, owner: str) -> None:
        """Record a session that ended elsewhere (another replica), unless it is live here."""
        if session_id not in self._live:
            self._tombstone(session_id, Tombstone(reason, position, self.clock(), owner))

    def end(self, session: Session, reason: EndReason) -> None:
        """Free the session's slot and leave a tombstone. Idempotent."""
        if session.ended or self._live.get(session.id) is not session:
            return
        position = session.position
        session.ended = reason
        session.columns, session.row = self.columns.detach(session.slot), 0
        del self._live[session.id]
        self._by_slot[session.slot] = None
        self.quota.give_back(session.owner)
        self.columns.generation[session.slot] += 1
        self.bank.release(session.slot)
        self._tombstone(session.id, Tombstone(reason, position, self.clock(), session.owner))

    def _tombstone(self, session_id: str, tomb: Tombstone) -> None:
        self._ended[session_id] = tomb
        self._ended.move_to_end(session_id)
        while len(self._ended) > self._max_tombstones:
            self._ended.popitem(last=False)

    def expired(self) -> list[Session]:
        """Sessions idle past the timeout with nothing queued or running, oldest first."""
        deadline = self.clock() - self.idle_timeout
        high = self.bank.high_water
        columns = self.columns
        stale = np.flatnonzero(
            (columns.last_used[:high] <= deadline)
            & ~columns.queued[:high]
            & (columns.holds[:high] == 0)
        )
        found = [s for s in (self._by_slot[i] for i in stale.tolist()) if s is not None]
        found.sort(key=lambda s: s.last_used)
        return found

    def expires_in(self, session: Session) -> float:
        return max(0.0, session.last_used + self.idle_timeout - self.clock())

    def lookup(self, ids: Sequence[str], owner: str) -> tuple[np.ndarray, np.ndarray]:
        """Slots and generations of the live sessions ``ids`` that ``owner`` holds (-1: none)."""
        live = self._live.get
        slots = np.full(len(ids), -1, np.intp)
        for i, session_id in enumerate(ids):
            session = live(session_id)
            if session is not None and session.owner == owner:
                slots[i] = session.slot
        generations = np.where(slots >= 0, self.columns.generation[slots], -1)
        return slots, generations


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


def gone_error(session: Session) -> SeqServeError:
    """What a request for an ended session learns."""
    if session.ended == "moved":
        return SessionMoved(
            f"session {session.id!r} was taken over by another replica; "
            "retry (it resumes where that replica left it)"
        )
    return SessionNotFound(
        f"session {session.id!r} {session.ended} at position {session.position}",
        reason=session.ended or "unknown",
        position=session.position,
    )
