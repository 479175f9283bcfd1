"""Resume: dropped connections and server restarts are invisible to the caller (no step lost,
none applied twice, outputs identical to an uninterrupted run); a session truly gone is an
error."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest
from helpers import solo_run

from seqserve.client import AsyncClient, Backoff, SessionLost, Unavailable

TOL = 1e-5
WAIT = 30.0
FAST = Backoff(initial=0.05, maximum=0.5, max_elapsed=15.0)


class Proxy:
    """A TCP relay in front of the server whose connections can be cut at will."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every open connection at once (RST), as a network failure would."""
        self.cuts += 1
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


def _x(samples: dict[str, np.ndarray], i: int) -> np.ndarray:
    return samples["x"][i][: samples["lengths"][i]]


async def _until(condition, what: str, timeout: float = WAIT) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_resume_across_dropped_connections(server, samples, model_dir):
    _, port = server
    proxy = Proxy(port)
    await proxy.start()
    xs = [_x(samples, i) for i in range(3)]

    async def feed(session, x):  # paced, so every cut finds requests in flight
        futures = []
        for frame in x:
            futures.append(session.send_nowait(frame))
            await asyncio.sleep(0.002)
        return await asyncio.gather(*futures)

    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=WAIT, retry=FAST) as c:
            sessions = [await c.open_session() for _ in xs]
            feeding = asyncio.gather(*(feed(s, x) for s, x in zip(sessions, xs, strict=True)))
            for mark in (15, 45, 80):  # cut while requests are in flight
                await _until(lambda m=mark: sessions[0].acknowledged >= m, f"ack {mark}")
                proxy.cut()
            preds = await asyncio.wait_for(feeding, WAIT)
            positions = [(await c.get_session(s.id)).position for s in sessions]
            reconnects = c.multiplexer.reconnects
    finally:
        await proxy.stop()
    for x, got, position in zip(xs, preds, positions, strict=True):
        assert [p.position for p in got] == list(range(len(x)))  # none lost
        assert position == len(x)  # none applied twice
        out = np.concatenate([p.probabilities for p in got])
        assert np.abs(out - solo_run(model_dir, x)).max() <= TOL
    assert reconnects >= 3


class CoreErrorRelay:
    """A gRPC relay in front of the server (bytes in, bytes out). Its first Stream call ends,
    after ``answers`` responses and with requests still in flight, the way grpc-python's asyncio
    client reports a write that raced the server's end of the stream (grpc/grpc#36066): INTERNAL
    "Internal error from Core", no trailers. Every other call is passed through."""

    def __init__(self, upstream: int, answers: int) -> None:
        self.upstream = upstream
        self.answers = answers
        self.streams = 0
        self.failed = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.upstream}")
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([self])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        assert self._channel is not None
        if method.endswith("/Stream"):
            upstream = self._channel.stream_stream(method)

            async def stream(requests, context: grpc.aio.ServicerContext):
                async for response in self._stream(upstream, requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream)
        forward = self._channel.unary_unary(method)

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await forward(request, metadata=context.invocation_metadata())

        return grpc.unary_unary_rpc_method_handler(unary)

    async def _stream(self, upstream, requests, context):
        self.streams += 1
        call = upstream(requests, metadata=context.invocation_metadata())
        passed = 0
        async for response in call:
            if self.streams == 1 and passed == self.answers:
                call.cancel()
                self.failed += 1
                await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
            passed += 1
            yield response


async def test_internal_error_from_core_is_a_dropped_connection_and_resumes(
    server, samples, model_dir
):
    """grpc/grpc#36066: an asyncio client writing on a stream while the server ends it may see
    INTERNAL "Internal error from Core" instead of the server's status. The client library
    takes it for a dropped connection: it resumes, resends what was not answered, and the
    outputs are those of an uninterrupted run."""
    relay = CoreErrorRelay(server[1], answers=5)
    await relay.start()
    x = _x(samples, 2)[:40]
    try:
        async with AsyncClient(f"127.0.0.1:{relay.port}", timeout=WAIT, retry=FAST) as c:
            s = await c.open_session()
            futures = []
            for frame in x:  # paced and pipelined: requests are in flight at the error
                futures.append(s.send_nowait(frame))
                await asyncio.sleep(0.002)
            preds = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
            position = (await c.get_session(s.id)).position
            reconnects, resent = c.multiplexer.reconnects, c.multiplexer.resent
    finally:
        await relay.stop()
    assert relay.failed == 1 and relay.streams >= 2
    assert reconnects >= 1 and resent >= 1
    assert position == len(x)  # none applied twice
    out = np.concatenate([p.probabilities for p in preds])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL


async def test_resume_across_a_server_restart(start_server, samples, model_dir):
    app, port = await start_server()
    x = np.concatenate([_x(samples, 0), _x(samples, 1)])
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT, retry=FAST) as c:
        s = await c.open_session("survivor")
        early = [await s.send(frame) for frame in x[:20]]
        futures = [s.send_nowait(frame) for frame in x[20:120]]
        await _until(lambda: s.acknowledged >= 40, "some acknowledgements")
        await app.stop()  # drains, answers what it accepted, snapshots, ends the stream
        more = [s.send_nowait(frame) for frame in x[120:]]  # sent while the server is down
        await asyncio.sleep(0.3)
        await start_server(port=port)  # restores the snapshot
        late = await asyncio.wait_for(asyncio.gather(*futures, *more), WAIT)
        position = (await c.get_session(s.id)).position
        reconnects = c.multiplexer.reconnects
        await s.close()
    preds = early + list(late)
    assert [p.position for p in preds] == list(range(len(x)))
    assert position == len(x)
    out = np.concatenate([p.probabilities for p in preds])
    assert np.abs(out - solo_run(model_dir, x)).max() <= TOL
    assert reconnects >= 1


async def test_session_lost_when_the_server_forgets_it(start_server, samples):
    app, port = await start_server(snapshot_path="")  # restart without snapshot
    x = _x(samples, 0)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT, retry=FAST) as c:
        s = await c.open_session("forgotten")
        await s.send(x[:10])
        await app.stop()
        await start_server(port=port, snapshot_path="")
        with pytest.raises(SessionLost) as info:
            await asyncio.wait_for(s.send(x[10]), WAIT)
        assert info.value.reason == "unknown" and info.value.session_id == "forgotten"
        assert "forgotten" in str(info.value)
        fresh = await c.open_session()  # the client itself is fine
        assert (await fresh.send(x[:3])).frames == 3
        await fresh.close()


async def test_gives_up_after_the_retry_budget(start_server, samples):
    app, port = await start_server()
    x = _x(samples, 0)
    budget = Backoff(initial=0.05, maximum=0.1, max_elapsed=0.5)
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT, retry=budget) as c:
        s = await c.open_session()
        await s.send(x[:5])
        await app.stop()
        with pytest.raises(Unavailable, match="could not resume"):
            await asyncio.wait_for(s.send(x[5]), WAIT)


async def test_unreachable_server_fails_fast():
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AsyncClient(f"127.0.0.1:{port}", timeout=WAIT) as c:
        with pytest.raises(Unavailable, match="cannot reach"):
            await asyncio.wait_for(c.model(), 10)
