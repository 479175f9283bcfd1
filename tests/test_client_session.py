"""The client against the real in-process server: sessions, multiplexing, pipelining, predict,
errors, and the sync client."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import solo_run

from seqserve.client import (
    AsyncClient,
    Client,
    InvalidInput,
    SessionExists,
    SessionLost,
    SessionNotFound,
)

TOL = 1e-5
WAIT = 20.0  # bound on every wait


def _x(samples: dict[str, np.ndarray], i: int) -> np.ndarray:
    return samples["x"][i][: samples["lengths"][i]]


@pytest.fixture
async def client(server):
    async with AsyncClient(f"127.0.0.1:{server[1]}", timeout=WAIT, token="t0k") as c:
        yield c


async def test_one_session_frame_by_frame_equals_solo_run(client, samples, model_dir):
    x = _x(samples, 0)
    model = await client.model()
    async with client.session() as s:
        preds = [await s.send(frame) for frame in x]
    out = np.concatenate([p.probabilities for p in preds])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL
    assert [p.position for p in preds] == list(range(len(x)))
    last = preds[-1]
    assert last.label == model.labels[last.top_class]
    assert last.confidence == pytest.approx(float(out[-1].max()))
    assert last.next_position == len(x) and last.latency > 0 and not last.replayed


async def test_pipelined_sends_keep_order_and_outputs(client, samples, model_dir):
    x = _x(samples, 1)
    async with client.session() as s:
        futures = [s.send_nowait(frame) for frame in x]
        assert s.position == len(x)
        preds = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        info = await client.get_session(s.id)
    assert [p.position for p in preds] == list(range(len(x)))
    out = np.concatenate([p.probabilities for p in preds])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL
    assert info.position == len(x)


async def test_long_send_is_cut_to_the_window_and_reassembled(server, samples, model_dir):
    x = np.concatenate([_x(samples, 2), _x(samples, 3)])  # longer than the window
    async with (
        AsyncClient(f"127.0.0.1:{server[1]}", timeout=WAIT, window=16) as c,
        c.session() as s,
    ):
        head = await s.send(x[:7])
        rest = await s.send(x[7:])
    assert (head.position, head.frames, rest.position, rest.frames) == (0, 7, 7, len(x) - 7)
    out = np.concatenate([head.probabilities, rest.probabilities])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL


async def test_many_sessions_share_one_stream(client, samples, model_dir):
    n, steps = 12, 30
    xs = [_x(samples, i % len(samples["x"]))[:steps] + 0.01 * i for i in range(n)]
    sessions = [await client.open_session(f"user-{i}") for i in range(n)]

    async def feed(i: int) -> np.ndarray:
        preds = [await sessions[i].send(frame) for frame in xs[i]]
        return np.concatenate([p.probabilities for p in preds])

    outs = await asyncio.wait_for(asyncio.gather(*(feed(i) for i in range(n))), WAIT)
    for i in range(n):
        assert np.abs(outs[i] - solo_run(model_dir, xs[i])).max() <= TOL
    assert client.multiplexer.reconnects == 0
    for s in sessions:
        await s.close()
    with pytest.raises(SessionNotFound) as info:
        await client.get_session("user-0")
    assert info.value.reason == "closed"


async def test_end_closes_the_session(client, samples):
    x = _x(samples, 0)[:5]
    s = await client.open_session()
    p = await s.send(x, end=True)
    assert p.frames == 5
    with pytest.raises(SessionLost):
        s.send_nowait(x[0])
    with pytest.raises(SessionNotFound) as info:
        await client.get_session(s.id)
    assert (info.value.reason, info.value.position) == ("closed", 5)
    await s.close()  # no-op once ended


async def test_batch_predict_matches_streaming(client, samples, model_dir):
    xs = [_x(samples, i) for i in range(len(samples["x"]))]
    results = await client.predict(xs, per_step=True)
    assert len(results) == len(xs)
    for x, r in zip(xs, results, strict=True):
        solo = solo_run(model_dir, x)
        assert r.per_step is not None and r.per_step.shape == solo.shape
        assert np.abs(r.per_step - solo).max() <= TOL
        assert np.abs(r.probabilities - solo[-1]).max() <= TOL
        assert r.top_class == int(solo[-1].argmax())
    padded = await client.predict(samples["x"], samples["lengths"])
    assert [p.label for p in padded] == [r.label for r in results]
    assert padded[0].per_step is None


async def test_errors_are_clear(client, samples):
    model = await client.model()
    async with client.session("dup") as s:
        with pytest.raises(InvalidInput, match=f"expects {model.features}"):
            s.send_nowait(np.zeros(model.features + 1))
        with pytest.raises(InvalidInput, match="NaN"):
            await s.send(np.full(model.features, np.nan))
        with pytest.raises(SessionExists):
            await client.open_session("dup")
        await s.send(_x(samples, 0)[:3])  # still usable after rejected input
    with pytest.raises(SessionNotFound) as info:
        await client.get_session("never-was")
    assert info.value.reason == "unknown" and "\n" not in str(info.value)
    with pytest.raises(InvalidInput):
        await client.predict([np.zeros((4, model.features + 2))])


async def test_expired_session_raises_session_lost(start_server, samples):
    app, port = await start_server(session_idle_timeout=0.3)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as c:
        s = await c.open_session()
        await s.send(_x(samples, 0)[:4])
        for _ in range(200):  # until the server's sweep took it (however loaded the machine)
            if not len(app.engine.table):
                break
            await asyncio.sleep(0.05)
        assert not len(app.engine.table)
        with pytest.raises(SessionLost) as info:
            await asyncio.wait_for(s.send(_x(samples, 0)[4]), WAIT)
        assert info.value.reason == "expired" and info.value.position == 4
        assert "expired" in str(info.value)
        with pytest.raises(SessionLost):  # the session stays lost, at once
            s.send_nowait(_x(samples, 0)[5])
        await s.close()


async def test_resume_an_existing_session_by_id(client, samples, model_dir):
    x = _x(samples, 1)
    s = await client.open_session("handoff")
    await s.send(x[:40])
    again = await client.open_session("handoff", resume=True)
    assert again.position == 40
    rest = await again.send(x[40:])
    assert rest.position == 40
    assert np.abs(rest.probabilities - solo_run(model_dir, x)[40:]).max() <= TOL
    await again.close()


async def test_sync_client_behaves_the_same(server, samples, model_dir):
    x = _x(samples, 0)

    def run() -> tuple[np.ndarray, np.ndarray, str, int]:
        with Client(f"127.0.0.1:{server[1]}", timeout=WAIT) as c:
            assert c.health() == "SERVING"
            with pytest.raises(SessionNotFound):
                c.get_session("nobody")
            with c.session() as s:
                with pytest.raises(InvalidInput):
                    s.send(np.zeros(x.shape[1] + 1))
                first = s.send(x[:10])
                futures = [s.send_nowait(frame) for frame in x[10:]]
                rest = [f.result(WAIT) for f in futures]
                position = c.get_session(s.id).position
            streamed = np.concatenate([first.probabilities, *(p.probabilities for p in rest)])
            batch = c.predict([x], per_step=True)[0]
            assert batch.per_step is not None
            return streamed, batch.per_step, c.model().name, position

    streamed, batch, name, position = await asyncio.wait_for(asyncio.to_thread(run), 60)
    solo = solo_run(model_dir, x)
    assert np.abs(streamed - solo).max() <= TOL and np.abs(batch - solo).max() <= TOL
    assert name and position == len(x)


async def test_a_rejected_send_leaves_the_session_usable(start_server, samples, model_dir):
    _, port = await start_server(max_frames_per_request=8)
    x = _x(samples, 0)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as c, c.session() as s:
        first = await s.send(x[:4])
        big = s.send_nowait(x[4:24])  # 20 frames: over the server's limit, rejected
        behind = s.send_nowait(x[24])  # pipelined behind it: cannot be applied either
        with pytest.raises(InvalidInput, match="at most 8"):
            await asyncio.wait_for(big, WAIT)
        with pytest.raises(InvalidInput, match="not applied"):
            await asyncio.wait_for(behind, WAIT)
        assert s.position == 4  # rewound: the next send continues where the session is
        rest = [await s.send(frame) for frame in x[4:10]]
        assert (await c.get_session(s.id)).position == 10
    out = np.concatenate([first.probabilities, *(p.probabilities for p in rest)])
    assert np.abs(out - solo_run(model_dir, x[:10])).max() <= TOL


async def test_sessions_on_a_stream_of_their_own(client, samples, model_dir):
    x = _x(samples, 2)[:20]
    extra = client.stream()
    async with client.session(stream=extra) as mine, client.session() as shared:
        a = await asyncio.wait_for(asyncio.gather(*(mine.send_nowait(f) for f in x)), WAIT)
        b = await asyncio.wait_for(asyncio.gather(*(shared.send_nowait(f) for f in x)), WAIT)
    solo = solo_run(model_dir, x)
    for preds in (a, b):
        assert np.abs(np.concatenate([p.probabilities for p in preds]) - solo).max() <= TOL
    assert extra is not client.multiplexer and extra.pending == 0


async def test_session_window_follows_the_server_replay_window(start_server, samples):
    from seqserve.client import AsyncClient

    _, port = await start_server(replay_window=8)
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        assert (await client.model()).replay_window == 8
        async with client.session() as session:
            assert session._window == 8
            futures = [session.send_nowait(frame) for frame in samples["x"][0][:40]]
            results = [await f for f in futures]
            assert [r.position for r in results] == list(range(40))
