"""StepBatch / StreamBatch: one frame for each of many sessions per message, through a real
server. Entries are answered on their own: a bad one fails alone, the rest are applied."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from helpers import probs, solo_run, step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto.codec import from_matrix, to_matrix

TOL = 1e-5


def batch(
    ids: list[str], positions: list[int], frames: np.ndarray, **kw: object
) -> pb.StepBatchRequest:
    return pb.StepBatchRequest(
        session_ids=ids, positions=positions, frames=to_matrix(np.asarray(frames, np.float32)), **kw
    )  # type: ignore[arg-type]


def recordings(samples: dict[str, np.ndarray], n: int, steps: int) -> np.ndarray:
    """[n, steps, features]: n real recordings, cut to ``steps`` frames."""
    return np.stack([samples["x"][i % len(samples["x"])][:steps] for i in range(n)])


def errors(response: pb.StepBatchResponse) -> dict[int, str]:
    return {e.index: e.error.reason for e in response.errors}


async def test_stream_batch_matches_each_session_alone(stub, samples, model_dir):
    x = recordings(samples, 6, 30)
    ids = [f"mb-{i}" for i in range(len(x))]
    requests = [batch(ids, [t] * len(ids), x[:, t], start=t == 0, tag=t) for t in range(30)]
    call = stub.StreamBatch(iter(requests))
    out = [r async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [r.tag for r in out] == list(range(30))
    assert all(not r.errors for r in out)
    got = np.stack([from_matrix(r.probabilities) for r in out], axis=1)  # [sessions, t, C]
    for i in range(len(x)):
        assert np.abs(got[i] - solo_run(model_dir, x[i])).max() <= TOL
    assert list(out[-1].next_positions) == [30] * len(ids)
    assert list(out[-1].top_class) == got[:, -1].argmax(axis=1).tolist()


async def test_a_bad_entry_fails_alone_and_the_rest_is_applied(stub, samples, model_dir):
    x = recordings(samples, 4, 3)
    r = await stub.StepBatch(batch(["ok-a", "ok-b", "ok-c"], [0, 0, 0], x[:3, 0], start=True))
    assert not r.errors
    frames = x[:, 1].copy()
    frames[3, 2] = np.nan
    ids = ["ok-a", "ok-b", "ok-a", "ok-nan", "ok-c", "never-started"]
    rows = np.stack([frames[0], frames[1], frames[0], frames[3], x[2, 2], frames[0]])
    r = await stub.StepBatch(batch(ids, [1, 1, 1, 0, 5, 1], rows))
    assert errors(r) == {2: "duplicate_session", 3: "non_finite", 4: "position_gap", 5: "unknown"}
    gap = next(e for e in r.errors if e.index == 4)
    assert gap.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert gap.error.expected_position == 1 and r.next_positions[4] == 1
    out = from_matrix(r.probabilities)
    assert not out[2:].any()  # failed rows are zeros
    for i, sid in ((0, "ok-a"), (1, "ok-b")):
        assert np.abs(out[i] - solo_run(model_dir, x[i, :2])[1]).max() <= TOL
        assert (await stub.GetSession(pb.SessionRef(session_id=sid))).position == 2
    # The failed entries changed nothing: ok-c is still at 1 and continues from there.
    r = await stub.StepBatch(batch(["ok-c"], [1], x[2, 1:2]))
    assert not r.errors
    assert np.abs(from_matrix(r.probabilities)[0] - solo_run(model_dir, x[2, :2])[1]).max() <= TOL


async def test_a_resent_batch_is_replayed_not_applied_twice(stub, samples):
    x = recordings(samples, 3, 2)
    ids = ["rp-0", "rp-1", "rp-2"]
    first = await stub.StepBatch(batch(ids, [0, 0, 0], x[:, 0], start=True))
    again = await stub.StepBatch(batch(ids, [0, 0, 0], x[:, 0], start=True))
    assert list(again.replayed) == [True] * 3 and list(first.replayed) == [False] * 3
    assert again.probabilities.data == first.probabilities.data
    assert list(again.next_positions) == [1, 1, 1]


async def test_batches_and_single_steps_interleave_in_order(stub, samples, model_dir):
    x = recordings(samples, 2, 4)
    await stub.StepBatch(batch(["mix-0", "mix-1"], [0, 0], x[:, 0], start=True))
    single = await stub.Step(step_request("mix-0", 1, x[0, 1:3]))
    r = await stub.StepBatch(batch(["mix-0", "mix-1"], [3, 1], np.stack([x[0, 3], x[1, 1]])))
    assert not r.errors
    assert np.abs(probs(single) - solo_run(model_dir, x[0, :3])[1:]).max() <= TOL
    out = from_matrix(r.probabilities)
    assert np.abs(out[0] - solo_run(model_dir, x[0])[3]).max() <= TOL
    assert np.abs(out[1] - solo_run(model_dir, x[1, :2])[1]).max() <= TOL


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda f: batch(["a", "b"], [0], f[:2], start=True), "bad_request"),
        (lambda f: batch(["a", "b"], [0, 0], f[:3], start=True), "bad_frames"),
        (lambda f: batch(["a"], [0], f[:1, :4], start=True), "feature_count"),
        (
            lambda f: pb.StepBatchRequest(
                session_ids=["a"],
                positions=[0],
                start=True,
                frames=pb.Matrix(rows=1, cols=6, data=b"xyz"),
            ),
            "bad_frames",
        ),
    ],
)
async def test_malformed_batches_are_refused_whole(stub, samples, make, reason):
    request = make(samples["x"][0])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StepBatch(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["seqserve-reason"] == reason
    # In a stream the same message is answered with the error on every entry; the stream goes on.
    good = batch(["after"], [0], samples["x"][0][:1], start=True, tag=9)
    call = stub.StreamBatch(iter([request, good]))
    out = [r async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    assert {e.error.reason for e in out[0].errors} == {reason}
    assert out[1].tag == 9 and not out[1].errors
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetSession(pb.SessionRef(session_id="a"))


async def test_an_empty_batch_is_an_empty_answer(stub):
    r = await stub.StepBatch(pb.StepBatchRequest(tag=3))
    assert r.tag == 3 and not r.errors and r.probabilities.rows == 0


async def test_pipelined_groups_single_steps_and_controls_keep_each_session_in_order(
    settings, samples, model_dir
):
    """Everything is admitted before anything runs (no await in between), so the scheduler sees
    groups holding sessions, a single step queued behind them and groups behind that: each
    session's frames must still be applied exactly once, in position order."""
    from seqserve.server.engine import Engine
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    spec = load_model_spec(model_dir)
    engine = Engine(spec, Runtime(spec), settings)
    engine.start()
    try:
        x = recordings(samples, 3, 12)
        ids = ["p-0", "p-1", "p-2"]
        pending = [engine.submit_batch(ids, [t] * 3, x[:, t], start=t == 0) for t in range(4)]
        single = engine.submit("p-1", 4, x[1, 4:6])  # behind four groups holding p-1
        # p-1 now has a queued single step: its entries take the per-session queue, the others
        # stay in the fast lane.
        pending += [
            engine.submit_batch(ids, [t, t + 2, t], np.stack([x[0, t], x[1, t + 2], x[2, t]]))
            for t in range(4, 8)
        ]
        results = [await f for f in pending]
        assert all(not r.errors for r in results)
        assert (await single).next_position == 6
        got = np.stack([r.probabilities for r in results], axis=1)  # [3, 8, C]
        assert np.abs(got[0] - solo_run(model_dir, x[0, :8])).max() <= TOL
        p1 = solo_run(model_dir, x[1, :10])
        assert np.abs(got[1] - np.concatenate([p1[:4], p1[6:10]])).max() <= TOL
        assert np.abs(got[2] - solo_run(model_dir, x[2, :8])).max() <= TOL
        assert [engine.get(i).position for i in ids] == [8, 10, 8]
        assert all(s.holds == 0 and not s.scheduled for s in engine.table)
    finally:
        await engine.stop()


async def test_the_client_steps_many_sessions_in_one_call(server, samples, model_dir):
    """``step_batch``: columnar in, columnar out; a bad entry is reported, not raised."""
    from seqserve.client import AsyncClient, PositionConflict

    x = recordings(samples, 5, 3)
    ids = [f"cb-{i}" for i in range(5)]
    async with AsyncClient(f"127.0.0.1:{server[1]}") as client:
        first = await client.step_batch(ids, x[:, 0], [0] * 5, start=True)
        assert first.ok and list(first.next_positions) == [1] * 5
        second = await client.step_batch(ids, x[:, 1], [1, 1, 1, 1, 7])
        assert list(second.errors) == [4] and isinstance(second.errors[4], PositionConflict)
        assert second.errors[4].position == 1
        with pytest.raises(PositionConflict):
            second.raise_for_errors()
        with pytest.raises(ValueError, match="one of each per entry"):
            await client.step_batch(ids, x[:, 2], [2] * 4)
    got = np.stack([first.probabilities, second.probabilities], axis=1)
    for i in range(4):
        assert np.abs(got[i] - solo_run(model_dir, x[i, :2])).max() <= TOL
    assert not second.probabilities[4].any()
