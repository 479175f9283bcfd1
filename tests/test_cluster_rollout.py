"""A rolling upgrade for real: two seqserve replicas sharing a redis-server behind nginx running
deploy/nginx/seqserve.conf (tests/cluster.py), each serving a model repository that holds
basicmotions version 1. Forty sessions stream through the client library, on two streams that
nginx sends to different replicas. One replica at a time is upgraded: SIGTERM (it drains, saving
its sessions to Redis), then restarted on a repository holding versions 1 and 2 (latest:1, so it
loads only 2).

Sessions in flight resume, wherever nginx sends them, on version 1: the replica that takes one
over loads version 1 from its repository for it. Their answers are those of an uninterrupted
version 1 run (bit for bit where this CPU's onnxruntime step is batch-invariant; within 1e-5
elsewhere). Sessions opened once both replicas run the new repository start on version 2. Not a
frame is lost or applied twice (every session's head in Redis is its frame count) and no error
reaches the caller of the client library."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from repository_fixtures import (
    BASICMOTIONS,
    Repository,
    batch_invariant,
    make_v2,
    step_run,
    store_key,
)

from seqserve.client import AsyncClient, Backoff
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(300)

BM = "basicmotions"
RETRY = Backoff(initial=0.05, maximum=0.5, max_elapsed=60.0)
SESSIONS, FRAMES, NEW, NEW_FRAMES = 40, 100, 8, 30
# Each replica is upgraded once every session has sent TERM_n frames; sessions wait at HOLD_n
# until it is back (so all of them still stream when the other one goes).
TERM_1, HOLD_1, TERM_2, HOLD_2 = 10, 40, 45, 75
PACE = 0.01  # seconds between a session's frames


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    return make_v2(tmp_path_factory.mktemp("v2") / "basicmotions-v2")


def _same(out: np.ndarray, directory: Path, x: np.ndarray) -> None:
    expected = step_run(directory, x[: len(out)])
    if batch_invariant(directory):
        assert np.array_equal(out, expected), np.abs(out - expected).max()
    else:
        assert np.abs(out - expected).max() <= 1e-5


def _owner(c: Any, session_id: str) -> str:
    head = c.redis.command("HGET", store_key(session_id, BASICMOTIONS, 1), "h")
    assert isinstance(head, bytes), head
    return head.decode().rpartition("|")[0]


async def _routes(client: AsyncClient, c: Any, x: np.ndarray) -> list[str]:
    """A stream route key for each replica: probe keys until nginx has sent one to each."""
    found: dict[str, str] = {}
    for k in range(32):
        route = f"route-{k}"
        session = await client.open_session(f"probe-{k}", stream=client.stream(route=route))
        await session.send(x[0])
        found.setdefault(_owner(c, session.id), route)
        await session.close()
        if len(found) == 2:
            return [found["replica-1"], found["replica-2"]]
    raise AssertionError(f"32 route keys all went to {sorted(found)}")


async def test_a_rolling_upgrade_keeps_sessions_on_v1_and_starts_new_ones_on_v2(
    cluster, tmp_path, v2_dir, samples
):
    old_repo = Repository(tmp_path / "repo-v1")
    old_repo.add(BM, 1, BASICMOTIONS)
    new_repo = Repository(tmp_path / "repo-v1-v2")
    new_repo.add(BM, 1, BASICMOTIONS)
    new_repo.add(BM, 2, v2_dir)
    # Sessions live in Redis, as in the compose and k8s deployments: no snapshot file.
    c = cluster(
        replicas=2,
        redis=True,
        repository=old_repo.root,
        args=("--store", "{redis}", "--replica-id", "{name}", "--snapshot-path", ""),
    )
    xs = samples["x"].astype(np.float32)
    x = [xs[i % len(xs)] for i in range(SESSIONS + NEW)]
    term = [asyncio.Event(), asyncio.Event()]
    upgraded = [asyncio.Event(), asyncio.Event()]
    reached = [0, 0]
    before: set[str] = set()

    async def upgrade(n: int) -> None:
        await term[n].wait()
        if n == 0:  # where the sessions are before anything is upgraded
            before.update(_owner(c, f"roll-{i}") for i in range(SESSIONS))
        replica = c.replica(f"replica-{n + 1}")
        assert await asyncio.to_thread(replica.terminate, 60) == 0
        await asyncio.to_thread(replica.restart, model_repository=str(new_repo.root))
        upgraded[n].set()

    async with AsyncClient(c.front.target, timeout=60, retry=RETRY) as client:
        routes = await _routes(client, c, x[0])
        streams = [client.stream(route=route) for route in routes]
        sessions = [
            await client.open_session(f"roll-{i}", stream=streams[i % 2]) for i in range(SESSIONS)
        ]

        async def feed(i: int) -> np.ndarray:
            out = []
            for t in range(FRAMES):
                for n, (at, hold) in enumerate(((TERM_1, HOLD_1), (TERM_2, HOLD_2))):
                    if t == at:
                        reached[n] += 1
                        if reached[n] == SESSIONS:
                            term[n].set()
                    if t == hold:
                        await upgraded[n].wait()
                out.append((await sessions[i].send(x[i][t])).probabilities[0])
                await asyncio.sleep(PACE)
            return np.stack(out)

        upgrades = [asyncio.create_task(upgrade(n)) for n in (0, 1)]
        outputs = await asyncio.wait_for(asyncio.gather(*(feed(i) for i in range(SESSIONS))), 240)
        await asyncio.gather(*upgrades)
        reconnects = [stream.reconnects for stream in streams]

        # Both replicas upgraded: new sessions start on version 2.
        new = [await client.open_session(f"new-{i}") for i in range(NEW)]

        async def feed_new(i: int) -> np.ndarray:
            return np.stack(
                [
                    (await new[i].send(x[SESSIONS + i][t])).probabilities[0]
                    for t in range(NEW_FRAMES)
                ]
            )

        new_outputs = await asyncio.gather(*(feed_new(i) for i in range(NEW)))
        positions = [(await client.get_session(s.id)).position for s in sessions + new]

    assert before == {"replica-1", "replica-2"}  # sessions lived on both before the upgrade
    assert all(r >= 1 for r in reconnects), reconnects  # each stream was drained under it
    assert positions == [FRAMES] * SESSIONS + [NEW_FRAMES] * NEW
    for i, out in enumerate(outputs):
        _same(out, BASICMOTIONS, x[i])
    for i, out in enumerate(new_outputs):
        _same(out, v2_dir, x[SESSIONS + i])
    # The checks can tell the versions apart.
    assert np.abs(step_run(v2_dir, x[0][:FRAMES]) - outputs[0]).max() > 1e-3

    # 0 lost, 0 doubled: each session's state lives under its version's namespace in Redis,
    # with its head at its frame count; nothing of the old sessions under version 2's.
    for i in range(SESSIONS):
        head = c.redis.command("HGET", store_key(f"roll-{i}", BASICMOTIONS, 1), "h")
        assert isinstance(head, bytes) and head.decode().endswith(f"|{FRAMES}"), (i, head)
        assert c.redis.command("EXISTS", store_key(f"roll-{i}", v2_dir, 2)) == 0
    for i in range(NEW):
        head = c.redis.command("HGET", store_key(f"new-{i}", v2_dir, 2), "h")
        assert isinstance(head, bytes) and head.decode().endswith(f"|{NEW_FRAMES}"), (i, head)

    # What the replicas say: version 2 the latest on both, version 1 loaded (draining) for the
    # sessions pinned to it, every session on its version.
    pinned = {1: 0, 2: 0}
    for replica in c.replicas:
        async with grpc.aio.insecure_channel(replica.target) as channel:
            stub = pb_grpc.SeqServeStub(channel)
            listing = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            states = {v.version: (v.state, v.latest) for v in listing.versions}
            assert states[2] == ("ready", True), (replica.name, states)
            assert states.get(1, ("draining", False))[0] in ("draining", "unavailable")
            for v in listing.versions:
                pinned[v.version] += v.sessions
            info = await stub.GetSession(pb.SessionRef(session_id="roll-0"), timeout=30)
            assert info.model_version == 1
            info = await stub.GetSession(pb.SessionRef(session_id="new-0"), timeout=30)
            assert info.model_version == 2
    assert pinned == {1: SESSIONS, 2: NEW}
    for replica in c.replicas:
        assert replica.metric("seqserve_model_load_failures_total") == 0
    print(
        f"rolling upgrade: {SESSIONS} sessions x {FRAMES} frames on v1 through two upgrades "
        f"(stream reconnects {reconnects}), {NEW} new sessions on v2; 0 lost, 0 doubled"
    )
