"""An in-process session store with the semantics of ``RedisStore``'s scripts: for tests of the
handover and write-back logic (fast, with a clock and outages under the test's control), and for
several engines in one process sharing sessions. Several ``MemoryStore``s share one ``Shelf`` the
way several replicas share one Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .store import (
    CallKind,
    CallOutcome,
    Checkpoint,
    Claim,
    CommitOutcome,
    Commits,
    Peek,
    StoreUnavailable,
)

__all__ = ["MemoryStore", "Shelf"]


@dataclass(slots=True)
class _Entry:
    owner: str
    head: int
    closed: bool = False
    position: int | None = None  # of the last full checkpoint (None: never had one)
    data: bytes = b""
    principal: str = ""
    expires_at: float = 0.0


@dataclass
class Shelf:
    """What the replicas share: the sessions, and whether the store answers at all."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    where: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (tag, expiry)
    clock: Callable[[], float] = time.monotonic
    down: bool = False  # every call fails (the store is unreachable)

    def locate(self, key: str) -> str | None:
        found = self.where.get(key)
        if found is None or found[1] <= self.clock():
            return None
        return found[0]

    def get(self, session_id: str) -> _Entry | None:
        entry = self.entries.get(session_id)
        if entry is not None and entry.expires_at <= self.clock():
            del self.entries[session_id]
            return None
        return entry


class MemoryStore:
    def __init__(
        self,
        shelf: Shelf,
        *,
        replica: str,
        ttl: float,
        namespace: str = "",
        where: str = "",
        tag: str = "",
    ) -> None:
        self.url = "memory://"
        self.shelf = shelf
        self.namespace = namespace  # sessions of another namespace (version) are not seen
        self.where, self.tag = where, tag
        self.replica = replica
        self.ttl = ttl
        self.calls: list[str] = []  # every call made, in order (tests read it)
        self.observe: Callable[[CallKind, float, CallOutcome], None] = lambda kind, sec, out: None

    @property
    def available(self) -> bool:
        return not self.shelf.down

    def _call(self, kind: CallKind) -> bool:
        self.calls.append(kind)
        self.observe(kind, 0.0, "failed" if self.shelf.down else "ok")
        return not self.shelf.down

    def _expiry(self) -> float:
        return self.shelf.clock() + self.ttl

    async def ping(self) -> bool:
        return self._call("ping")

    async def claim(self, items: Sequence[tuple[str, str]]) -> list[Claim]:
        if not self._call("claim"):
            raise StoreUnavailable("the session store cannot be reached; retry shortly")
        out: list[Claim] = []
        for session_id, principal in items:
            entry = self.shelf.get(self.namespace + session_id)
            if entry is None or entry.position is None:
                where = self.shelf.locate(self.where + session_id)
                if where is not None and where != self.tag:
                    out.append(Claim("elsewhere", where=where))
                else:
                    out.append(Claim("none"))
            elif entry.principal != principal:
                out.append(Claim("foreign"))
            elif entry.closed:
                out.append(Claim("closed", final_position=entry.head))
            else:
                head = entry.head
                entry.owner, entry.head = self.replica, entry.position
                entry.expires_at = self._expiry()
                out.append(Claim("ok", Checkpoint(entry.position, head, entry.data)))
        return out

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        if not self._call("peek"):
            raise StoreUnavailable("the session store cannot be reached; retry shortly")
        entry = self.shelf.get(self.namespace + session_id)
        if entry is None:
            where = self.shelf.locate(self.where + session_id)
            if where is not None and where != self.tag:
                return Peek(0, 0, False, 0.0, where=where)
            return None
        if entry.principal != principal:
            return None
        position = entry.head if entry.position is None else entry.position
        expires_in = max(0.0, entry.expires_at - self.shelf.clock())
        return Peek(entry.head, position, entry.closed, expires_in)

    async def owner(self, session_id: str) -> str | None:
        if not self._call("owner"):
            return None
        entry = self.shelf.get(self.namespace + session_id)
        return "" if entry is None else entry.owner

    async def commit(self, commits: Commits) -> list[CommitOutcome] | None:
        if not self._call("commit"):
            return None
        out: list[CommitOutcome] = []
        at = 0
        for line in commits.lines.splitlines():
            session_id, expected, head, closed, full, principal = line.split("\t")
            is_full = full == "1"
            data = b""
            if is_full:
                data = commits.data[at : at + commits.record_bytes]
                at += commits.record_bytes
            key = self.namespace + session_id
            entry = self.shelf.get(key)
            if entry is None:
                ok = is_full
            elif entry.closed:
                ok = expected == "-1" and is_full
            else:
                ok = entry.owner == self.replica
            if not ok:
                out.append(CommitOutcome.MISSING if entry is None else CommitOutcome.TAKEN)
                continue
            if entry is None or (entry.closed and is_full):
                entry = self.shelf.entries[key] = _Entry(self.replica, int(head))
            entry.owner, entry.head, entry.closed = self.replica, int(head), closed == "1"
            if is_full:
                entry.position, entry.principal, entry.data = int(head), principal, data
            entry.expires_at = self._expiry()
            if self.where:
                self.shelf.where[self.where + session_id] = (self.tag, self._expiry())
            out.append(CommitOutcome.WRITTEN)
        return out

    async def close(self) -> None:
        pass
