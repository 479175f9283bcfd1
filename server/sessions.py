"""Live sessions: ids, positions, idle expiry, the cap, and what became of ended ones.

The table is an ``OrderedDict`` kept in least-recently-used order, so expiry looks only at its
head. Ended sessions leave a bounded tombstone, so a late request learns ``expired`` or ``closed``
(and the final position) instead of a bare ``unknown``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, CapacityExceeded, SessionExists, SessionNotFound
from .states import StateBank

__all__ = ["Session", "SessionTable", "Tombstone", "check_session_id"]

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def check_session_id(session_id: str) -> str:
    if not _ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "…"
        raise BadRequest(
            f"session id {shown!r} must be 1-128 characters of [A-Za-z0-9._:@-]",
            reason="bad_session_id",
        )
    return session_id


@dataclass(slots=True, eq=False)
class Session:
    id: str
    slot: int
    position: int = 0  # frames applied
    accepted: int = 0  # position after every queued request
    last_used: float = 0.0
    # Scheduler work items, in order; made on first use (an empty deque is 760 B, and most
    # sessions are idle most of the time).
    pending: deque[Any] | None = None
    scheduled: bool = False  # in the scheduler's ready queue or in a running batch
    ended: str = ""  # "closed" / "expired" once gone
    restored: bool = False  # loaded from a snapshot and not advanced since
    owner: str = ""  # the principal that opened it ("" when authentication is off)
    holds: int = 0  # StepBatch groups queued or running with a frame of this session
    last_group: int = 0  # number of the latest such group
    synced: int = -1  # head last written to the shared store (-1: not there yet)
    saved: int = 0  # position of its last full checkpoint there


@dataclass(frozen=True, slots=True)
class Tombstone:
    reason: str
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
    ) -> None:
        self.bank = bank
        self.max_sessions = min(max_sessions, bank.capacity)
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._live: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, Tombstone] = OrderedDict()
        self._max_tombstones = max_tombstones
        self.max_per_owner = max_per_owner  # 0: unlimited
        self._owned: dict[str, int] = {}  # live sessions per owner
        # The live session by that id, or None: the dict's own get, on every step's hot path.
        self.find: Callable[[str], Session | None] = self._live.get

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._live.values()))

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
        owned = self._owned.get(owner, 0)
        if per_owner_limit and self.max_per_owner and owned >= self.max_per_owner:
            raise CapacityExceeded(
                f"this principal already has {owned} live sessions (at most "
                f"{self.max_per_owner}); close one first",
                reason="principal_session_limit",
            )
        now = self.clock()
        session = Session(
            session_id,
            self.bank.allocate(),
            position,
            position,
            now if last_used is None else last_used,
            owner=owner,
        )
        self._live[session_id] = session
        self._owned[owner] = owned + 1
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

    def touch(self, session: Session) -> None:
        session.last_used = self.clock()
        self._live.move_to_end(session.id)

    def bury(self, session_id: str, reason: str, position: int, owner: str) -> None:
        """Record a session that ended elsewhere (another replica), unless it is live here."""
        if session_id not in self._live:
            self._ended[session_id] = Tombstone(reason, position, self.clock(), owner)
            while len(self._ended) > self._max_tombstones:
                self._ended.popitem(last=False)

    def touch_many(self, sessions: list[Session]) -> None:
        now = self.clock()
        move = self._live.move_to_end
        for session in sessions:
            session.last_used = now
            move(session.id)

    def end(self, session: Session, reason: str) -> None:
        """Free the session's slot and leave a tombstone. Idempotent."""
        if session.ended or self._live.get(session.id) is not session:
            return
        session.ended = reason
        del self._live[session.id]
        left = self._owned[session.owner] - 1
        if left:
            self._owned[session.owner] = left
        else:
            del self._owned[session.owner]
        self.bank.release(session.slot)
        self._ended[session.id] = Tombstone(reason, session.position, self.clock(), session.owner)
        while len(self._ended) > self._max_tombstones:
            self._ended.popitem(last=False)

    def expired(self) -> list[Session]:
        """Sessions idle past the timeout with nothing queued or running, oldest first."""
        deadline = self.clock() - self.idle_timeout
        found = []
        for session in self._live.values():
            if session.last_used > deadline:
                break
            if not session.pending and not session.scheduled and not session.holds:
                found.append(session)
        return found

    def expires_in(self, session: Session) -> float:
        return max(0.0, session.last_used + self.idle_timeout - self.clock())
