"""Streaming semantics through a real server: parity, chunking, multiplexing, isolation."""

from __future__ import annotations

import asyncio
import functools
import itertools

import grpc
import numpy as np
from helpers import metric, probs, solo_run, step_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

TOL = 1e-5
_CHUNK_IDS = itertools.count()


async def _stream_frames(stub, session_id: str, frames: np.ndarray, chunks: list[int]):
    """Send ``frames`` in chunks of the given sizes over one stream; per-frame outputs."""
    requests, position = [], 0
    for size in chunks:
        requests.append(
            step_request(
                session_id, position, frames[position : position + size], start=position == 0
            )
        )
        position += size
    call = stub.Stream(iter(requests))
    rows = [probs(r) async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    return np.concatenate(rows)


async def test_stream_matches_keras_reference_frame_by_frame(stub, reference, model_dir):
    for i, (x, n) in enumerate(zip(reference["x"], reference["lengths"], strict=True)):
        x = x[:n]
        out = await _stream_frames(stub, f"ref-{i}", x, [1] * n)
        assert np.abs(out - reference["probabilities"][i][:n]).max() <= TOL
        assert np.abs(out - solo_run(model_dir, x)).max() <= TOL


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_any_chunking_gives_the_same_outputs(stub, samples, model_dir, data):
    x = samples["x"][0][: samples["lengths"][0]]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(x) - 1), max_size=12)))
    bounds = [0, *cuts, len(x)]
    chunks = [b - a for a, b in itertools.pairwise(bounds)]
    sid = f"chunk-{next(_CHUNK_IDS)}"  # examples share one server: never the same id twice
    out = await _stream_frames(stub, sid, x, chunks)
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL


async def test_last_frame_mode_and_response_fields(stub, samples):
    x = samples["x"][0][:10]
    r = await stub.Step(step_request("lf", 0, x, start=True, output=pb.LAST_FRAME, tag=77))
    assert (r.session_id, r.position, r.frames, r.next_position, r.tag) == ("lf", 0, 10, 10, 77)
    assert probs(r).shape == (1, 4)
    assert list(r.top_class) == [int(probs(r)[0].argmax())]
    assert not r.replayed and not r.HasField("error")


async def test_many_sessions_on_one_stream_each_equal_their_solo_run(stub, samples, model_dir):
    n_sessions, steps = 24, 30
    xs = [samples["x"][i % len(samples["x"])][:steps] + 0.01 * i for i in range(n_sessions)]
    requests = [
        step_request(f"mux-{s}", t, xs[s][t : t + 1], start=t == 0)
        for t in range(steps)
        for s in range(n_sessions)
    ]  # interleaved
    call = stub.Stream(iter(requests))
    got: dict[str, dict[int, np.ndarray]] = {}
    async for r in call:
        assert not r.HasField("error"), r.error
        got.setdefault(r.session_id, {})[r.position] = probs(r)[0]
    for s in range(n_sessions):
        out = np.stack([got[f"mux-{s}"][t] for t in range(steps)])
        assert np.abs(out - solo_run(model_dir, xs[s])).max() <= TOL


async def test_concurrent_streams_never_share_state(stub, samples, model_dir):
    steps = 40

    async def one(k: int) -> None:
        x = samples["x"][k % len(samples["x"])][:steps] * (1 + 0.05 * k)
        out = await _stream_frames(stub, f"iso-{k}", x, [1] * steps)
        assert np.abs(out - solo_run(model_dir, x)).max() <= TOL

    await asyncio.gather(*(one(k) for k in range(16)))


async def test_steps_are_batched_across_sessions(start_server, samples):
    app, port = await start_server(max_wait_ms=5.0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SeqServeStub(channel)
    n_sessions = 64
    requests = [
        step_request(f"b-{s}", t, samples["x"][0][t : t + 1], start=t == 0)
        for t in range(5)
        for s in range(n_sessions)
    ]
    call = stub.Stream(iter(requests))
    async for r in call:
        assert not r.HasField("error")
    hist = functools.partial(metric, app.metrics.registry)
    calls = hist("seqserve_batch_size_count", {"graph": "step"})
    total = hist("seqserve_batch_size_sum", {"graph": "step"})
    assert total == n_sessions * 5
    await channel.close()
    assert calls <= total / 4, "steps of different sessions should share onnxruntime calls"


async def test_a_batch_never_holds_two_steps_of_one_session(server, stub, samples):
    app, _ = server
    runtime = app.engine.runtime
    seen: list[list[int]] = []
    real_step = runtime.step

    def spy(frames, states, positions=None):
        seen.append([int(v) for v in frames[:, 0].view(np.int32)])
        return real_step(frames, states, positions)

    runtime.step = spy
    # Frame value encodes (session, step) so each batch row can be traced back to its session.
    requests = []
    for t in range(20):
        for s in range(8):
            frame = np.zeros((1, 6), np.float32)
            frame[0, 0] = np.array([s * 1000 + t], np.int32).view(np.float32)[0]
            requests.append(step_request(f"one-{s}", t, frame, start=t == 0))
    call = stub.Stream(iter(requests))
    order: dict[str, list[int]] = {}
    async for r in call:
        assert not r.HasField("error")
        order.setdefault(r.session_id, []).append(r.position)
    assert sum(len(b) for b in seen) == 160
    for batch in seen:
        sessions = [v // 1000 for v in batch]
        assert len(sessions) == len(set(sessions))
    for s in range(8):
        steps = [v % 1000 for batch in seen for v in batch if v // 1000 == s]
        assert steps == list(range(20)), "per-session order must be preserved"
        assert order[f"one-{s}"] == list(range(20))


async def test_predict_variable_lengths_matches_in_process(stub, samples, model_dir):
    lengths = [5, 17, 1, 100, 17, 42]
    xs = [samples["x"][i % len(samples["x"])][:n] for i, n in enumerate(lengths)]
    from seqserve.proto.codec import from_matrix, to_matrix

    r = await stub.Predict(
        pb.PredictRequest(sequences=[pb.Sequence(frames=to_matrix(x)) for x in xs], per_step=True)
    )
    assert len(r.predictions) == len(xs)
    for x, p in zip(xs, r.predictions, strict=True):
        expected = solo_run(model_dir, x)
        assert np.abs(from_matrix(p.per_step) - expected).max() <= TOL
        assert np.abs(from_matrix(p.probabilities)[0] - expected[-1]).max() <= TOL
        assert p.top_class == int(expected[-1].argmax())


async def test_model_metadata(stub, model_dir):
    import json

    meta = json.loads((model_dir / "model.json").read_text())
    info = await stub.GetModel(pb.ModelRequest())
    assert info.features == meta["features"] == 6
    assert list(info.labels) == meta["labels"]
    assert [(s.name, s.size) for s in info.states] == [
        (s["name"], s["size"]) for s in meta["states"]
    ]
    assert [s.size for s in info.states] == [64, 64, 128, 128, 64, 64]
    assert info.state_bytes == 4 * sum(s.size for s in info.states)
    assert info.parameters == meta["parameters"] > 0


async def test_long_requests_run_off_the_event_loop(server, stub, samples):
    import threading

    app, _ = server
    runtime = app.engine.runtime
    threads: dict[str, str] = {}
    real_step, real_sequence = runtime.step, runtime.sequence

    def step(frames, states, positions=None):
        threads["step"] = threading.current_thread().name
        return real_step(frames, states, positions)

    def sequence(frames, states, positions=None):
        threads["sequence"] = threading.current_thread().name
        return real_sequence(frames, states, positions)

    runtime.step, runtime.sequence = step, sequence
    x = samples["x"][0]
    await stub.Step(step_request("inline", 0, x[:1], start=True))
    await stub.Step(step_request("inline", 1, x[1:100]))
    assert threads["step"] == threading.current_thread().name  # one step: inline on the loop
    assert threads["sequence"].startswith("seqserve-infer")  # 99 frames: the worker thread
