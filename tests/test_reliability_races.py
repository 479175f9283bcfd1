"""Races on one session. Cancel, expiry, close and drain in every order, each against a fresh
server and session; and two clients claiming one session id at once. Every answer is OK or a
specific error (never INTERNAL), no slot is freed twice or leaked (``bank.used`` equals the live
sessions), a bystander session's state is untouched, and what a session holds is exactly a solo
run of the frames the server accepted (which the positions in the answers make well defined)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import metric, probs, step_request

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

TOLERANCE = 1e-5
ENDED_BY = {"closed", "expired"}


@pytest.fixture(scope="module")
def runtime(model_dir: Path):
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    return Runtime(load_model_spec(model_dir))


def _solo(runtime, frames: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-frame outputs and final states of one sequence from zero state."""
    out, states = runtime.sequence(frames[None].astype(np.float32), runtime.zero_states(1))
    return np.asarray(out[0]), [np.asarray(s[0]) for s in states]


def _check_state(app, runtime, session_id: str, frames: np.ndarray) -> None:
    """The live session's position and recurrent state are a solo run of ``frames``."""
    session = app.engine.table.find(session_id)
    assert session is not None and session.position == len(frames)
    held = app.engine.bank.gather(np.array([session.slot]))
    _, want = _solo(runtime, frames)
    for got, expected in zip(held, want, strict=True):
        assert np.abs(got[0] - expected).max() <= TOLERANCE


def _check_bookkeeping(app, created: int) -> None:
    table, bank = app.engine.table, app.engine.bank
    assert bank.used == len(table), "a slot was freed twice or leaked"

    def count(event: str) -> float:
        return metric(app.metrics.registry, "seqserve_session_events_total", {"event": event})

    assert count("opened") == created
    assert count("closed") + count("expired") == created - len(table), "ended twice"


async def _read_all(call) -> tuple[list[pb.StepResponse], grpc.StatusCode]:
    responses = []
    try:
        while (response := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
            responses.append(response)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    return responses, await asyncio.wait_for(call.code(), 10)


ACTIONS = ("cancel", "expire", "close", "drain")


@pytest.mark.parametrize("order", list(itertools.permutations(ACTIONS)), ids="-".join)
@pytest.mark.parametrize("together", [False, True], ids=["in-turn", "together"])
async def test_cancel_expiry_close_and_drain_race_on_one_session(
    order, together, settings, tmp_path, runtime, samples
):
    """In turn: each action completes before the next starts, while the stream's four requests
    are still in flight, so every order ends differently. Together: all four start at once, in
    that order, and interleave at their awaits."""
    from prometheus_client import CollectorRegistry

    from seqserve.server import create_server
    from seqserve.server.errors import SessionNotFound

    # No metrics HTTP endpoint: its shutdown polls for 0.5 s, 48 times over.
    app, port = create_server(
        settings.replace(snapshot_path=str(tmp_path / "s.npz"), metrics_port=-1),
        registry=CollectorRegistry(),
    )
    await app.start()
    x, xb = samples["x"][3], samples["x"][4]
    stopped = drained = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqServeStub(channel)
            await stub.Step(step_request("bystander", 0, xb[:10], start=True), timeout=10)
            first = await stub.Step(step_request("t", 0, x[:5], start=True), timeout=10)
            call = stub.Stream()
            sent = [(5, 1), (6, 3), (9, 3), (12, 1)]  # (position, frames) in flight
            for position, n in sent:
                await call.write(step_request("t", position, x[position : position + n]))
            reader = asyncio.create_task(_read_all(call))
            codes: dict[str, grpc.StatusCode] = {}

            async def cancel() -> None:
                call.cancel()

            async def expire() -> None:
                # The sweep, again and again until it takes "t" (which it skips while requests
                # of it are queued or running), as if "t" had been idle for long. The sweeper
                # stops with the server, so this does too.
                table = app.engine.table
                for _ in range(200):
                    session = table.find("t")
                    if session is None or drained:
                        return
                    session.last_used = table.clock() - 10 * app.settings.session_idle_timeout
                    if app.engine.expire():
                        return
                    await asyncio.sleep(0.002)

            async def close() -> None:
                try:
                    await stub.CloseSession(pb.SessionRef(session_id="t"), timeout=10)
                    codes["close"] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    codes["close"] = exc.code()

            async def drain() -> None:
                nonlocal stopped, drained
                stopped = True
                await asyncio.wait_for(app.stop(), 15)
                drained = True

            actions = {"cancel": cancel, "expire": expire, "close": close, "drain": drain}
            if together:
                tasks = []
                for name in order:
                    tasks.append(asyncio.create_task(actions[name]()))
                    await asyncio.sleep(0)
                await asyncio.wait_for(asyncio.gather(*tasks), 20)
            else:
                for name in order:
                    await asyncio.wait_for(actions[name](), 20)
            responses, final = await reader

        assert codes["close"] in (
            grpc.StatusCode.OK,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAVAILABLE,
        ), codes
        assert final in (
            grpc.StatusCode.OK,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.UNAVAILABLE,
        ), final
        expected, _ = _solo(runtime, x[:13])
        assert np.abs(probs(first) - expected[:5]).max() <= TOLERANCE
        applied = 5
        for response in responses:
            if response.HasField("error"):
                assert response.error.reason in ENDED_BY | {"draining"}, response.error
                assert response.error.code != grpc.StatusCode.INTERNAL.value[0]
                continue
            # Answers come back in order and cover the frames the server accepted, in turn.
            assert response.position == applied
            applied += response.frames
            rows = expected[response.position : response.position + response.frames]
            assert np.abs(probs(response) - rows).max() <= TOLERANCE
        session = app.engine.table.find("t")
        print(
            f"\n{'-'.join(order)} {together=}: close {codes['close'].name}, stream {final.name}, "
            f"answers {[(r.position, r.frames, r.error.reason or 'ok') for r in responses]}, "
            f"t {'live at ' + str(session.position) if session else 'ended'}"
        )
        if session is not None:  # nothing ended it (e.g. close refused while draining)
            assert session.position >= applied
            _check_state(app, runtime, "t", x[: session.position])
        else:
            with pytest.raises(SessionNotFound) as ended:
                app.engine.table.get("t")
            assert ended.value.reason in ENDED_BY
        _check_state(app, runtime, "bystander", xb[:10])
        _check_bookkeeping(app, created=2)
    finally:
        if not stopped:
            with contextlib.suppress(Exception):
                await app.stop()


async def test_two_clients_claiming_one_session_id(start_server, runtime, samples):
    """Both start ``dup`` at position 0 at once and go on with different frames at the same
    positions, one by unary Steps, one pipelined on a Stream. Every position is applied once,
    from whichever client got there first; the other is answered with a replay of it."""
    app, port = await start_server()
    xa, xb, xc = samples["x"][5][:40], samples["x"][6][:40], samples["x"][7][:40]
    chunk = 4

    async def by_steps(stub) -> list[tuple[int, pb.StepResponse | grpc.StatusCode]]:
        got = []
        for position in range(0, len(xa), chunk):
            try:
                response = await stub.Step(
                    step_request(
                        "dup", position, xa[position : position + chunk], start=position == 0
                    ),
                    timeout=10,
                )
                got.append((0, response))
            except grpc.aio.AioRpcError as exc:
                got.append((0, exc.code()))
            await asyncio.sleep(0)
        return got

    async def by_stream(stub) -> list[tuple[int, pb.StepResponse | grpc.StatusCode]]:
        call = stub.Stream()
        for position in range(0, len(xb), chunk):
            await call.write(
                step_request("dup", position, xb[position : position + chunk], start=position == 0)
            )
        await call.done_writing()
        responses, final = await _read_all(call)
        assert final == grpc.StatusCode.OK
        return [(1, r) for r in responses]

    async def bystander(stub) -> pb.StepResponse:
        last = None
        for position in range(0, len(xc), chunk):
            last = await stub.Step(
                step_request(
                    "third", position, xc[position : position + chunk], start=position == 0
                ),
                timeout=10,
            )
        return last

    opts = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as two,
    ):
        steps, streamed, third = await asyncio.wait_for(
            asyncio.gather(
                by_steps(pb_grpc.SeqServeStub(one)),
                by_stream(pb_grpc.SeqServeStub(two)),
                bystander(pb_grpc.SeqServeStub(one)),
            ),
            30,
        )

    sources = (xa, xb)
    applied: dict[int, np.ndarray] = {}  # position -> the frames the server applied there
    answers = []
    for client, response in steps + streamed:
        assert not isinstance(response, grpc.StatusCode), response  # no error is expected
        assert not response.HasField("error"), response.error
        answers.append(response)
        if not response.replayed:
            p = response.position
            assert p not in applied, f"position {p} applied twice"
            applied[p] = sources[client][p : p + response.frames]
    won = [sum(not r.replayed for _, r in answered) for answered in (steps, streamed)]
    print(
        f"\nclaimers: positions applied from the Step client {won[0]}, from the Stream "
        f"client {won[1]}"
    )
    assert sorted(applied) == list(range(0, 40, chunk)), "every position applied exactly once"
    accepted = np.concatenate([applied[p] for p in sorted(applied)])
    expected, _ = _solo(runtime, accepted)
    for response in answers:  # replays included: both clients see the one applied history
        rows = expected[response.position : response.position + response.frames]
        assert np.abs(probs(response) - rows).max() <= TOLERANCE
    _check_state(app, runtime, "dup", accepted)
    _check_state(app, runtime, "third", xc)
    assert np.abs(probs(third) - _solo(runtime, xc)[0][-chunk:]).max() <= TOLERANCE
    _check_bookkeeping(app, created=2)
