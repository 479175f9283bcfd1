"""A client that streams requests but never reads the answers: the server stops taking its
requests once ``stream_inflight`` answers wait to be sent and the transport's windows are full, so
what it holds for that stream stays bounded, other clients are served all the while,
and once the client reads, every answer arrives, in order and correct."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from helpers import metric, probs, solo_run, step_request

from seqserve.proto import seqserve_pb2_grpc as pb_grpc

INFLIGHT = 8
CHUNK = 16  # frames per request: answers of 16 x 4 probabilities fill windows quickly
REQUESTS = 1500
WINDOW = 65535  # HTTP/2 initial window; BDP probing is off on the slow client so it stays so


def _ok(app) -> float:
    return (
        metric(app.metrics.registry, "seqserve_requests_total", {"rpc": "Stream", "code": "OK"})
        or 0.0
    )


async def test_a_client_that_never_reads_is_held_to_a_bounded_backlog(
    start_server, model_dir, samples
):
    app, port = await start_server(stream_inflight=INFLIGHT)
    rng = np.random.default_rng(7)
    frames = rng.standard_normal((REQUESTS * CHUNK, 6)).astype(np.float32)
    sid = "never-reads"

    slow = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)],
    )
    call = pb_grpc.SeqServeStub(slow).Stream()
    written = 0

    async def write_all() -> None:
        nonlocal written
        for i in range(REQUESTS):
            await call.write(
                step_request(
                    sid, i * CHUNK, frames[i * CHUNK : (i + 1) * CHUNK], start=i == 0, tag=i
                )
            )
            written += 1
        await call.done_writing()

    writer = asyncio.create_task(write_all())
    try:
        # Wait until the server stops taking requests from this stream (bounded wait).
        deadline = time.monotonic() + 20
        last, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            session = app.engine.table.find(sid)
            accepted = session.accepted if session else 0
            if accepted != last:
                last, still_since = accepted, time.monotonic()
            elif time.monotonic() - still_since > 1.0:
                break
        else:
            raise AssertionError("the server never stopped taking requests")
        accepted_requests = last // CHUNK
        answered = _ok(app)
        print(
            f"\nnever-reading client: {written} requests written, {accepted_requests} accepted "
            f"by the server, {answered:.0f} answered, {INFLIGHT} inflight allowed"
        )
        # The client's writes complete into its own transport buffers, so it has written far
        # more than the server took. The server took only what fits the client's 64 KiB receive
        # window (each answer is over CHUNK x 4 x 4 bytes of probabilities) plus the INFLIGHT
        # answers it may queue, plus the one request its reader holds while it waits for a slot.
        assert written > accepted_requests
        assert accepted_requests <= WINDOW // (CHUNK * 4 * 4) + INFLIGHT + 1
        assert answered == accepted_requests  # nothing accepted is left unanswered in the engine
        session = app.engine.table.find(sid)
        assert not session.pending and session.position == session.accepted

        # Meanwhile other clients are served (not held behind the stalled stream).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            other = samples["x"][2][:30]
            expected = solo_run(model_dir, other)
            for p in range(len(other)):
                out = await stub.Step(
                    step_request("other", p, other[p : p + 1], start=p == 0), timeout=10
                )
                assert np.abs(probs(out) - expected[p : p + 1]).max() <= 1e-5
        assert app.engine.table.find(sid).accepted == last, "still stalled"

        # Now the client reads: every answer arrives, in order, and correct.
        got = []
        while True:
            response = await asyncio.wait_for(call.read(), 10)
            if response is grpc.aio.EOF:
                break
            assert not response.HasField("error"), response.error
            assert response.tag == len(got) and response.position == len(got) * CHUNK
            got.append(probs(response))
        await asyncio.wait_for(writer, 10)
        assert await call.code() == grpc.StatusCode.OK
        assert len(got) == REQUESTS
        expected = solo_run(model_dir, frames)
        assert np.abs(np.concatenate(got) - expected).max() <= 1e-4
    finally:
        writer.cancel()
        await slow.close(grace=None)
