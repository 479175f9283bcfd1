"""The shared session store: what every replica can read and write so that any of them can pick a
session up. ``Store`` is the protocol the handover and write-back logic use; ``RedisStore``
(redis_store.py) is the real one and ``MemoryStore`` (memory_store.py) an in-process one with the
same semantics, for tests and for several engines in one process.

A session in the store has an ``owner`` (the replica that created it or claimed it last), a
``head`` (frames applied so far, as its owner last reported), a closed flag, and from its last
full checkpoint: the position it was taken at, the state rows and output ring (``data``) and the
principal that owns the session. Only the owner's writes are accepted, so a frame is applied at
most once even when two replicas briefly serve one session.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .errors import SessionMoved, StoreUnavailable

__all__ = [
    "CallKind",
    "CallOutcome",
    "Checkpoint",
    "Claim",
    "ClaimKind",
    "CommitOutcome",
    "Commits",
    "Peek",
    "SessionMoved",
    "Store",
    "StoreUnavailable",
]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    position: int  # frames the saved state has applied
    head: int  # frames applied by the previous owner; > position: the difference was lost
    data: bytes  # float32: every state tensor's row, then the ring of recent outputs


ClaimKind = Literal["ok", "none", "foreign", "closed", "elsewhere"]
CallKind = Literal["ping", "claim", "peek", "owner", "commit"]
CallOutcome = Literal["ok", "failed", "skipped"]  # skipped: backing off after a failure


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming a session found: ``ok`` (taken over: ``checkpoint``), ``none`` (not in the
    store), ``foreign`` (another principal's), ``closed`` (at ``final_position``) or
    ``elsewhere`` (it lives on another version of the model: ``where`` names it)."""

    kind: ClaimKind
    checkpoint: Checkpoint | None = None
    final_position: int = 0
    where: str = ""


@dataclass(frozen=True, slots=True)
class Peek:
    """A session in the store, read without taking it over."""

    head: int  # frames applied, as its owner last reported
    position: int  # where its last full checkpoint is: a new owner resumes from here
    closed: bool
    expires_in: float  # seconds
    where: str = ""  # set (and nothing else) when it lives on another version of the model


@dataclass(frozen=True, slots=True)
class Commits:
    """One round's writes, columnar: a line per session (``id, expected head (-1: must not
    exist), new head, closed 0/1, full 0/1, principal``, tab-separated) and the full
    checkpoints' data rows, ``record_bytes`` each, in line order."""

    lines: str
    data: bytes
    record_bytes: int
    count: int


class CommitOutcome(enum.Enum):
    """What a commit did to one session."""

    WRITTEN = "1"
    TAKEN = "0"  # another replica owns it now (or it was closed): this copy is stale
    MISSING = "2"  # the store lost it and this was no full checkpoint: nothing written


class Store(Protocol):
    url: str
    replica: str
    observe: Callable[[CallKind, float, CallOutcome], None]  # the metrics hook

    @property
    def available(self) -> bool:
        """False while backing off after a failure (calls are skipped, not tried)."""
        ...

    async def ping(self) -> bool: ...

    async def claim(self, items: Sequence[tuple[str, str]]) -> list[Claim]:
        """Take sessions over: ``items`` are (id, principal). Raises StoreUnavailable."""
        ...

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        """The session without taking it over; None if absent or another principal's. Raises
        StoreUnavailable."""
        ...

    async def owner(self, session_id: str) -> str | None:
        """The replica owning the session ("" if none); None if the store is unreachable."""
        ...

    async def commit(self, commits: Commits) -> list[CommitOutcome] | None:
        """One compare-and-set per line; None if the store was not reached (nothing written)."""
        ...

    async def close(self) -> None: ...
