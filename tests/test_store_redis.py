"""The shared session store, against a real redis-server on loopback: two in-process replicas
hand sessions to each other through it, exactly once, and keep serving when it is gone."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from cluster import Redis
from helpers import free_port, metric, probs, solo_run, step_request, store_key

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import from_matrix, to_matrix

TOL = 1e-5


def text(reply: object) -> str:
    assert isinstance(reply, bytes), reply
    return reply.decode()


@pytest.fixture
async def replicas(
    start_server: Callable[..., Any], redis_server: Redis
) -> AsyncIterator[Callable[..., Any]]:
    """``await replica(name, **settings) -> (app, stub)``: in-process replicas sharing Redis."""
    channels: list[grpc.aio.Channel] = []

    async def replica(name: str, **overrides: Any) -> tuple[Any, pb_grpc.SeqServeStub]:
        overrides.setdefault("store", redis_server.url)
        # Sessions live in Redis, as in the compose and k8s deployments: no snapshot file (which
        # two replicas could not share anyway: a server locks its file).
        overrides.setdefault("snapshot_path", "")
        app, port = await start_server(replica_id=name, **overrides)
        app.target = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return app, pb_grpc.SeqServeStub(channel)

    yield replica
    for channel in channels:
        await channel.close()


def recording(samples: dict[str, np.ndarray], n: int = 24) -> np.ndarray:
    return samples["x"][0][:n].astype(np.float32)


async def step(
    stub: pb_grpc.SeqServeStub, sid: str, x: np.ndarray, position: int, count: int = 1
) -> pb.StepResponse:
    return await stub.Step(
        step_request(sid, position, x[position : position + count], start=position == 0)
    )


async def test_a_session_moves_between_replicas_with_identical_outputs(
    replicas, samples, model_dir
):
    _, a = await replicas("a")
    _, b = await replicas("b")
    x = recording(samples)
    out = [probs(await step(a, "hop", x, t)) for t in range(8)]
    out += [probs(await step(b, "hop", x, t)) for t in range(8, 16)]  # b claims it
    # a's copy is stale now: a request there finds the session moved and takes it back.
    out += [probs(await step(a, "hop", x, t)) for t in range(16, 24)]
    assert np.abs(np.concatenate(out) - solo_run(model_dir, x)).max() <= TOL
    info = await a.GetSession(pb.SessionRef(session_id="hop"))
    assert info.position == 24


async def test_with_k1_a_resend_after_takeover_is_replayed_not_applied_twice(
    replicas, samples, redis_server
):
    _, a = await replicas("a")
    _, b = await replicas("b")
    x = recording(samples)
    first = await step(a, "once", x, 0, 6)
    # b reads it from the store without taking it over
    info = await b.GetSession(pb.SessionRef(session_id="once"))
    assert (info.position, info.rolled_back) == (6, False)
    assert text(redis_server.command("HGET", store_key("once"), "h")) == "a|6"
    # a applied 0..5; the client never saw the answer and resends it to b.
    again = await step(b, "once", x, 0, 6)
    assert again.replayed and again.next_position == 6
    assert again.probabilities.data == first.probabilities.data
    assert text(redis_server.command("HGET", store_key("once"), "h")) == "b|6"


async def test_with_k4_a_dead_replicas_last_frames_are_reported_and_resent(
    replicas, samples, model_dir
):
    app_a, a = await replicas("a", checkpoint_every=4)
    _, b = await replicas("b", checkpoint_every=4)
    x = recording(samples)
    for t in range(10):  # full checkpoints when created (1), then every 4 frames: 5, 9
        await step(a, "lossy", x, t)
    app_a.engine.store._down_until = float("inf")  # a "dies": it never writes again
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await step(b, "lossy", x, 10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    meta = dict(err.value.trailing_metadata())
    assert meta["seqserve-reason"] == "rolled_back"
    assert meta["seqserve-expected-position"] == "9"  # frame 9 was lost (at most K-1 can be)
    resent = await step(b, "lossy", x, 9, 15)
    assert np.abs(probs(resent) - solo_run(model_dir, x)[9:]).max() <= TOL


async def test_with_k4_get_session_on_the_survivor_says_where_to_resume(
    replicas, samples, model_dir
):
    """A client that asks where to resume before stepping is given the position the survivor
    resumes from (the last checkpoint, not the dead replica's head) and told it rolled back;
    the step from there is accepted as it is."""
    app_a, a = await replicas("a", checkpoint_every=4)
    _, b = await replicas("b", checkpoint_every=4)
    x = recording(samples)
    for t in range(10):
        await step(a, "asks", x, t)
    assert (await a.GetSession(pb.SessionRef(session_id="asks"))).rolled_back is False
    app_a.engine.store._down_until = float("inf")  # a "dies"
    info = await b.GetSession(pb.SessionRef(session_id="asks"))
    assert (info.position, info.rolled_back) == (9, True)  # a had applied 10
    resent = await step(b, "asks", x, info.position, 15)  # claims it; no refusal first
    assert np.abs(probs(resent) - solo_run(model_dir, x)[9:]).max() <= TOL
    info = await b.GetSession(pb.SessionRef(session_id="asks"))
    assert (info.position, info.rolled_back) == (24, False)


async def test_two_replicas_never_both_apply_a_frame(replicas, samples):
    """b claims the session while a still holds it; then each gets the same next frame. Only
    one of them applies it: the other's write to the store fails and it says session_moved."""
    _, a = await replicas("a")
    _, b = await replicas("b")
    x = recording(samples)
    await step(a, "race", x, 0, 4)
    await step(b, "race", x, 0, 4)  # a resend: b claims the session, replays
    results = await asyncio.gather(
        step(a, "race", x, 4), step(b, "race", x, 4), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(failed) == 1 and failed[0].code() == grpc.StatusCode.ABORTED
    assert dict(failed[0].trailing_metadata())["seqserve-reason"] == "session_moved"
    ok = next(r for r in results if not isinstance(r, BaseException))
    assert ok.next_position == 5 and not ok.replayed


async def test_the_client_library_resends_a_step_refused_session_moved(
    replicas, samples, model_dir
):
    """a's copy is stale (b claimed the session); a step sent to a is applied there, a's write
    to the store fails and it answers ABORTED session_moved. The proto says: resend. The client
    library does, and the resend resumes the session (a claims it back) with exact outputs."""
    from seqserve.client import AsyncClient, Backoff

    app_a, a = await replicas("a")
    _, b = await replicas("b")
    x = recording(samples)
    await step(a, "moving", x, 0, 4)
    await step(b, "moving", x, 0, 4)  # a resend: b claims the session and replays
    retry = Backoff(initial=0.01, maximum=0.05, max_elapsed=10.0)
    async with AsyncClient(app_a.target, timeout=10, retry=retry) as client:
        p = await client.step("moving", x[4:6], position=4)
    assert np.abs(p.probabilities - solo_run(model_dir, x[:6])[4:]).max() <= TOL
    info = await a.GetSession(pb.SessionRef(session_id="moving"))
    assert info.position == 6  # applied once, now held by a


async def test_serving_goes_on_from_memory_while_redis_is_down(
    replicas, samples, redis_server, model_dir, tmp_path
):
    app_a, a = await replicas("a", store_retry=0.2)
    _, b = await replicas("b", store_retry=0.2)
    x = recording(samples)
    await step(a, "held", x, 0, 4)
    port = redis_server.port
    redis_server.kill()
    out = [probs(await step(a, "held", x, t)) for t in range(4, 12)]  # from memory
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a resume elsewhere needs the store
        await step(b, "held", x, 12)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(err.value.trailing_metadata())["seqserve-reason"] == "store_unavailable"
    fresh = await step(b, "fresh", x, 0, 2)  # a new session still starts, in memory
    assert fresh.next_position == 2
    redis_server.start(tmp_path / "redis", port)  # back, empty: the next write re-creates them
    await asyncio.sleep(0.3)
    out += [probs(await step(a, "held", x, t)) for t in range(12, 16)]
    calls = app_a.metrics.store_calls
    assert calls.labels("commit", "failed")._value.get() >= 1  # the outage shows in /metrics
    assert calls.labels("commit", "skipped")._value.get() >= 1
    assert calls.labels("commit", "ok")._value.get() >= 2
    assert np.abs(np.concatenate(out) - solo_run(model_dir, x)[4:16]).max() <= TOL
    await step(a, "held", x, 16)  # the first write after the outage found it missing
    assert text(redis_server.command("HGET", store_key("held"), "pos")) == "17"
    moved = await step(b, "held", x, 17)  # b resumes from there, nothing lost
    assert np.abs(probs(moved) - solo_run(model_dir, x)[17]).max() <= TOL


async def test_a_stalled_redis_does_not_stall_serving(replicas, samples, redis_server, model_dir):
    """Redis hangs for 3 s (DEBUG SLEEP): a replica waits for it at most --store-timeout, then
    serves from memory; every step completes while Redis is still asleep, with exact outputs,
    and once it wakes the session's next write brings the store up to date."""
    _, a = await replicas("a", store_timeout=0.2, store_retry=0.5)
    x = recording(samples)
    await step(a, "stall", x, 0, 4)
    sleeper = asyncio.create_task(asyncio.to_thread(redis_server.command, "DEBUG", "SLEEP", "3"))
    await asyncio.sleep(0.1)
    out = [probs(await step(a, "stall", x, t)) for t in range(4, 12)]
    assert not sleeper.done(), "the steps waited for Redis"
    assert np.abs(np.concatenate(out) - solo_run(model_dir, x[:12])[4:]).max() <= TOL
    await sleeper
    await asyncio.sleep(0.6)  # past --store-retry: the store is tried again
    await step(a, "stall", x, 12)
    assert text(redis_server.command("HGET", store_key("stall"), "h")) == "a|13"


async def test_the_client_waits_out_a_store_outage_to_resume(
    replicas, samples, redis_server, model_dir
):
    """Sessions held by a, resumed through the client library on b while Redis hangs (SIGSTOP):
    b answers store_unavailable, not "unknown"; the client keeps trying under its backoff (a
    unary GetSession, and a step in a stream) and once Redis wakes, b claims the sessions and
    the outputs go on exactly."""
    from seqserve.client import AsyncClient, Backoff

    _, a = await replicas("a")
    b, _ = await replicas("b", store_timeout=0.2, store_retry=0.2)
    x = recording(samples)
    for sid in ("outage-1", "outage-2"):
        await step(a, sid, x, 0, 8)
    redis_server.pause()

    async def wake() -> None:
        await asyncio.sleep(1.5)
        redis_server.resume()

    waker = asyncio.create_task(wake())
    retry = Backoff(initial=0.1, maximum=0.3, max_elapsed=30)
    async with AsyncClient(b.target, retry=retry, timeout=10) as client:
        streamed = client.multiplexer.submit(step_request("outage-2", 8, x[8:12]))
        session = await client.open_session("outage-1", resume=True)  # GetSession, retried
        assert session.position == 8
        resumed = await session.send(x[8:12])
        response = await streamed
    assert waker.done()
    expected = solo_run(model_dir, x[:12])[8:]
    assert np.abs(resumed.probabilities - expected).max() <= TOL
    assert response.next_position == 12 and np.abs(probs(response) - expected).max() <= TOL
    claimed = metric(b.metrics.registry, "seqserve_session_events_total", {"event": "claimed"})
    assert claimed == 2


async def test_drain_checkpoints_every_session_and_close_is_shared(
    replicas, samples, model_dir, redis_server
):
    app_a, a = await replicas("a", checkpoint_every=16, session_idle_timeout=30.0)
    _, b = await replicas("b", checkpoint_every=16)
    x = recording(samples)
    for t in range(5):
        await step(a, "drained", x, t)
    await step(a, "closing", x, 0, 3)
    ttl = redis_server.command("PTTL", store_key("drained"))
    assert isinstance(ttl, int)
    assert 25_000 < ttl <= 30_000  # the store expires it with the server's idle timeout
    await a.CloseSession(pb.SessionRef(session_id="closing"))
    await app_a.stop()  # drain: sessions saved with their latest state
    r = await step(b, "drained", x, 5)
    assert np.abs(probs(r) - solo_run(model_dir, x[:6])[5]).max() <= TOL
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await step(b, "closing", x, 3)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["seqserve-reason"] == "closed"


async def test_batches_claim_what_they_do_not_hold(replicas, samples, model_dir):
    _, a = await replicas("a")
    _, b = await replicas("b")
    x = np.stack([samples["x"][i][:6] for i in range(4)]).astype(np.float32)
    ids = [f"mb-{i}" for i in range(4)]

    def batch(t: int) -> pb.StepBatchRequest:
        return pb.StepBatchRequest(
            session_ids=ids, positions=[t] * 4, frames=to_matrix(x[:, t]), start=t == 0
        )

    rows = [from_matrix((await a.StepBatch(batch(t))).probabilities) for t in range(3)]
    for t in range(3, 6):
        r = await b.StepBatch(batch(t))
        assert not r.errors
        rows.append(from_matrix(r.probabilities))
    got = np.stack(rows, axis=1)
    for i in range(4):
        assert np.abs(got[i] - solo_run(model_dir, x[i])).max() <= TOL


def test_workers_share_one_port_and_hand_sessions_over(redis_server, samples, model_dir, tmp_path):
    """``--workers 2``: two processes on one port. Every fresh connection lands on either; a
    session stepped over fresh connections visits both and its outputs are exact. At least
    twenty steps, and on until both workers have served it (a worker still starting takes no
    connections yet), within the recording's 100 frames."""
    import sys

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "seqserve.server",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--store",
            redis_server.url,
            "--replica-id",
            "box",
            "--model-dir",
            str(model_dir),
            "--snapshot-path",
            "",
            "--drain-grace",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    x = recording(samples, 100)
    owners = set()

    async def run() -> list[np.ndarray]:
        out = []
        for t in range(len(x)):
            if t >= 20 and len(owners) == 2:
                break
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.SeqServeStub(channel)
                await asyncio.wait_for(channel.channel_ready(), 30)
                out.append(probs(await step(stub, "w", x, t)))
            owners.add(text(redis_server.command("HGET", store_key("w"), "h")).split("|")[0])
        return out

    try:
        out = asyncio.run(run())
    finally:
        server.send_signal(2)  # SIGINT: the parent stops every worker, each drains
        log = server.communicate(timeout=60)[0].decode()
    assert server.returncode == 0, log
    assert owners == {"box-w0", "box-w1"}, log
    assert np.abs(np.concatenate(out) - solo_run(model_dir, x[: len(out)])).max() <= TOL
