"""The shared session store in Redis: one hash per session, every change made by a Lua script so
that ownership and heads change atomically (see store.py for what a session holds).

After each scheduler round a replica records what the round did with one script call: per session
a compare-and-set of its ``head`` against the head this replica last wrote, and every
``checkpoint_every`` frames (and on close and drain) the state itself and the ring of recent
outputs. A replica that gets a request for a session it does not hold claims it: it takes the
checkpoint, becomes the owner and sets the head back to the checkpoint's position. Keys expire
after the server's idle timeout, refreshed by every write. When Redis is down or slow, calls stop
being tried for ``retry_after`` seconds at a time and serving goes on from memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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

__all__ = ["RedisStore"]

log = logging.getLogger("seqserve.store")

# A session's hash: h = "owner|head", c = closed ("1") or not ("0"), and from its last full
# checkpoint pos (its position), d (state rows then output ring) and p (its principal).
# A write is accepted only from the session's owner: the replica that created it or claimed it
# last (a claim is the only way ownership changes, atomically in its script). The owner's copy
# is therefore the one true state, and a write whose reply was lost (a timeout) can be repeated.
# ARGV: ttl_ms, owner, record_bytes, key prefix, lines, data. Returns one character per line:
# 1 written, 0 another replica owns it (or it was closed), 2 missing and this was no full
# checkpoint (nothing written).
_COMMIT = r"""
local ttl, owner, size, prefix, data = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[6]
local where, tag = ARGV[7], ARGV[8]
local out, at = {}, 1
for id, expected, head, closed, full, principal in string.gmatch(
    ARGV[5], '([^\t\n]+)\t(%-?%d+)\t(%d+)\t(%d)\t(%d)\t([^\n]*)\n') do
  local key = prefix .. id
  local cur = redis.call('HMGET', key, 'h', 'c')
  local ok
  if not cur[1] then
    -- new, or gone from the store (flushed, restarted empty): only a full checkpoint
    ok = full == '1'
  elseif cur[2] == '1' then
    ok = expected == '-1' and full == '1'  -- a closed id used again by a new session
  else
    ok = string.sub(cur[1], 1, #owner + 1) == owner .. '|'
  end
  if ok then
    redis.call('HSET', key, 'h', owner .. '|' .. head, 'c', closed)
    if full == '1' then
      redis.call('HSET', key, 'pos', head, 'p', principal, 'd', string.sub(data, at, at + size - 1))
    end
    redis.call('PEXPIRE', key, ttl)
    if where ~= '' then redis.call('SET', where .. id, tag, 'PX', ttl) end
    out[#out + 1] = '1'
  elseif not cur[1] then
    out[#out + 1] = '2'
  else
    out[#out + 1] = '0'
  end
  if full == '1' then at = at + size end
end
return table.concat(out)
"""

# KEYS[1]: the session, KEYS[2]: where its model's sessions live (version and graphs).
# ARGV: owner, principal, ttl_ms, this version's tag.
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'h', 'pos', 'd', 'p', 'c')
if not h[1] or not h[2] then
  local where = redis.call('GET', KEYS[2])
  if where and where ~= ARGV[4] then return {'elsewhere', where} end
  return {'none'}
end
if h[4] ~= ARGV[2] then return {'foreign'} end
local head = string.match(h[1], '|(%d+)$')
if h[5] == '1' then return {'closed', head} end
redis.call('HSET', KEYS[1], 'h', ARGV[1] .. '|' .. h[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok', head, h[2], h[3]}
"""

# KEYS[1]: the session, KEYS[2]: where it lives. Returns {h, c, p, pttl, pos, where}.
_PEEK = """
local h = redis.call('HMGET', KEYS[1], 'h', 'c', 'p', 'pos')
return {h[1], h[2], h[3], redis.call('PTTL', KEYS[1]), h[4], redis.call('GET', KEYS[2])}
"""

_OWNER = """
local h = redis.call('HGET', KEYS[1], 'h')
if not h then return '' end
return string.match(h, '^(.*)|')
"""


_OUTCOMES = {outcome.value: outcome for outcome in CommitOutcome}


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        replica: str,
        where: str = "",
        tag: str = "",
        ttl: float,
        timeout: float = 0.25,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.namespace = namespace
        # Keys naming the version (and graphs) each session of the model lives on, so a replica
        # asked for a session it holds on no version here learns which one to load.
        self.where, self.tag = where, tag
        self.replica = replica
        self.ttl_ms = max(1, int(ttl * 1000))
        self.retry_after = retry_after
        self.clock = clock
        # A bounded pool that makes callers wait for a connection (within the timeout): a burst
        # of claims (a replica taking over many sessions at once) must not open one each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._pool = pool
        self._redis = aioredis.Redis(connection_pool=pool)
        self._commit = self._redis.register_script(_COMMIT)
        self._claim = self._redis.register_script(_CLAIM)
        self._owner = self._redis.register_script(_OWNER)
        self._peek = self._redis.register_script(_PEEK)
        self._down_until = 0.0
        self.observe: Callable[[CallKind, float, CallOutcome], None] = lambda kind, sec, out: None

    def key(self, session_id: str) -> str:
        return f"{self.namespace}:{session_id}"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:"

    @property
    def available(self) -> bool:
        """False while backing off after a failure (calls are skipped, not tried)."""
        return self.clock() >= self._down_until

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def claim(self, items: Sequence[tuple[str, str]]) -> list[Claim]:
        """Take sessions over, one pipelined round trip for all of ``items`` (id, principal).
        StoreUnavailable when Redis cannot answer."""

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id, principal in items:
                    await self._claim(
                        keys=[self.key(session_id), self.where + session_id],
                        args=[self.replica, principal, self.ttl_ms, self.tag],
                        client=pipe,
                    )
                return await pipe.execute()

        replies = await self._guard(run, "claim")
        if replies is None:
            raise StoreUnavailable(
                f"the session store ({self.url}) cannot be reached to resume "
                "a session not held by this replica; retry shortly"
            )
        out: list[Claim] = []
        for reply in replies:
            kind = reply[0].decode()
            if kind == "ok":
                checkpoint = Checkpoint(
                    position=int(reply[2]), head=int(reply[1]), data=bytes(reply[3])
                )
                out.append(Claim("ok", checkpoint))
            elif kind == "closed":
                out.append(Claim("closed", final_position=int(reply[1])))
            elif kind == "foreign":
                out.append(Claim("foreign"))
            elif kind == "elsewhere":
                out.append(Claim("elsewhere", where=reply[1].decode()))
            else:
                out.append(Claim("none"))
        return out

    async def peek(self, session_id: str, principal: str) -> Peek | None:
        """A session in the store, without taking it over; None if it is not there (or is
        another principal's). StoreUnavailable when Redis cannot answer."""
        reply = await self._guard(
            lambda: self._peek(keys=[self.key(session_id), self.where + session_id]), "peek"
        )
        if reply is None:
            raise StoreUnavailable(
                f"the session store ({self.url}) cannot be reached to look "
                f"up session {session_id!r}, which this replica does not "
                "hold; retry shortly"
            )
        h, closed, owner, ttl, position, where = reply
        if h is None:
            if where is not None and where.decode() != self.tag:
                return Peek(0, 0, False, 0.0, where=where.decode())
            return None
        if (owner or b"").decode() != principal:
            return None
        head = int(h.decode().rpartition("|")[2])
        return Peek(
            head=head,
            position=int(position) if position is not None else head,
            closed=closed == b"1",
            expires_in=max(0.0, int(ttl) / 1000),
        )

    async def owner(self, session_id: str) -> str | None:
        """The replica that owns the session in the store ("" if none; None if unreachable)."""
        reply = await self._guard(lambda: self._owner(keys=[self.key(session_id)]), "owner")
        return None if reply is None else (reply or b"").decode()

    async def commit(self, commits: Commits) -> list[CommitOutcome] | None:
        """One compare-and-set per session, in one script call (it answers one character per
        session, a CommitOutcome's value). None: Redis was not reached (or is being backed off
        from); nothing was written."""
        if not commits.count:
            return []
        reply = await self._guard(
            lambda: self._commit(
                args=[
                    self.ttl_ms,
                    self.replica,
                    commits.record_bytes,
                    self.prefix,
                    commits.lines,
                    commits.data,
                    self.where,
                    self.tag,
                ]
            ),
            "commit",
        )
        return None if reply is None else [_OUTCOMES[c] for c in reply.decode()]

    async def _guard(self, call: Callable[[], Awaitable[Any]], kind: CallKind) -> Any:
        """``await call()``, or None if Redis failed (then skip it for ``retry_after``)."""
        if not self.available:
            self.observe(kind, 0.0, "skipped")
            return None
        started = time.perf_counter()
        try:
            reply = await call()
        except (RedisError, OSError) as exc:
            self.observe(kind, time.perf_counter() - started, "failed")
            if self._down_until == 0.0 or self.clock() >= self._down_until:
                log.warning(
                    "session store %s unreachable (%s); serving from memory, retrying in %.1fs",
                    self.url,
                    exc,
                    self.retry_after,
                )
            self._down_until = self.clock() + self.retry_after
            return None
        self.observe(kind, time.perf_counter() - started, "ok")
        if self._down_until:
            log.info("session store %s reachable again", self.url)
            self._down_until = 0.0
        return reply

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()  # a pool passed in is not closed with the client
