"""MemoryStore answers every call exactly as RedisStore does against a real redis-server: the
same calls, from two replicas each serving two versions of a model, go to both, and every answer
must match. This is what keeps the fast handover tests (tests/test_handover.py), which run on
MemoryStore, honest."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cluster import Redis

pytest.importorskip("redis")

from seqserve.server.memory_store import MemoryStore, Shelf
from seqserve.server.redis_store import RedisStore
from seqserve.server.store import Claim, Commits, Peek, Store, StoreUnavailable

TTL = 60.0
RECORD = 8  # bytes of a full checkpoint's data here (the stores do not look inside)
Line = tuple[str, int, int, bool, bool, str]  # id, expected head, head, closed, full, principal


def commits(lines: Sequence[Line], rng: random.Random) -> Commits:
    text = "".join(
        f"{sid}\t{expected}\t{head}\t{int(closed)}\t{int(full)}\t{principal}\n"
        for sid, expected, head, closed, full, principal in lines
    )
    data = b"".join(rng.randbytes(RECORD) for line in lines if line[4])
    return Commits(text, data, RECORD, len(lines))


def same_peek(one: Peek | str | None, other: Peek | str | None) -> bool:
    """Equal but for the seconds left, which each store counts on its own clock."""
    if not isinstance(one, Peek) or not isinstance(other, Peek):
        return one == other
    fields = ("head", "position", "closed", "where")
    return all(getattr(one, f) == getattr(other, f) for f in fields)


@dataclass
class Twins:
    """The same replicas twice: on a MemoryStore shelf and on Redis. ``a`` and ``b`` serve
    version 1 of the model, ``a2`` and ``b2`` (the same replicas) its version 2."""

    memory: dict[str, MemoryStore]
    redis: dict[str, RedisStore]

    async def call(self, replica: str, method: str, *args: Any) -> tuple[Any, Any]:
        out = []
        for stores in (self.memory, self.redis):
            store: Store = stores[replica]
            try:
                out.append(await getattr(store, method)(*args))
            except StoreUnavailable:
                out.append("unavailable")
        return out[0], out[1]

    async def agree(self, replica: str, method: str, *args: Any) -> Any:
        memory, redis = await self.call(replica, method, *args)
        if method == "peek":
            assert same_peek(memory, redis), (replica, method, args, memory, redis)
        else:
            assert memory == redis, (replica, method, args, memory, redis)
        return memory


@pytest.fixture
async def twins(redis_server: Redis) -> AsyncIterator[Twins]:
    shelf = Shelf()
    names = {"a": ("a", "1"), "b": ("b", "1"), "a2": ("a", "2"), "b2": ("b", "2")}
    made = Twins(
        {
            name: MemoryStore(
                shelf, replica=replica, ttl=TTL, namespace=f"{v}:", where="where:", tag=v
            )
            for name, (replica, v) in names.items()
        },
        {
            name: RedisStore(
                redis_server.url,
                namespace=f"agree:{v}",
                where="agree:where:",
                tag=v,
                replica=replica,
                ttl=TTL,
                timeout=2.0,
            )
            for name, (replica, v) in names.items()
        },
    )
    yield made
    for store in made.redis.values():
        await store.close()


async def test_every_outcome_of_every_call_agrees(twins):
    """A script that reaches each branch of the scripts: new, advanced, taken, missing,
    claimed (ok / none / foreign / closed), closed and started again."""
    rng = random.Random(1)
    W, T, M = "WRITTEN", "TAKEN", "MISSING"

    async def commit(replica: str, *lines: Line) -> list[str]:
        outcomes = await twins.agree(replica, "commit", commits(lines, rng))
        return [o.name for o in outcomes]

    assert await commit("a") == []
    assert await twins.agree("a", "owner", "s") == ""
    assert await twins.agree("a", "peek", "s", "") is None
    assert await commit("a", ("s", -1, 3, False, False, "")) == [M]  # new needs a full one
    assert await commit("a", ("s", -1, 3, False, True, "p"), ("t", -1, 1, False, True, "p")) == [
        W,
        W,
    ]
    assert await commit("a", ("s", 3, 5, False, False, "p")) == [W]  # the head only
    peek = await twins.agree("b", "peek", "s", "p")
    assert (peek.head, peek.position, peek.closed) == (5, 3, False)
    assert await twins.agree("b", "peek", "s", "q") is None  # another principal's
    assert await twins.agree("b", "claim", [("s", "q")]) == [Claim("foreign")]
    assert await twins.agree("b", "claim", [("u", "p")]) == [Claim("none")]
    [claim] = await twins.agree("b", "claim", [("s", "p")])
    assert claim.kind == "ok" and claim.checkpoint is not None
    assert (claim.checkpoint.position, claim.checkpoint.head) == (3, 5)
    assert await twins.agree("a", "owner", "s") == "b"
    assert (await twins.agree("a", "peek", "s", "p")).head == 3  # back to the checkpoint
    assert await commit("a", ("s", 5, 6, False, True, "p")) == [T]  # a's copy is stale
    assert await commit("b", ("s", 3, 4, False, False, "p"), ("t", 1, 2, False, False, "p")) == [
        W,
        T,
    ]
    assert await commit("b", ("s", 4, 6, True, True, "p")) == [W]  # closed at 6
    assert await twins.agree("a", "claim", [("s", "p")]) == [Claim("closed", final_position=6)]
    peek = await twins.agree("a", "peek", "s", "p")
    assert (peek.head, peek.position, peek.closed) == (6, 6, True)
    assert await commit("b", ("s", 6, 7, False, False, "p")) == [T]  # closed stays closed
    assert await commit("a", ("s", -1, 0, False, False, "p")) == [T]  # only a full start
    assert await commit("a", ("s", -1, 1, False, True, "r")) == [W]  # a new session, same id
    assert await twins.agree("b", "owner", "s") == "a"
    assert await twins.agree("b", "peek", "s", "p") is None
    # Two claims of one session in one call: the second finds it claimed already.
    claims = await twins.agree("b", "claim", [("t", "p"), ("t", "p"), ("s", "r")])
    assert [c.kind for c in claims] == ["ok", "ok", "ok"]
    assert await twins.agree("a", "owner", "t") == "b"
    # Version 2 does not hold t: the store says which version does, and nothing more.
    assert await twins.agree("a2", "claim", [("t", "p"), ("zz", "p")]) == [
        Claim("elsewhere", where="1"),
        Claim("none"),
    ]
    assert (await twins.agree("b2", "peek", "t", "p")).where == "1"
    assert await twins.agree("a2", "owner", "t") == ""
    assert await commit("a2", ("t", -1, 1, False, True, "p")) == [W]  # now it lives on 2
    [claim] = await twins.agree("b", "claim", [("t", "p")])
    assert claim.kind == "ok"  # version 1 still has its own copy of t: that one is claimed
    assert await commit("a2", ("n2", -1, 1, False, True, "p")) == [W]
    assert await twins.agree("b", "claim", [("n2", "p")]) == [Claim("elsewhere", where="2")]


async def test_random_call_sequences_agree(twins):
    """Hundreds of calls at random over a few ids and principals, both replicas, both versions."""
    rng = random.Random(20240607)
    ids, principals = [f"s{i}" for i in range(8)], ["", "p", "q"]
    heads: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for _ in range(500):
        replica = rng.choice(["a", "b", "a2", "b2"])
        sid = rng.choice(ids)
        op = rng.random()
        if op < 0.5:
            lines = []
            for _ in range(rng.randint(1, 3)):
                sid = rng.choice(ids)
                head = heads.get(sid, 0)
                expected = rng.choice([-1, head, head - 1])
                new = max(0, head + rng.randint(-1, 3))
                closed = rng.random() < 0.1
                full = rng.random() < 0.5
                lines.append((sid, expected, new, closed, full, rng.choice(principals)))
                heads[sid] = new
            outcomes = await twins.agree(replica, "commit", commits(lines, rng))
            for outcome in outcomes:
                kinds[outcome.name] = kinds.get(outcome.name, 0) + 1
        elif op < 0.75:
            items = [(rng.choice(ids), rng.choice(principals)) for _ in range(rng.randint(1, 3))]
            for claim in await twins.agree(replica, "claim", items):
                kinds[claim.kind] = kinds.get(claim.kind, 0) + 1
        elif op < 0.9:
            await twins.agree(replica, "peek", sid, rng.choice(principals))
        else:
            await twins.agree(replica, "owner", sid)
    # The sequence reached every outcome (else it proved less than it seems).
    for kind in ("WRITTEN", "TAKEN", "MISSING", "ok", "none", "foreign", "closed", "elsewhere"):
        assert kinds.get(kind, 0) >= 3, kinds


async def test_both_stores_fail_alike_when_unreachable(twins, redis_server):
    await twins.agree("a", "commit", commits([("s", -1, 1, False, True, "")], random.Random(0)))
    redis_server.kill()
    for store in twins.memory.values():
        store.shelf.down = True
    second = commits([("s", 1, 2, False, False, "")], random.Random(0))
    assert await twins.agree("a", "commit", second) is None
    assert await twins.agree("b", "claim", [("s", "")]) == "unavailable"
    assert await twins.agree("b", "peek", "s", "") == "unavailable"
    assert await twins.agree("b", "owner", "s") is None
    assert await twins.agree("a", "ping") is False
