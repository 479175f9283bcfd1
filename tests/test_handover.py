"""The handover and write-back logic, fast: real engines (the bundled model, no gRPC) sharing an
in-process store (``MemoryStore`` on one ``Shelf``) the way replicas share Redis. Claims and their
ordering, the ok / none / foreign / closed outcomes, a store outage, a probe that finds another
owner, answers that wait for the write that covers them, and checkpoints every K frames.

tests/test_store_redis.py runs the same protocol through gRPC against a real redis-server, and
tests/test_store_agreement.py checks that MemoryStore answers every call as RedisStore does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from seqserve.server.engine import Engine
from seqserve.server.errors import (
    PositionError,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StoreUnavailable,
)
from seqserve.server.memory_store import MemoryStore, Shelf
from seqserve.server.model import ModelSpec, load_model_spec
from seqserve.server.observer import BatchObserver
from seqserve.server.runtime import Runtime
from seqserve.server.settings import Settings
from seqserve.server.store import CommitOutcome, Commits

TOL = 1e-5
SETTLE = 5.0  # seconds a condition may take to come true on a loaded machine


class Events(BatchObserver):
    def __init__(self) -> None:
        self.events: list[str] = []

    def session_event(self, event: str) -> None:
        self.events.append(event)


class GatedStore(MemoryStore):
    """A MemoryStore whose claims and commits wait while their gate is shut (the store being
    slow), so a test can look at what happens meanwhile."""

    def __init__(self, shelf: Shelf, *, replica: str, ttl: float) -> None:
        super().__init__(shelf, replica=replica, ttl=ttl)
        self.gates = {"claim": asyncio.Event(), "commit": asyncio.Event()}
        for gate in self.gates.values():
            gate.set()
        self.waiting = {"claim": 0, "commit": 0}

    async def _wait(self, kind: str) -> None:
        self.waiting[kind] += 1
        try:
            await self.gates[kind].wait()
        finally:
            self.waiting[kind] -= 1

    async def claim(self, items: Any) -> Any:
        await self._wait("claim")
        return await super().claim(items)

    async def commit(self, commits: Commits) -> list[CommitOutcome] | None:
        await self._wait("commit")
        return await super().commit(commits)


class Replicas:
    def __init__(self, spec: ModelSpec, runtime: Runtime, model_dir: Path) -> None:
        self.spec, self.runtime, self.model_dir = spec, runtime, model_dir
        self.shelf = Shelf()
        self.engines: list[Engine] = []

    def __call__(self, name: str, **overrides: Any) -> Engine:
        settings = Settings(
            model_dir=str(self.model_dir),
            snapshot_path="",
            max_sessions=64,
            session_idle_timeout=60.0,
        ).replace(**overrides)
        store = GatedStore(self.shelf, replica=name, ttl=60.0)
        engine = Engine(self.spec, self.runtime, settings, Events(), store=store)
        engine.start()
        self.engines.append(engine)
        return engine


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> ModelSpec:
    return load_model_spec(model_dir)


@pytest.fixture(scope="module")
def runtime(spec: ModelSpec) -> Runtime:
    return Runtime(spec)  # one onnxruntime session for every engine: they only run it


@pytest.fixture(scope="module")
def x(samples: dict[str, np.ndarray]) -> np.ndarray:
    """Four recordings, 24 frames each: [4, 24, F]."""
    return np.stack([samples["x"][i][:24] for i in range(4)]).astype(np.float32)


@pytest.fixture(scope="module")
def expected(runtime: Runtime, x: np.ndarray) -> np.ndarray:
    """Each recording's per-step outputs in one uninterrupted run: [4, 24, C]."""
    out, _ = runtime.sequence(x, runtime.zero_states(len(x)))
    return out


@pytest.fixture
async def replicas(spec: ModelSpec, runtime: Runtime, model_dir: Path) -> AsyncIterator[Replicas]:
    made = Replicas(spec, runtime, model_dir)
    yield made
    for engine in made.engines:
        await engine.stop()


def store_of(engine: Engine) -> GatedStore:
    assert isinstance(engine.store, GatedStore)
    return engine.store


def events(engine: Engine) -> list[str]:
    assert isinstance(engine.observer, Events)
    return engine.observer.events


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded: a hang fails, it does not stall)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while not condition():
        assert loop.time() < deadline, "condition never came true"
        await asyncio.sleep(0.001)


async def steps(engine: Engine, sid: str, frames: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Frames ``start``..``stop``-1 one request each; their outputs."""
    out = []
    for t in range(start, stop):
        r = await engine.step(sid, t, frames[t : t + 1], start=t == 0)
        assert r.next_position == t + 1 and not r.replayed
        out.append(r.probabilities)
    return np.concatenate(out)


async def refused(call: Awaitable[Any]) -> Exception:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("the call succeeded")


# -- moving between replicas --------------------------------------------------------------------


async def test_a_session_moves_to_another_replica_and_back_with_exact_outputs(
    replicas, x, expected
):
    a, b = replicas("a"), replicas("b")
    out = [await steps(a, "hop", x[0], 0, 8)]
    out.append(await steps(b, "hop", x[0], 8, 16))  # b claims it from the store
    assert events(b) == ["claimed"]
    # a still holds a copy at 8: a request at 16 is ahead of it, so a asks the store who owns
    # the session, finds b, drops its copy and claims the session back.
    out.append(await steps(a, "hop", x[0], 16, 24))
    assert events(a) == ["opened", "moved", "claimed"]
    assert "owner" in store_of(a).calls
    assert np.abs(np.concatenate(out) - expected[0]).max() <= TOL
    entry = replicas.shelf.entries["hop"]
    assert (entry.owner, entry.head, entry.position) == ("a", 24, 24)


async def test_a_request_ahead_of_a_copy_nobody_took_is_a_plain_gap(replicas, x):
    """The probe finds this replica still the owner: the copy is kept, the gap is reported."""
    a = replicas("a")
    await steps(a, "gap", x[0], 0, 3)
    err = await refused(a.step("gap", 5, x[0][5:6]))
    assert isinstance(err, PositionError) and err.reason == "position_gap"
    assert err.expected == 3
    assert store_of(a).calls.count("owner") == 1
    assert events(a) == ["opened"]  # neither moved nor claimed
    assert a.table.find("gap") is not None
    await steps(a, "gap", x[0], 3, 5)


# -- claims are answered in arrival order -------------------------------------------------------


async def test_requests_waiting_for_a_claim_are_admitted_in_arrival_order(replicas, x, expected):
    a, b = replicas("a"), replicas("b")
    await steps(a, "queue", x[0], 0, 4)
    claims = store_of(b).gates["claim"]
    claims.clear()
    # Appends (no position) go where the session is when each is admitted: any other order
    # than arrival order gives other outputs.
    first = b.submit("queue", None, x[0][4:5])
    second = b.submit("queue", None, x[0][5:7])
    await until(lambda: store_of(b).waiting["claim"] == 1)  # the claim is out
    third = b.submit("queue", 7, x[0][7:8])  # arrives while it is out
    fourth = b.submit("queue", None, x[0][8:10])
    assert not any(f.done() for f in (first, second, third, fourth))
    claims.set()
    results = [await f for f in (first, second, third, fourth)]
    assert [r.position for r in results] == [4, 5, 7, 8]
    assert [r.next_position for r in results] == [5, 7, 8, 10]
    got = np.concatenate([r.probabilities for r in results])
    assert np.abs(got - expected[0][4:10]).max() <= TOL
    assert store_of(b).calls.count("claim") == 1  # one claim for all four


async def test_step_batches_waiting_for_claims_keep_their_order(replicas, x, expected):
    """A batch that must claim an entry waits as a whole, and a later batch (even one whose
    sessions are all held) waits behind it: one batch's entries never overtake an earlier's."""
    a, b = replicas("a"), replicas("b")
    await steps(a, "far", x[0], 0, 2)  # held by a
    await steps(b, "near", x[1], 0, 2)  # held by b
    claims = store_of(b).gates["claim"]
    claims.clear()
    both = b.submit_batch(["far", "near"], [2, 2], np.stack([x[0][2], x[1][2]]))
    near = b.submit_batch(["near"], [3], x[1][3:4])  # held, but behind the batch above
    far = b.submit_batch(["far"], [3], x[0][3:4])
    await until(lambda: store_of(b).waiting["claim"] == 1)
    assert not any(f.done() for f in (both, near, far))
    claims.set()
    first, second, third = await both, await near, await far
    for result in (first, second, third):
        assert result.errors == {}
    assert first.next_positions.tolist() == [3, 3]
    assert np.abs(first.probabilities[0] - expected[0][2]).max() <= TOL
    assert np.abs(first.probabilities[1] - expected[1][2]).max() <= TOL
    assert np.abs(second.probabilities[0] - expected[1][3]).max() <= TOL
    assert np.abs(third.probabilities[0] - expected[0][3]).max() <= TOL


# -- what a claim finds -------------------------------------------------------------------------


async def test_a_session_the_store_does_not_know_is_new_or_unknown(replicas, x):
    a, b = replicas("a"), replicas("b")
    r = await b.step("fresh", 0, x[0][:2], start=True)  # claim: none, so a new session here
    assert r.next_position == 2
    assert replicas.shelf.entries["fresh"].owner == "b"
    for position in (0, 3):
        err = await refused(a.step("ghost", position, x[0][:1]))
        assert isinstance(err, SessionNotFound) and err.reason == "unknown"
    assert "ghost" not in replicas.shelf.entries


async def test_another_principals_session_is_answered_like_an_unknown_one(replicas, x, expected):
    a, b = replicas("a"), replicas("b")
    await a.step("mine", 0, x[0][:2], start=True, principal="alice")
    err = await refused(b.step("mine", 2, x[0][2:3], principal="bob"))
    assert isinstance(err, SessionNotFound) and err.reason == "unknown"
    err = await refused(b.step("mine", 0, x[0][:1], start=True, principal="bob"))
    assert isinstance(err, SessionExists)
    err = await refused(b.lookup("mine", principal="bob"))
    assert isinstance(err, SessionNotFound) and err.reason == "unknown"
    entry = replicas.shelf.entries["mine"]
    assert (entry.owner, entry.head, entry.principal) == ("a", 2, "alice")  # untouched
    r = await b.step("mine", 2, x[0][2:3], principal="alice")  # its owner resumes it there
    assert np.abs(r.probabilities - expected[0][2:3]).max() <= TOL


async def test_a_closed_session_is_closed_on_every_replica(replicas, x, expected):
    a, b = replicas("a"), replicas("b")
    await steps(a, "done", x[0], 0, 3)
    await a.close("done")
    err = await refused(b.step("done", 3, x[0][3:4]))
    assert isinstance(err, SessionNotFound) and err.reason == "closed" and err.position == 3
    status = await refused(b.lookup("done"))
    assert isinstance(status, SessionNotFound) and status.reason == "closed"
    # The id may start over: a new session, owned by b, replacing the tombstone.
    r = await b.step("done", 0, x[1][:2], start=True)
    assert np.abs(r.probabilities - expected[1][:2]).max() <= TOL
    entry = replicas.shelf.entries["done"]
    assert (entry.owner, entry.head, entry.closed) == ("b", 2, False)


# -- the store down -----------------------------------------------------------------------------


async def test_while_the_store_is_down_held_and_new_sessions_go_on_and_nothing_else(
    replicas, x, expected
):
    a, b = replicas("a"), replicas("b")
    out = [await steps(a, "held", x[0], 0, 4)]
    replicas.shelf.down = True
    out.append(await steps(a, "held", x[0], 4, 8))  # from memory; answers do not wait
    err = await refused(b.step("held", 8, x[0][8:9]))
    assert isinstance(err, StoreUnavailable)
    err = await refused(b.step("late", 2, x[0][2:3], start=True))  # a start, but not at 0
    assert isinstance(err, StoreUnavailable)
    r = await b.step("new", 0, x[1][:2], start=True)  # a start at 0 goes ahead in memory
    assert np.abs(r.probabilities - expected[1][:2]).max() <= TOL
    batch = await b.submit_batch(["new-2", "held"], [0, 8], x[:2, 0], start=True)
    assert set(batch.errors) == {1} and isinstance(batch.errors[1], StoreUnavailable)
    assert np.abs(batch.probabilities[0] - expected[0][0]).max() <= TOL
    assert replicas.shelf.entries["held"].head == 4  # nothing reached the store
    replicas.shelf.down = False
    out.append(await steps(a, "held", x[0], 8, 9))  # the next write catches the store up
    assert replicas.shelf.entries["held"].position == 9
    out.append(await steps(b, "held", x[0], 9, 12))  # and b resumes there, nothing lost
    assert np.abs(np.concatenate(out) - expected[0][:12]).max() <= TOL
    assert "new" not in replicas.shelf.entries
    await b.step("new", 2, x[1][2:3])  # its first write since the store is back
    entry = replicas.shelf.entries["new"]
    assert (entry.owner, entry.head, entry.position) == ("b", 3, 3)


# -- answers wait for the write that covers them ------------------------------------------------


async def test_answers_wait_for_the_store_write(replicas, x, expected):
    a = replicas("a")
    store = store_of(a)
    commits = store.gates["commit"]
    commits.clear()
    one = a.submit("slow", 0, x[0][:2], start=True)
    await until(lambda: store.waiting["commit"] == 1)  # applied; its write is out
    await asyncio.sleep(0.01)
    assert not one.done()
    assert "slow" not in replicas.shelf.entries
    commits.set()
    r = await one
    assert np.abs(r.probabilities - expected[0][:2]).max() <= TOL
    assert replicas.shelf.entries["slow"].head == 2
    # A batch's entries (the fast lane: filled into the batch's arrays) wait the same way.
    commits.clear()
    frames = np.stack([x[0][2], x[1][0]])
    batch = a.submit_batch(["slow", "slow-2"], [2, 0], frames, start=True)
    await until(lambda: store.waiting["commit"] == 1)
    await asyncio.sleep(0.01)
    assert not batch.done()
    assert replicas.shelf.entries["slow"].head == 2 and "slow-2" not in replicas.shelf.entries
    commits.set()
    result = await batch
    assert result.errors == {}
    assert np.abs(result.probabilities[0] - expected[0][2]).max() <= TOL
    assert np.abs(result.probabilities[1] - expected[1][0]).max() <= TOL
    assert replicas.shelf.entries["slow"].head == 3
    assert replicas.shelf.entries["slow-2"].head == 1


async def test_a_write_refused_as_taken_turns_answers_into_session_moved(replicas, x, expected):
    a, b = replicas("a"), replicas("b")
    ids = ["taken", "kept", "single"]
    for t in range(4):
        await a.submit_batch(ids, [t] * 3, x[:3, t], start=t == 0)
    await b.step("taken", 4, x[0][4:5])  # b claims two of them; a does not know yet
    await b.step("single", 4, x[2][4:5])
    # a still holds them at 4: both entries run there (the fast lane, one group), and the
    # store refuses a's write for "taken": its entry fails, the other is answered.
    result = await a.submit_batch(["taken", "kept"], [4, 4], x[:2, 4])
    assert set(result.errors) == {0} and isinstance(result.errors[0], SessionMoved)
    assert np.abs(result.probabilities[1] - expected[1][4]).max() <= TOL
    err = await refused(a.step("single", 4, x[2][4:5]))  # one request on its own
    assert isinstance(err, SessionMoved) and err.reason == "session_moved"
    assert a.table.find("taken") is None and a.table.find("single") is None
    assert events(a).count("moved") == 2
    entry = replicas.shelf.entries["taken"]
    assert (entry.owner, entry.head) == ("b", 5)  # a's frame 4 was never recorded
    # The retry claims the session back from where b left it.
    r = await a.step("taken", 5, x[0][5:6])
    assert np.abs(r.probabilities - expected[0][5:6]).max() <= TOL


# -- checkpoints every K frames -----------------------------------------------------------------


async def test_checkpoint_every_k_frames_and_a_rollback_after_takeover(replicas, x, expected):
    a, b = replicas("a", checkpoint_every=4), replicas("b", checkpoint_every=4)
    saved = []
    for t in range(10):
        await a.step("lossy", t, x[0][t : t + 1], start=t == 0)
        entry = replicas.shelf.entries["lossy"]
        assert entry.head == t + 1  # the head is written every frame
        saved.append(entry.position)
    assert saved == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9]  # full checkpoints: new, then every 4
    # a dies here (it writes nothing more): frame 9 was applied but only the head says so.
    err = await refused(b.step("lossy", 10, x[0][10:11]))
    assert isinstance(err, PositionError) and err.reason == "rolled_back"
    assert err.expected == 9
    r = await b.step("lossy", 9, x[0][9:15])  # resent from the last durable position
    assert np.abs(r.probabilities - expected[0][9:15]).max() <= TOL
    entry = replicas.shelf.entries["lossy"]
    assert (entry.owner, entry.head, entry.position) == ("b", 15, 15)  # 6 frames since 9
