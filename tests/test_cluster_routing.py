"""Routing for real: two seqserve replicas (subprocesses) behind nginx running
deploy/nginx/seqserve.conf, or HAProxy running deploy/haproxy/seqserve.cfg, all on loopback
(tests/cluster.py).

Every session, whether stepped by unary calls (routed by session id) or multiplexed on a stream
(routed by the stream's key), lives on exactly one replica, sessions spread over both, and calls
without a route spread too. A replica killed with SIGKILL is skipped for new calls without the
client seeing an error, and a stream that was on it resumes on the survivor with the same key."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import step_request

from seqserve.client import ROUTE_HEADER, AsyncClient, Backoff, SessionLost, SessionNotFound
from seqserve.client.mux import Multiplexer
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

FAST = Backoff(initial=0.05, maximum=0.5, max_elapsed=15.0)
WAIT = 20.0
UNARY, STREAMS, PER_STREAM, STEPS = 20, 5, 4, 5  # 20 + 5 x 4 = 40 sessions of 5 frames each
FRONTS = pytest.mark.parametrize("front", ["nginx", "haproxy"])


def _recording(samples: dict[str, np.ndarray], i: int) -> np.ndarray:
    x = samples["x"][i % len(samples["x"])]
    return x[: samples["lengths"][i % len(samples["x"])]]


async def _where(replicas: list[Any], session_id: str) -> dict[str, int]:
    """``replica name -> position`` of every replica that has the session, asked directly."""
    found = {}
    for replica in replicas:
        async with AsyncClient(replica.target, timeout=WAIT) as direct:
            try:
                found[replica.name] = (await direct.get_session(session_id)).position
            except SessionNotFound as exc:
                assert exc.reason == "unknown", exc
    return found


@FRONTS
async def test_each_session_lives_on_one_replica_and_sessions_spread(cluster, samples, front):
    c = cluster(replicas=2, nginx=front == "nginx", haproxy=front == "haproxy")
    async with AsyncClient(c.front.target, timeout=WAIT, retry=FAST) as client:
        # Unary: one call per step, the sessions' calls interleaved, so they travel on many
        # upstream connections and only the hash keeps each session together.
        unary = [f"unary-{i}" for i in range(UNARY)]
        for step in range(STEPS):
            await asyncio.gather(
                *(
                    client.step(sid, _recording(samples, i)[step], position=step)
                    for i, sid in enumerate(unary)
                )
            )
        # Multiplexed: STREAMS streams of PER_STREAM sessions, frames pipelined.
        streams: dict[str, Multiplexer] = {}
        for k in range(STREAMS):
            stream = client.stream()
            for j in range(PER_STREAM):
                session = await client.open_session(f"mux-{k}-{j}", stream=stream)
                streams[session.id] = stream
                x = _recording(samples, 100 + k * PER_STREAM + j)
                await asyncio.gather(*(session.send_nowait(x[t]) for t in range(STEPS)))
        # Calls about no session spread: nginx's map gives each a random key, HAProxy falls
        # back to round robin.
        for _ in range(20):
            await client.predict([_recording(samples, 0)[:10]])
        assert client.multiplexer.reconnects == 0

    home = {}
    for sid in [*unary, *streams]:
        found = await _where(c.replicas, sid)
        assert list(found.values()) == [STEPS], f"{sid}: {found}"
        home[sid] = next(iter(found))
    for stream in set(streams.values()):  # a stream's sessions share its replica
        assert len({home[sid] for sid, s in streams.items() if s is stream}) == 1
    per_replica = {r.name: sum(1 for h in home.values() if h == r.name) for r in c.replicas}
    assert all(per_replica.values()), f"sessions did not spread: {per_replica}"
    assert (
        sum(r.metric("seqserve_session_events_total", event="opened") for r in c.replicas)
        == UNARY + STREAMS * PER_STREAM
    )
    assert sum(r.metric("seqserve_steps_total") for r in c.replicas) == (
        (UNARY + STREAMS * PER_STREAM) * STEPS
    )
    predicts = [r.metric("seqserve_requests_total", rpc="Predict") for r in c.replicas]
    assert sum(predicts) == 20 and all(predicts), predicts


async def test_a_stream_may_send_more_than_nginx_default_body_limit(cluster, samples):
    """A stream is one HTTP request: with nginx's default client_max_body_size (1 MiB) it would
    be reset after its first MiB. 1.6 MB of requests the server refuses cheaply (wrong feature
    count; refused in the stream, which goes on), then a real step on the same call."""
    c = cluster(replicas=1)
    assert c.nginx is not None
    x = _recording(samples, 0)
    wrong = np.zeros((1, 40_000), np.float32)  # 160 kB
    async with grpc.aio.insecure_channel(c.nginx.target) as channel:
        call = pb_grpc.SeqServeStub(channel).Stream(metadata=((ROUTE_HEADER, "long"),))
        for position in range(10):
            await call.write(step_request("long-1", position, wrong, start=True))
            assert (await call.read()).error.reason == "feature_count"
        await call.write(step_request("long-1", 0, x[:3], start=True))
        assert (await call.read()).next_position == 3
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


@FRONTS
async def test_a_killed_replica_is_skipped_and_its_stream_moves_with_its_key(
    cluster, samples, front
):
    c = cluster(replicas=2, nginx=front == "nginx", haproxy=front == "haproxy")
    x = _recording(samples, 3)
    async with AsyncClient(c.front.target, timeout=WAIT, retry=FAST) as client:
        session = await client.open_session("moving-1")
        await session.send(x[:10])
        (victim,) = (await _where(c.replicas, "moving-1")).keys()
        (survivor,) = [r for r in c.replicas if r.name != victim]
        c.replica(victim).kill()

        # New calls whose key hashes to the dead replica: the proxy's connect fails, it marks
        # the replica down and passes the call on; the client sees no error.
        ids = [f"after-{i}" for i in range(20)]
        await asyncio.gather(*(client.step(sid, x[:3], position=0) for sid in ids))
        for sid in ids:
            assert await _where([survivor], sid) == {survivor.name: 3}

        # The stream was on the dead replica: the client resumes it through the proxy with the
        # same key, and lands on the survivor. Without a shared store the session's state died with
        # its process, so the survivor does not know it.
        route = client.multiplexer.route
        with pytest.raises(SessionLost) as lost:
            await session.send(x[10:12], timeout=WAIT)
        assert lost.value.reason == "unknown"
        assert client.multiplexer.reconnects >= 1 and client.multiplexer.route == route
    assert survivor.metric("seqserve_requests_total", rpc="Step") == 20
    if c.nginx is None:
        return
    log = c.nginx.access_log

    def streams() -> list[str]:  # nginx logs a call when it ends: the client just ended it
        return [
            line
            for line in log.read_text().splitlines()
            if "/Stream " in line and f"route={route} " in line
        ]

    await _eventually(lambda: len(streams()) >= 2)
    # the call on the victim, then the resumed one on the survivor
    assert [line.split("upstream=")[1].split()[0] for line in streams()[-2:]] == [
        c.replica(victim).target,
        survivor.target,
    ]


async def _eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
