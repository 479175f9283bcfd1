"""Shared session checkpoints in Redis, so any replica can pick a session up.

Every replica keeps its hot sessions in memory (the state bank) and, after each scheduler round,
records what the round did in Redis with one script call: per session a compare-and-set of its
``head`` (the position applied so far) against the head this replica last wrote, and every
``checkpoint_every`` frames (and on close and drain) the state itself and the ring of recent
outputs. Only the replica that owns a session (the last to claim it) can move its head, so a
frame is applied at most once even when two replicas briefly serve the same session: the loser's
write fails, it drops its copy, and the request is answered ``session_moved``.

A replica that gets a request for a session it does not hold claims it: it takes the checkpoint,
becomes the owner and sets the head back to the checkpoint's position. If the head was ahead of
the checkpoint (``checkpoint_every`` > 1 and the previous owner died), the frames in between are
lost and the client is told so (``rolled_back``), exactly as after a restart from a snapshot.

Keys expire after the server's idle timeout, refreshed by every write. When Redis is down or
slow, rounds stop waiting for it (for ``retry_after`` seconds at a time) and serving goes on from
memory; the next write after it is back carries each session's state forward with the same
compare-and-set, so nothing is overwritten that another replica wrote meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import SeqServeError

__all__ = ["Checkpoint", "Commit", "RedisStore", "SessionMoved", "StoreUnavailable"]

log = logging.getLogger("seqserve.store")


class StoreUnavailable(SeqServeError):
    """The session is not held here and the shared store cannot be reached to resume it."""

    reason = "store_unavailable"


class SessionMoved(SeqServeError):
    """Another replica took the session over; this one dropped its copy. Retry: the request
    goes to (or reloads on) the current owner."""

    reason = "session_moved"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    position: int  # frames the saved state has applied
    head: int  # frames applied by the previous owner; > position: the difference was lost
    states: bytes  # float32 rows of every state tensor, concatenated
    ring: bytes  # the raw ring of recent outputs [window, classes]
    principal: str


@dataclass(frozen=True, slots=True)
class Commit:
    session_id: str
    expected: int  # head this replica last wrote; -1: the session must not exist yet
    head: int
    principal: str
    closed: bool = False
    states: bytes | None = None  # with ``ring``: a full checkpoint at ``head``
    ring: bytes = b""


# KEYS: one per session. ARGV: ttl_ms, owner, then 6 per session:
# expected, head, principal, closed, states ("" = head only), ring. Returns per session: 1
# written, 0 owned by another replica (or closed), 2 missing and this was not a full checkpoint.
_COMMIT = """
local ttl, owner = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 6
  local cur = redis.call('HMGET', KEYS[i], 'head', 'owner', 'closed')
  local ok
  if ARGV[a + 1] == '-1' or not cur[1] then
    -- new here, or gone from the store (flushed, restarted empty): only a full checkpoint
    ok = ((not cur[1]) or cur[3] == '1') and ARGV[a + 5] ~= ''
  else
    ok = cur[1] == ARGV[a + 1] and cur[2] == owner and cur[3] ~= '1'
  end
  if not ok and not cur[1] then
    out[i] = 2
  elseif ok then
    redis.call('HSET', KEYS[i], 'head', ARGV[a + 2], 'owner', owner,
               'principal', ARGV[a + 3], 'closed', ARGV[a + 4])
    if ARGV[a + 5] ~= '' then
      redis.call('HSET', KEYS[i], 'pos', ARGV[a + 2], 'state', ARGV[a + 5], 'ring', ARGV[a + 6])
    end
    redis.call('PEXPIRE', KEYS[i], ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS[1]: the session. ARGV: owner, principal, ttl_ms.
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'head', 'pos', 'state', 'ring', 'principal', 'closed')
if not h[1] then return {'none'} end
if h[5] ~= ARGV[2] then return {'foreign'} end
if h[6] == '1' then return {'closed', h[1]} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'head', h[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok', h[1], h[2], h[3], h[4]}
"""


class RedisStore:
    def __init__(self, url: str, *, namespace: str, replica: str, ttl: float,
                 timeout: float = 0.25, retry_after: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.namespace = namespace
        self.replica = replica
        self.ttl_ms = max(1, int(ttl * 1000))
        self.retry_after = retry_after
        self.clock = clock
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=0)
        self._commit = self._redis.register_script(_COMMIT)
        self._claim = self._redis.register_script(_CLAIM)
        self._owner = self._redis.register_script("return redis.call('HGET', KEYS[1], 'owner')")
        self._down_until = 0.0
        self.failures = 0  # calls that failed (for metrics)

    def key(self, session_id: str) -> str:
        return f"{self.namespace}:{session_id}"

    @property
    def available(self) -> bool:
        """False while backing off after a failure (calls are skipped, not tried)."""
        return self.clock() >= self._down_until

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def claim(self, session_id: str, principal: str) -> tuple[str, Checkpoint | int | None]:
        """Take the session over: ("ok", Checkpoint), ("none", None), ("foreign", None) for
        another principal's session, or ("closed", final position). StoreUnavailable when
        Redis cannot answer."""
        reply = await self._call(self._claim, [self.key(session_id)],
                                 [self.replica, principal, self.ttl_ms])
        if reply is None:
            raise StoreUnavailable(f"session {session_id!r} is not held by this replica and the "
                                   f"session store ({self.url}) cannot be reached to resume it; "
                                   "retry shortly")
        kind = reply[0].decode()
        if kind == "ok":
            return kind, Checkpoint(position=int(reply[2]), head=int(reply[1]),
                                    states=bytes(reply[3]), ring=bytes(reply[4]),
                                    principal=principal)
        if kind == "closed":
            return kind, int(reply[1])
        return kind, None

    async def owner(self, session_id: str) -> str | None:
        """The replica that owns the session in the store ("" if none; None if unreachable)."""
        reply = await self._call(self._owner, [self.key(session_id)], [])
        return None if reply is None else (reply or b"").decode()

    async def commit(self, commits: Sequence[Commit]) -> list[int] | None:
        """One compare-and-set per session, in one script call. Per commit: 1 written, 0 another
        replica owns the session now, 2 the store lost it and needs a full checkpoint (nothing
        written). None: Redis was not reached (or is being backed off from); nothing written."""
        if not commits:
            return []
        keys: list[str] = []
        args: list[Any] = [self.ttl_ms, self.replica]
        for c in commits:
            keys.append(self.key(c.session_id))
            args += [c.expected, c.head, c.principal, "1" if c.closed else "",
                     c.states if c.states is not None else b"", c.ring]
        reply = await self._call(self._commit, keys, args)
        return None if reply is None else [int(r) for r in reply]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if not self.available:
            return None
        try:
            reply = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.failures += 1
            if self._down_until == 0.0 or self.clock() >= self._down_until:
                log.warning("session store %s unreachable (%s); serving from memory, retrying "
                            "in %.1fs", self.url, exc, self.retry_after)
            self._down_until = self.clock() + self.retry_after
            return None
        if self._down_until:
            log.info("session store %s reachable again", self.url)
            self._down_until = 0.0
        return reply

    async def close(self) -> None:
        await self._redis.aclose()
