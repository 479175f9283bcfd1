"""The ``seqserve-route`` header as it arrives at a real server: unary session calls route by
session id, a stream by its own key (kept across reconnects) which the sessions opened on it
share, and calls about no session carry none.

A small gRPC relay in front of an in-process seqserve records each call's method and metadata
and forwards the bytes unchanged, so the calls also really work (a session opened with the
stream's key is the one the stream then steps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from test_client_resume import Proxy

from seqserve.client import ROUTE_HEADER, AsyncClient, Backoff, Client, InvalidInput

SERVICE = "/seqserve.v1.SeqServe/"
FAST = Backoff(initial=0.05, maximum=0.5, max_elapsed=15.0)


class Recorder(grpc.GenericRpcHandler):
    """Forwards every call to ``upstream`` as raw bytes; keeps ``(method, metadata)`` of each."""

    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self.upstream = upstream
        self.calls: list[tuple[str, dict[str, str]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        metadata = {m.key: m.value for m in details.invocation_metadata}  # type: ignore[attr-defined]
        self.calls.append((method.rsplit("/", 1)[1], metadata))
        if method == SERVICE + "Stream":
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method: str) -> Callable[..., Any]:
        forward = self.upstream.unary_unary(method)

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await forward(request)
            except grpc.aio.AioRpcError as exc:
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                await context.abort(exc.code(), exc.details() or "")
                raise  # abort raises; this line only satisfies the type checker

        return call

    def _stream(self, method: str) -> Callable[..., Any]:
        forward = self.upstream.stream_stream(method)

        async def call(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            upstream = forward(requests)
            async for response in upstream:
                yield response

        return call

    def routes(self, rpc: str) -> list[str | None]:
        """The route header of every recorded call of ``rpc``, in order (None: no header)."""
        return [md.get(ROUTE_HEADER) for name, md in self.calls if name == rpc]


@pytest.fixture
async def relay(server: tuple[Any, int]) -> AsyncIterator[tuple[Recorder, int]]:
    """``(recorder, port)``: a recording gRPC relay to the in-process server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as upstream:
        recorder = Recorder(upstream)
        relay_server = grpc.aio.server()
        relay_server.add_generic_rpc_handlers((recorder,))
        port = relay_server.add_insecure_port("127.0.0.1:0")
        await relay_server.start()
        try:
            yield recorder, port
        finally:
            await relay_server.stop(0)


def _frames(n: int, features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)


async def test_unary_session_calls_route_by_session_id(relay):
    recorder, port = relay
    async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
        model = await client.model()
        first = await client.step("unary-1", _frames(3, model.features), position=0)
        second = await client.step("unary-1", _frames(2, model.features, 1), position=3)
        assert (first.frames, second.position, second.next_position) == (3, 3, 5)
        assert (await client.get_session("unary-1")).position == 5
        assert (await client.reset_session("unary-1")).position == 0
        await client.step("unary-1", _frames(1, model.features), position=0)
        await client.close_session("unary-1")
    for rpc, count in (("Step", 3), ("GetSession", 1), ("ResetSession", 1), ("CloseSession", 1)):
        assert recorder.routes(rpc) == ["unary-1"] * count, rpc


async def test_calls_about_no_session_carry_no_route(relay):
    recorder, port = relay
    async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
        model = await client.model()
        await client.predict([_frames(4, model.features)])
        assert await client.health() == "SERVING"
    assert recorder.routes("GetModel") == [None]
    assert recorder.routes("Predict") == [None]
    assert recorder.routes("Check") == [None]


async def test_sessions_on_a_stream_share_its_route(relay):
    recorder, port = relay
    async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
        model = await client.model()
        route = client.multiplexer.route
        sessions = [await client.open_session(f"mux-{i}") for i in range(3)]
        sessions.append(await client.open_session())  # the server picks the id
        await asyncio.gather(*(s.send(_frames(2, model.features)) for s in sessions))
        # a session this client opened on the stream is looked up where the stream goes
        assert (await client.get_session("mux-0")).position == 2
        assert (await client.get_session("mux-0", route="mux-0")).position == 2  # one server
        # named by its model (it was opened naming none): still the stream's session
        assert (await client.get_session("mux-0", model=model.name)).position == 2
        resumed = await client.open_session("mux-1", resume=True)
        assert resumed.position == 2 and resumed.stream is client.multiplexer
        for s in sessions:
            await s.close()
    assert len(route) == 32
    assert recorder.routes("OpenSession") == [route] * 4
    assert recorder.routes("Stream") == [route]
    assert recorder.routes("GetSession") == [route, "mux-0", route, route]
    assert recorder.routes("CloseSession") == [route] * 4


async def test_each_stream_has_its_own_key_or_the_one_given(relay):
    recorder, port = relay
    async with AsyncClient(f"127.0.0.1:{port}", timeout=10, route="tenant-7") as client:
        model = await client.model()
        other, pinned = client.stream(), client.stream(route="pinned-key")
        assert client.multiplexer.route == "tenant-7"
        assert len({client.multiplexer.route, other.route, pinned.route}) == 3
        for i, stream in enumerate((client.multiplexer, other, pinned)):
            async with client.session(f"s-{i}", stream=stream) as s:
                await s.send(_frames(1, model.features))
        with pytest.raises(ValueError, match="route key"):
            client.stream(route="bad key\n")
        with pytest.raises(ValueError, match="route key"):
            await client.get_session("s-0", route="")
    expected = ["tenant-7", other.route, "pinned-key"]
    assert recorder.routes("OpenSession") == expected
    assert recorder.routes("Stream") == expected
    assert recorder.routes("CloseSession") == expected


async def test_a_resumed_stream_keeps_its_route(relay):
    """Cut the connection under a stream: the call opened to resume carries the same key, so a
    hashing proxy resumes it on the same replica."""
    recorder, port = relay
    cutter = Proxy(port)
    cut_port = await cutter.start()
    try:
        async with AsyncClient(f"127.0.0.1:{cut_port}", timeout=10, retry=FAST) as client:
            model = await client.model()
            async with client.session("cut-1") as s:
                await s.send(_frames(2, model.features))
                for round_ in range(2):
                    cutter.cut()
                    p = await s.send(_frames(1, model.features, round_), timeout=20)
                    assert p.position == 2 + round_
            assert client.multiplexer.reconnects >= 2
            route = client.multiplexer.route
    finally:
        await cutter.stop()
    streams = recorder.routes("Stream")
    assert len(streams) >= 3 and set(streams) == {route}


async def test_sync_client_routes_the_same_way(relay):
    recorder, port = relay

    def run() -> None:
        with Client(f"127.0.0.1:{port}", timeout=10, route="sync-route") as client:
            features = client.model().features
            with client.session("sync-1") as s:
                s.send(_frames(1, features))
            assert client.step("sync-2", _frames(2, features), position=0).frames == 2
            assert client.get_session("sync-2").position == 2
            client.close_session("sync-2")

    await asyncio.to_thread(run)
    assert recorder.routes("OpenSession") == ["sync-route"]
    assert recorder.routes("Stream") == ["sync-route"]
    assert recorder.routes("CloseSession") == ["sync-route", "sync-2"]
    assert recorder.routes("Step") == ["sync-2"]
    assert recorder.routes("GetSession") == ["sync-2"]


async def test_an_id_that_cannot_be_a_header_still_reaches_a_server(relay):
    """Such an id goes without a route and is refused by the server with its usual error, not
    by grpc on the client."""
    recorder, port = relay
    async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
        with pytest.raises(InvalidInput) as caught:
            await client.get_session("naïve id")
    assert caught.value.reason == "bad_session_id"
    assert recorder.routes("GetSession") == [None]
