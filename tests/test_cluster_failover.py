"""Failover for real: two seqserve replicas sharing a redis-server, behind nginx running
deploy/nginx/seqserve.conf, all on loopback (tests/cluster.py). Sessions stream through the
client library; the replica holding them is killed with SIGKILL mid-stream; the client resumes
through nginx on the other replica, which claims the sessions from Redis.

With a checkpoint every frame (K = 1) the outputs are identical to an uninterrupted run: no frame
lost, none applied twice. With K = 4 the survivor resumes from the last checkpoint, at most
K - 1 frames behind what the dead replica had applied, and the client is told where
(``rolled_back``), resends from there, and again ends with the uninterrupted run's outputs."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from helpers import solo_run, store_key

from seqserve.client import AsyncClient, Backoff, SeqServeError

RETRY = Backoff(initial=0.05, maximum=0.5, max_elapsed=30.0)
SESSIONS, FRAMES, KILL_AT = 12, 60, 27


def _store_args(every: int) -> tuple[str, ...]:
    return ("--store", "{redis}", "--replica-id", "{name}", "--checkpoint-every", str(every))


def _holder(c: Any, session_id: str) -> Any:
    """The replica owning the session, as the store says (asking the replicas would not do:
    any of them answers for a session in the store)."""
    owner = c.redis.command("HGET", store_key(f"{session_id}"), "h")
    assert isinstance(owner, bytes), owner
    return c.replica(owner.decode().rpartition("|")[0])


async def _stream_through_a_kill(
    c: Any, xs: list[np.ndarray], every: int, *, barrier: bool
) -> tuple[list[np.ndarray], dict[str, int], Any, int]:
    """Stream every recording frame by frame and SIGKILL the replica holding them: once the
    first session has applied KILL_AT frames, the others still sending (requests in flight), or
    with ``barrier`` once every session has applied exactly KILL_AT frames.
    Returns per-session outputs, the rolled_back positions the client was given, the victim and
    how many requests the client wrote again after the kill."""
    rolled: dict[str, int] = {}
    async with AsyncClient(c.front.target, timeout=30, retry=RETRY) as client:
        sessions = [await client.open_session(f"fo-{every}-{i}") for i in range(SESSIONS)]
        reached = asyncio.Event()
        waiting: list[int] = []
        victim: list[Any] = []

        async def feed(i: int) -> np.ndarray:
            out: list[np.ndarray] = []
            t = 0
            while t < FRAMES:
                if t == KILL_AT and not victim and (barrier or not waiting):
                    waiting.append(i)
                    if len(waiting) == (SESSIONS if barrier else 1):
                        reached.set()
                    while not victim:
                        await asyncio.sleep(0.005)
                try:
                    p = await sessions[i].send(xs[i][t])
                except SeqServeError as exc:
                    # K > 1: the survivor resumed from the last checkpoint; resend from there.
                    assert exc.reason == "rolled_back" and every > 1, exc
                    rolled[sessions[i].id] = exc.position or 0
                    sessions[i] = await client.open_session(sessions[i].id, resume=True)
                    assert sessions[i].position == exc.position
                    del out[sessions[i].position :]
                    t = sessions[i].position
                    continue
                out.append(p.probabilities[0])
                t += 1
            return np.stack(out)

        async def kill() -> None:
            await reached.wait()
            holder = _holder(c, sessions[0].id)
            holder.kill()
            victim.append(holder)

        killer = asyncio.create_task(kill())
        outputs = await asyncio.wait_for(asyncio.gather(*(feed(i) for i in range(SESSIONS))), 120)
        await killer
        positions = [(await client.get_session(s.id)).position for s in sessions]
        assert positions == [FRAMES] * SESSIONS
        assert client.multiplexer.reconnects >= 1
        resent = client.multiplexer.resent
    return outputs, rolled, victim[0], resent


def _check(outputs: list[np.ndarray], xs: list[np.ndarray], model_dir: Any) -> None:
    for i, out in enumerate(outputs):
        assert out.shape == (FRAMES, 4)
        assert np.abs(out - solo_run(model_dir, xs[i])).max() <= 1e-5, f"session {i}"


@pytest.fixture
def recordings(samples: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [samples["x"][i % len(samples["x"])][:FRAMES] for i in range(SESSIONS)]


async def test_k1_a_killed_replica_loses_nothing_and_doubles_nothing(
    cluster, recordings, model_dir
):
    c = cluster(replicas=2, redis=True, args=_store_args(1))
    outputs, rolled, victim, resent = await _stream_through_a_kill(
        c, recordings, every=1, barrier=False
    )
    assert rolled == {}  # nothing was lost, so nobody was told to resend
    assert resent >= 1  # requests were in flight at the kill: answered again, not applied twice
    print(
        f"failover K=1: {SESSIONS} sessions x {FRAMES} frames, {resent} requests in flight at "
        "the kill written again, 0 lost, 0 doubled"
    )
    _check(outputs, recordings, model_dir)
    survivor = next(r for r in c.replicas if r is not victim)
    assert survivor.metric("seqserve_session_events_total", event="claimed") == SESSIONS
    # Every frame was applied once: the store's head is the frame count for every session.
    for i in range(SESSIONS):
        head = c.redis.command("HGET", store_key(f"fo-1-{i}"), "h")
        assert isinstance(head, bytes) and head.decode() == f"{survivor.name}|{FRAMES}"


async def test_k4_a_killed_replica_loses_at_most_k_minus_1_frames_and_says_so(
    cluster, recordings, model_dir
):
    every = 4
    c = cluster(replicas=2, redis=True, args=_store_args(every))
    outputs, rolled, _, _ = await _stream_through_a_kill(c, recordings, every=every, barrier=True)
    # A session is checkpointed when created (after frame 0) and then every 4 frames: 1, 5, ...
    # 25. Every session had applied KILL_AT = 27 frames when its replica died: each resumes from
    # 25, at most K - 1 frames back, and its client is told so.
    assert sorted(rolled) == sorted(f"fo-{every}-{i}" for i in range(SESSIONS))
    assert set(rolled.values()) == {25}
    _check(outputs, recordings, model_dir)
