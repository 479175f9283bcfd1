"""Window serving: a model trained on fixed windows of T frames is answered as it was trained.

Every answer of every session equals Keras's ``predict`` on that session's last T frames (before
the T-th frame: on the frames so far), within 1e-5, however the frames are chunked into requests,
through Stream, StepBatch and Predict, for the seed architecture (T = 5, 126 features) and the
tutorial's T = 30, converted from .keras and from .h5; a restart (drain, snapshot) and a takeover
by another replica through Redis keep window sessions exact; ``--serving-mode stateful`` serves
the same model as a stateful stream instead, and the two answers differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from cluster import Redis
from helpers import probs, solo_run, step_request
from window_models import LONG_WINDOW, SEED_WINDOW, window_predict

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import from_matrix, to_matrix

pytest_plugins = ["window_models"]
pytestmark = pytest.mark.export  # the fixtures convert Keras models (TensorFlow)

TOL = 1e-5


def _streams(count: int, frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, frames, 126)).astype(np.float32)


async def _serve(start_server: Callable[..., Any], directory: Any, **overrides: Any):
    app, port = await start_server(model_dir=str(directory), **overrides)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return app, channel, pb_grpc.SeqServeStub(channel)


async def _stream_chunks(
    stub: pb_grpc.SeqServeStub, ids: list[str], x: np.ndarray, chunks: list[list[int]], start: int
) -> list[np.ndarray]:
    """Each session's frames ``x[i]`` from position ``start`` in the given chunk sizes, the
    sessions interleaved on one stream; the answers per session."""
    requests = []
    for round_ in range(max(len(c) for c in chunks)):
        for i, sid in enumerate(ids):
            if round_ >= len(chunks[i]):
                continue
            at = start + sum(chunks[i][:round_])
            size = chunks[i][round_]
            requests.append(step_request(sid, at, x[i][at : at + size], start=at == 0))
    answers: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
    async for response in stub.Stream(iter(requests)):
        assert not response.HasField("error"), response.error
        answers[response.session_id].append(probs(response))
    return [np.concatenate(answers[sid]) for sid in ids]


def _chunking(rng: np.random.Generator, frames: int) -> list[int]:
    cuts = sorted(rng.choice(np.arange(1, frames), size=min(6, frames - 1), replace=False))
    return [b - a for a, b in zip([0, *cuts], [*cuts, frames], strict=True)]


@pytest.mark.parametrize("window", [SEED_WINDOW, LONG_WINDOW])
@pytest.mark.parametrize("source", ["keras", "h5"])
async def test_every_answer_is_keras_on_the_window(start_server, window_models, window, source):
    model = window_models[window]
    directory = model.directory if source == "keras" else model.h5_directory
    _app, channel, stub = await _serve(start_server, directory)
    async with channel:
        info = await stub.GetModel(pb.ModelRequest())
        assert (info.serving_mode, info.window) == ("window", window)
        assert info.features == 126 and [s.size for s in info.states] == [64, 64, 128, 128, 64, 64]
        assert info.state_bytes == 4 * window * 512  # the T staggered copies of 512 floats
        frames = 2 * window + 3
        x = _streams(3, frames, seed=window)
        expected = window_predict(model.model, x, window)
        # One frame per request, then random chunks, on one multiplexed stream.
        rng = np.random.default_rng(7)
        one = await _stream_chunks(stub, ["a0", "a1", "a2"], x, [[1] * frames] * 3, 0)
        chunked = await _stream_chunks(
            stub, ["b0", "b1", "b2"], x, [_chunking(rng, frames) for _ in range(3)], 0
        )
        for i in range(3):
            assert np.abs(one[i] - expected[i]).max() <= TOL
            assert np.abs(chunked[i] - expected[i]).max() <= TOL
        # StepBatch: the same streams, one frame for each session per message.
        got = np.zeros_like(expected)
        ids = ["c0", "c1", "c2"]
        for t in range(frames):
            response = await stub.StepBatch(
                pb.StepBatchRequest(
                    session_ids=ids, positions=[t] * 3, frames=to_matrix(x[:, t]), start=t == 0
                )
            )
            assert not response.errors
            got[:, t] = from_matrix(response.probabilities)
        assert np.abs(got - expected).max() <= TOL
        # Predict: every step of whole sequences is its window answer too.
        predicted = await stub.Predict(
            pb.PredictRequest(
                sequences=[pb.Sequence(frames=to_matrix(s)) for s in x], per_step=True
            )
        )
        for i, p in enumerate(predicted.predictions):
            assert np.abs(from_matrix(p.per_step) - expected[i]).max() <= TOL


async def test_stateful_mode_serves_the_same_model_as_a_stream(
    start_server, window_models, model_dir
):
    model = window_models[SEED_WINDOW]
    _app, channel, stub = await _serve(start_server, model.directory, serving_mode="stateful")
    async with channel:
        info = await stub.GetModel(pb.ModelRequest())
        assert (info.serving_mode, info.window) == ("stateful", SEED_WINDOW)
        x = _streams(1, 20, seed=3)
        (got,) = await _stream_chunks(stub, ["s"], x, [[1] * 20], 0)
    stream = solo_run(model.directory, x[0])
    window = window_predict(model.model, x, SEED_WINDOW)[0]
    assert np.abs(got - stream).max() <= TOL
    # The two modes answer different questions once the window is full.
    assert np.abs(got[:SEED_WINDOW] - window[:SEED_WINDOW]).max() <= TOL
    assert np.abs(got[SEED_WINDOW:] - window[SEED_WINDOW:]).max() > 0.05


async def test_a_restart_keeps_window_sessions_exact(start_server, window_models, tmp_path):
    model = window_models[SEED_WINDOW]
    snapshot = str(tmp_path / "window.npz")
    x = _streams(2, 17, seed=11)
    expected = window_predict(model.model, x, SEED_WINDOW)
    app, channel, stub = await _serve(start_server, model.directory, snapshot_path=snapshot)
    async with channel:
        first = await _stream_chunks(stub, ["r0", "r1"], x[:, :9], [[4, 5], [1] * 9], 0)
    await app.stop()  # drain and snapshot
    app, channel, stub = await _serve(start_server, model.directory, snapshot_path=snapshot)
    async with channel:
        rest = await _stream_chunks(stub, ["r0", "r1"], x, [[8], [3, 5]], 9)
        again = await stub.Step(step_request("r0", 7, x[0][7:9]))  # replayed across the restart
    assert again.replayed and np.abs(probs(again) - expected[0][7:9]).max() <= TOL
    for i in range(2):
        whole = np.concatenate([first[i], rest[i]])
        assert np.abs(whole - expected[i]).max() <= TOL


async def test_another_replica_takes_a_window_session_over_exactly(
    start_server, window_models, tmp_path
):
    model = window_models[SEED_WINDOW]
    redis = Redis("redis", tmp_path / "redis.log")
    redis.start(tmp_path / "redis")
    try:
        x = _streams(1, 14, seed=5)
        expected = window_predict(model.model, x, SEED_WINDOW)[0]
        common = {"store": redis.url, "snapshot_path": ""}
        _, a_channel, a = await _serve(start_server, model.directory, replica_id="a", **common)
        _, b_channel, b = await _serve(start_server, model.directory, replica_id="b", **common)
        async with a_channel, b_channel:
            out = [
                probs(await a.Step(step_request("w", t, x[0][t : t + 1], start=t == 0)))
                for t in range(6)
            ]
            out.append(probs(await b.Step(step_request("w", 6, x[0][6:11]))))  # b claims it
            out.append(probs(await a.Step(step_request("w", 11, x[0][11:14]))))  # and back
        got = np.concatenate(out)
        assert np.abs(got - expected).max() <= TOL
    finally:
        redis.kill()
