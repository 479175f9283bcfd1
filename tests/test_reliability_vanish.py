"""Clients that vanish without closing: a cancelled stream, a channel closed mid-stream, and a
client process killed with SIGKILL. Their sessions are freed once each, by idle expiry, and the
server goes on serving."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import grpc
import numpy as np
from helpers import metric, probs, solo_run, step_request

from seqserve.proto import seqserve_pb2_grpc as pb_grpc

IDLE = 1.0

_KILLED_CLIENT = """
import asyncio, sys
import grpc, numpy as np
from seqserve.proto import seqserve_pb2 as pb, seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

async def main(port, count):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = pb_grpc.SeqServeStub(channel).Stream()
    frame = to_matrix(np.zeros((1, 6), np.float32))
    for i in range(count):
        await call.write(pb.StepRequest(session_id=f"killed-{i}", position=0, frames=frame,
                                        start=True))
    for _ in range(count):
        assert not (await call.read()).HasField("error")
    print("ready", flush=True)
    position = 1
    while True:  # mid-stream when the SIGKILL lands
        for i in range(count):
            await call.write(pb.StepRequest(session_id=f"killed-{i}", position=position,
                                            frames=frame))
        for _ in range(count):
            await call.read()
        position += 1

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def _events(app, event: str) -> float:
    return metric(app.metrics.registry, "seqserve_session_events_total", {"event": event})


async def _open_on_stream(port: int, prefix: str, count: int, x: np.ndarray):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = pb_grpc.SeqServeStub(channel).Stream()
    for i in range(count):
        await call.write(step_request(f"{prefix}-{i}", 0, x[:3], start=True))
    for _ in range(count):
        response = await asyncio.wait_for(call.read(), 10)
        assert not response.HasField("error"), response.error
    # Leave one more request in flight on each session, then vanish without CloseSession.
    for i in range(count):
        await call.write(step_request(f"{prefix}-{i}", 3, x[3:5]))
    return channel, call


async def test_vanished_clients_sessions_expire_exactly_once(start_server, model_dir, samples):
    app, port = await start_server(session_idle_timeout=IDLE)
    x = samples["x"][0]

    # 1. A stream cancelled by its client.
    channel_a, call_a = await _open_on_stream(port, "cancelled", 4, x)
    call_a.cancel()
    # 2. A channel closed abruptly under an open stream (no done_writing, no CloseSession).
    channel_b, _ = await _open_on_stream(port, "dropped", 4, x)
    await channel_b.close(grace=None)
    await channel_a.close(grace=None)
    # 3. A client process killed with SIGKILL mid-stream.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        "-c",
        _KILLED_CLIENT,
        str(port),
        "5",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        await asyncio.sleep(0.2)  # let it stream for a while
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -signal.SIGKILL
    vanished = 4 + 4 + 5

    deadline = time.monotonic() + IDLE + 10
    while len(app.engine.table) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(app.engine.table) == 0, [s.id for s in app.engine.table]
    await asyncio.sleep(2 * IDLE)  # several more sweeps: nothing is freed twice
    assert _events(app, "expired") == vanished
    assert _events(app, "opened") == vanished
    assert _events(app, "closed") == 0
    assert app.engine.bank.used == 0
    assert metric(app.metrics.registry, "seqserve_live_sessions") == 0
    for slab in app.engine.bank.slabs:  # released slots hold zero state for the next owner
        assert not slab.any()

    # The server goes on serving, from zero state, in the freed slots.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        fresh = samples["x"][1][:20]
        out = await stub.Step(step_request("after", 0, fresh, start=True), timeout=10)
        assert np.abs(probs(out) - solo_run(model_dir, fresh)).max() <= 1e-5
        # A late request on a vanished session learns it expired, not unknown.
        try:
            await stub.Step(step_request("killed-0", 1, x[:1]), timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert dict(exc.trailing_metadata())["seqserve-reason"] == "expired"
        else:
            raise AssertionError("a step on an expired session was accepted")
    assert app.engine.bank.used == len(app.engine.table) == 1
