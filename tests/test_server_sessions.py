"""Session promises: exactly-once positions, expiry, caps, lifecycle calls, bad input."""

from __future__ import annotations

import asyncio
import functools
import time

import grpc
import numpy as np
import pytest
from helpers import metric, probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb

TOL = 1e-5


async def _status(coro) -> tuple[grpc.StatusCode, str, int]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    meta = dict(info.value.trailing_metadata() or ())
    return (
        info.value.code(),
        meta.get("seqserve-reason", ""),
        int(meta.get("seqserve-expected-position", "0")),
    )


async def test_retried_request_is_replayed_not_applied_twice(stub, samples, model_dir):
    x = samples["x"][1][:12]
    first = await stub.Step(step_request("ex", 0, x[:5], start=True))
    second = await stub.Step(step_request("ex", 5, x[5:8]))
    again = await stub.Step(step_request("ex", 5, x[5:8]))  # the client never saw `second`
    assert again.replayed and again.next_position == 8
    np.testing.assert_array_equal(probs(again), probs(second))
    start_again = await stub.Step(step_request("ex", 0, x[:5], start=True))  # retried start
    assert start_again.replayed
    np.testing.assert_array_equal(probs(start_again), probs(first))
    # Overlap: frames 6..11, of which 6 and 7 were applied: only 8..11 are new.
    overlap = await stub.Step(step_request("ex", 6, x[6:12]))
    assert overlap.position == 6 and overlap.frames == 6 and overlap.next_position == 12
    expected = solo_run(model_dir, x)
    assert np.abs(probs(overlap) - expected[6:12]).max() <= TOL
    info = await stub.GetSession(pb.SessionRef(session_id="ex"))
    assert info.position == 12


async def test_gap_is_rejected_with_expected_position_and_state_kept(stub, samples, model_dir):
    x = samples["x"][2][:6]
    await stub.Step(step_request("gap", 0, x[:3], start=True))
    code, reason, expected = await _status(stub.Step(step_request("gap", 5, x[5:6])))
    assert (code, reason, expected) == (grpc.StatusCode.FAILED_PRECONDITION, "position_gap", 3)
    r = await stub.Step(step_request("gap", 3, x[3:6]))
    assert np.abs(probs(r) - solo_run(model_dir, x)[3:6]).max() <= TOL


async def test_stale_position_outside_replay_window(start_server, samples):
    _, port = await start_server(replay_window=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        from seqserve.proto import seqserve_pb2_grpc as pb_grpc

        stub = pb_grpc.SeqServeStub(channel)
        x = samples["x"][0][:10]
        await stub.Step(step_request("st", 0, x, start=True))
        replay = await stub.Step(step_request("st", 6, x[6:10]))
        assert replay.replayed
        code, reason, expected = await _status(stub.Step(step_request("st", 5, x[5:10])))
        assert (code, reason, expected) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "stale_position",
            10,
        )


async def test_unknown_session_is_not_silently_started(stub, samples):
    code, reason, _ = await _status(stub.Step(step_request("nobody", 0, samples["x"][0][:1])))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "unknown")
    # start creates a session only at position 0: above it, a missing session is NOT_FOUND as
    # without start (the client believes it exists), never a position_gap "expecting 0".
    code, reason, expected = await _status(
        stub.Step(step_request("nobody", 3, samples["x"][0][:1], start=True))
    )
    assert (code, reason, expected) == (grpc.StatusCode.NOT_FOUND, "unknown", 0)
    await stub.Step(step_request("short", 0, samples["x"][0][:2], start=True, end=True))
    code, reason, expected = await _status(
        stub.Step(step_request("short", 5, samples["x"][0][:1], start=True))
    )
    assert (code, reason, expected) == (grpc.StatusCode.NOT_FOUND, "closed", 2)
    again = await stub.Step(step_request("short", 0, samples["x"][0][:1], start=True))
    assert again.next_position == 1  # position 0 starts the id afresh


async def test_idle_session_expires_and_says_so(start_server, samples):
    app, port = await start_server(session_idle_timeout=1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        from seqserve.proto import seqserve_pb2_grpc as pb_grpc

        stub = pb_grpc.SeqServeStub(channel)
        await stub.Step(step_request("idle", 0, samples["x"][0][:4], start=True))
        info = await stub.GetSession(pb.SessionRef(session_id="idle"))
        assert 0 < info.expires_in_seconds <= 1.0
        deadline = time.monotonic() + 5
        while len(app.engine.table) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        code, reason, position = await _status(
            stub.Step(step_request("idle", 4, samples["x"][0][4:5]))
        )
        assert (code, reason, position) == (grpc.StatusCode.NOT_FOUND, "expired", 4)
        sample = functools.partial(metric, app.metrics.registry)
        assert sample("seqserve_session_events_total", {"event": "expired"}) == 1
        assert sample("seqserve_live_sessions") == 0


async def test_session_cap_refuses_at_once(start_server, samples):
    app, port = await start_server(max_sessions=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        from seqserve.proto import seqserve_pb2_grpc as pb_grpc

        stub = pb_grpc.SeqServeStub(channel)
        await stub.OpenSession(pb.OpenSessionRequest(session_id="a"))
        await stub.Step(step_request("b", 0, samples["x"][0][:1], start=True))
        t0 = time.perf_counter()
        code, reason, _ = await _status(stub.OpenSession(pb.OpenSessionRequest()))
        assert time.perf_counter() - t0 < 1.0
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "session_limit")
        code, reason, _ = await _status(
            stub.Step(step_request("c", 0, samples["x"][0][:1], start=True))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            metric(app.metrics.registry, "seqserve_session_events_total", {"event": "refused"}) == 2
        )
        await stub.CloseSession(pb.SessionRef(session_id="a"))
        await stub.OpenSession(pb.OpenSessionRequest(session_id="c"))


async def test_open_get_reset_close(stub, samples, model_dir):
    opened = await stub.OpenSession(pb.OpenSessionRequest())
    sid = opened.session_id
    assert len(sid) == 32 and opened.position == 0
    code, reason, _ = await _status(stub.OpenSession(pb.OpenSessionRequest(session_id=sid)))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "session_exists")
    x = samples["x"][3][:8]
    await stub.Step(step_request(sid, 0, x[:5]))  # opened: no start flag needed
    assert (await stub.GetSession(pb.SessionRef(session_id=sid))).position == 5
    reset = await stub.ResetSession(pb.SessionRef(session_id=sid))
    assert reset.position == 0
    r = await stub.Step(step_request(sid, 0, x))
    assert np.abs(probs(r) - solo_run(model_dir, x)).max() <= TOL
    closed = await stub.CloseSession(pb.SessionRef(session_id=sid))
    assert closed.closed and closed.position == 8
    code, reason, position = await _status(stub.GetSession(pb.SessionRef(session_id=sid)))
    assert (code, reason, position) == (grpc.StatusCode.NOT_FOUND, "closed", 8)


async def test_end_flag_closes_after_applying(stub, samples):
    x = samples["x"][0][:3]
    r = await stub.Step(step_request("endme", 0, x, start=True, end=True))
    assert r.ended and r.next_position == 3
    code, reason, _ = await _status(stub.GetSession(pb.SessionRef(session_id="endme")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "closed")


BAD = [
    ("feature_count", lambda x: step_request("bad", 2, np.ones((1, 5), np.float32))),
    ("non_finite", lambda x: step_request("bad", 2, np.array([[np.nan] * 6], np.float32))),
    ("non_finite", lambda x: step_request("bad", 2, np.array([[np.inf] * 6], np.float32))),
    ("bad_frames", lambda x: pb.StepRequest(session_id="bad", position=2)),
    (
        "bad_frames",
        lambda x: pb.StepRequest(
            session_id="bad", position=2, frames=pb.Matrix(rows=1, cols=6, data=b"\0" * 7)
        ),
    ),
    (
        "bad_frames",
        lambda x: pb.StepRequest(
            session_id="bad", position=2, frames=pb.Matrix(rows=2, cols=6, data=b"\0" * 24)
        ),
    ),
    ("too_many_frames", lambda x: step_request("bad", 2, np.zeros((5000, 6), np.float32))),
    ("bad_session_id", lambda x: step_request("", 2, x[2:3])),
    ("bad_session_id", lambda x: step_request("a" * 129, 2, x[2:3])),
    ("bad_session_id", lambda x: step_request("sp ace", 2, x[2:3])),
    ("bad_session_id", lambda x: step_request("caf\u00e9", 2, x[2:3])),
]


@pytest.mark.parametrize(("reason", "make"), BAD)
async def test_bad_input_is_rejected_specifically_and_state_is_kept(
    stub, samples, model_dir, reason, make
):
    x = samples["x"][0][:4]
    await stub.Step(step_request("bad", 0, x[:2], start=True))
    code, got, _ = await _status(stub.Step(make(x)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert got == reason
    # The same rejection inside a stream: an in-stream error, and the stream goes on.
    call = stub.Stream(iter([make(x), step_request("bad", 2, x[2:4])]))
    responses = [r async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[0].error.reason == reason
    assert not responses[1].HasField("error")
    assert np.abs(probs(responses[1]) - solo_run(model_dir, x)[2:4]).max() <= TOL


async def test_oversized_message_is_refused_not_crashing(start_server, samples):
    _, port = await start_server(max_message_bytes=64 * 1024)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        from seqserve.proto import seqserve_pb2_grpc as pb_grpc

        stub = pb_grpc.SeqServeStub(channel)
        big = np.zeros((4000, 6), np.float32)  # 96 KB
        code, _, _ = await _status(stub.Step(step_request("big", 0, big, start=True)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        r = await stub.Step(step_request("big", 0, samples["x"][0][:2], start=True))
        assert r.next_position == 2
        # The limit is published, because grpc enforces it before the server sees a message: on
        # a stream an oversized message ends the stream (as the proto says), not just itself.
        assert (await stub.GetModel(pb.ModelRequest())).max_message_bytes == 64 * 1024
        call = stub.Stream(iter([step_request("big", 2, big)]))
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "seqserve-reason" not in dict(await call.trailing_metadata() or ())


async def test_predict_rejects_bad_sequences(stub):
    from seqserve.proto.codec import to_matrix

    code, reason, _ = await _status(stub.Predict(pb.PredictRequest()))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "no_sequences")
    empty = pb.Sequence(frames=pb.Matrix(rows=0, cols=6))
    code, reason, _ = await _status(stub.Predict(pb.PredictRequest(sequences=[empty])))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_frames")
    seqs = [
        pb.Sequence(frames=to_matrix(np.ones((3, 6)))),
        pb.Sequence(frames=to_matrix(np.ones((3, 4)))),
    ]
    code, reason, _ = await _status(stub.Predict(pb.PredictRequest(sequences=seqs)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "feature_count")


async def test_pipelined_requests_on_one_stream_apply_in_order(stub, samples, model_dir):
    x = samples["x"][0][:50]
    requests = [step_request("pipe", t, x[t : t + 1], start=t == 0) for t in range(50)]
    call = stub.Stream(iter(requests))
    rows = {}
    async for r in call:
        assert not r.HasField("error")
        rows[r.position] = probs(r)[0]
    out = np.stack([rows[t] for t in range(50)])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL
