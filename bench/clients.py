"""The client side of every network scenario: plain grpc.aio stubs, the same code for the echo
server and for seqserve, so their figures differ only by the server.

Each driver keeps its load going through a warm-up and then a measuring window; only answers that
arrive inside the window count (round trips in ms, steps per second), and the CPU used by the
client (this process) and by the server over the window is recorded too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

from .servers import Server, cpu_seconds

__all__ = [
    "BenchError",
    "Frames",
    "Run",
    "predict_caller",
    "stream_batches",
    "stream_sessions",
    "window_predicts",
]

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class BenchError(RuntimeError):
    """The server answered something other than a result (an error entry, an early end)."""


@dataclass(frozen=True, slots=True)
class Run:
    latencies_ms: np.ndarray  # round trip of every message answered in the window
    steps: int  # frames answered in the window (a multiplexed message holds many)
    seconds: float
    client_cpu: float  # cores busy over the window (1.0 = one core)
    server_cpu: float

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


class _Window:
    """Every client sends its first message and waits until all have their first answer (streams
    open, sessions created); then ``warmup`` seconds of load, then ``seconds`` of measuring;
    ``add`` keeps the answers landing inside.

    The start line matters: a stream opened while the server is saturated by the others can
    wait many seconds for its first answer (seen with 1,024 streams), which would measure
    stream set-up under overload instead of the steady state."""

    SETUP_TIMEOUT = 120.0

    def __init__(self, clients: int, warmup: float, seconds: float) -> None:
        self.warmup = warmup
        self.seconds = seconds
        self.start = self.stop = math.inf
        self.latencies: list[float] = []
        self.steps = 0
        self._waiting = clients
        self._all_in = asyncio.Event()

    async def arrived(self) -> None:
        """A client's first answer came back: wait for everyone else's."""
        self._waiting -= 1
        if self._waiting == 0:
            self._all_in.set()
        await self._all_in.wait()

    def add(self, sent: float, done: float, steps: int) -> None:
        if self.start <= done < self.stop:
            self.latencies.append(done - sent)
            self.steps += steps

    async def measure(self, server: Server, load: Awaitable[object]) -> Run:
        task = asyncio.ensure_future(load)
        arrived = asyncio.ensure_future(self._all_in.wait())
        await asyncio.wait(
            [task, arrived], timeout=self.SETUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if not arrived.done():
            arrived.cancel()
            if task.done():  # a client failed before every client was in
                await task
            task.cancel()
            raise BenchError(
                f"{self._waiting} clients had no first answer after {self.SETUP_TIMEOUT:.0f} s"
            )
        self.start = time.perf_counter() + self.warmup
        self.stop = self.start + self.seconds
        await asyncio.sleep(self.warmup)
        cpu0 = (time.process_time(), cpu_seconds(server.pid), time.perf_counter())
        await asyncio.sleep(max(0.0, self.stop - time.perf_counter()))
        cpu1 = (time.process_time(), cpu_seconds(server.pid), time.perf_counter())
        await task
        if not self.latencies:
            raise BenchError("no answer arrived inside the measuring window")
        wall = cpu1[2] - cpu0[2]
        return Run(
            np.array(self.latencies) * 1e3,
            self.steps,
            self.stop - self.start,
            (cpu1[0] - cpu0[0]) / wall,
            (cpu1[1] - cpu0[1]) / wall,
        )


class Frames:
    """Recorded frames to send, ``[recordings, T, features]``: session i replays recording
    i % recordings in a loop. Messages are encoded once, up front, and reused."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.ascontiguousarray(x, np.float32)
        self.length = self.x.shape[1]
        self._sessions: dict[int, list[pb.Matrix]] = {}
        self._blocks: dict[int, list[pb.Matrix]] = {}
        self._windows: dict[tuple[int, int], list[pb.Matrix]] = {}

    def recording(self, i: int) -> np.ndarray:
        return self.x[i % len(self.x)]

    def session(self, i: int) -> list[pb.Matrix]:
        """One frame per message."""
        key = i % len(self.x)
        if key not in self._sessions:
            self._sessions[key] = [to_matrix(frame) for frame in self.x[key]]
        return self._sessions[key]

    def blocks(self, entries: int) -> list[pb.Matrix]:
        """Message t holds frame t of sessions 0 .. entries-1 (one row each)."""
        if entries not in self._blocks:
            rows = np.arange(entries) % len(self.x)
            self._blocks[entries] = [to_matrix(self.x[rows, t]) for t in range(self.length)]
        return self._blocks[entries]

    def windows(self, i: int, width: int) -> list[pb.Matrix]:
        """Message t holds the ``width`` frames ending at frame t of the looped recording."""
        key = (i % len(self.x), width)
        if key not in self._windows:
            reps = -(-(width + self.length) // self.length)
            looped = np.concatenate([self.x[key[0]]] * reps)
            self._windows[key] = [to_matrix(looped[t : t + width]) for t in range(self.length)]
        return self._windows[key]


def _channel(server: Server) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.target, options=_OPTIONS)


async def _write(call: grpc.aio.StreamStreamCall, request: Any) -> None:
    """``call.write``, except that a write racing the call's end raises the status the call
    ended with (say UNIMPLEMENTED), not the transport's error for the failed write."""
    try:
        await call.write(request)
    except grpc.aio.AioRpcError as exc:
        code = await call.code()
        if code == grpc.StatusCode.OK or code == exc.code():
            raise
        raise grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        ) from exc


def _check(response: object, what: str) -> None:
    if response is grpc.aio.EOF:
        raise BenchError(f"{what}: the server ended the stream early")


# -- one frame per message, one stream per session ---------------------------------------------


async def _session(
    stub: pb_grpc.SeqServeStub, sid: str, messages: list[pb.Matrix], window: _Window
) -> None:
    call = stub.Stream()
    position = 0
    while (sent := time.perf_counter()) < window.stop:
        await _write(
            call,
            pb.StepRequest(
                session_id=sid,
                position=position,
                frames=messages[position % len(messages)],
                start=position == 0,
            ),
        )
        response = await call.read()
        _check(response, sid)
        if response.HasField("error"):
            raise BenchError(f"{sid}: {response.error.reason}: {response.error.message}")
        window.add(sent, time.perf_counter(), 1)
        if position == 0:
            await window.arrived()
        position += 1
    await call.done_writing()
    await call.code()


async def stream_sessions(
    server: Server, frames: Frames, sessions: int, *, warmup: float, seconds: float, tag: str
) -> Run:
    """``sessions`` sessions, each on its own Stream call, each sending one frame and awaiting
    its answer before the next."""
    window = _Window(sessions, warmup, seconds)
    async with _channel(server) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        load = asyncio.gather(
            *(_session(stub, f"{tag}-{i}", frames.session(i), window) for i in range(sessions))
        )
        return await window.measure(server, load)


# -- many sessions per message (StreamBatch) ---------------------------------------------------


async def _batch_stream(
    stub: pb_grpc.SeqServeStub,
    prefix: str,
    messages: list[pb.Matrix],
    entries: int,
    depth: int,
    window: _Window,
) -> None:
    call = stub.StreamBatch()
    ids = [f"{prefix}-{j}" for j in range(entries)]
    sent: deque[float] = deque()
    position = 0

    async def send() -> None:
        nonlocal position
        sent.append(time.perf_counter())
        await _write(
            call,
            pb.StepBatchRequest(
                session_ids=ids,
                positions=[position] * entries,
                frames=messages[position % len(messages)],
                start=position == 0,
                tag=position,
            ),
        )
        position += 1

    for _ in range(depth):
        await send()
    while sent:
        response = await call.read()
        _check(response, prefix)
        if response.errors:
            error = response.errors[0]
            raise BenchError(
                f"{prefix}: {len(response.errors)} entries failed, entry "
                f"{error.index}: {error.error.reason}: {error.error.message}"
            )
        done = time.perf_counter()
        window.add(sent.popleft(), done, entries)
        if position == depth:
            await window.arrived()
        if done < window.stop:
            await send()
    await call.done_writing()
    await call.code()


async def stream_batches(
    server: Server,
    frames: Frames,
    entries: int,
    *,
    streams: int,
    depth: int,
    warmup: float,
    seconds: float,
    tag: str,
) -> Run:
    """``streams`` StreamBatch calls, each carrying one frame for each of its own ``entries``
    sessions per message, with ``depth`` messages in flight. Latency is per message."""
    window = _Window(streams, warmup, seconds)
    messages = frames.blocks(entries)
    async with _channel(server) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        load = asyncio.gather(
            *(
                _batch_stream(stub, f"{tag}-{s}", messages, entries, depth, window)
                for s in range(streams)
            )
        )
        return await window.measure(server, load)


# -- stateless: the whole window every step (Predict) ------------------------------------------


async def _window_client(
    stub: pb_grpc.SeqServeStub, messages: list[pb.Matrix], window: _Window
) -> None:
    t = 0
    while (sent := time.perf_counter()) < window.stop:
        request = pb.PredictRequest(sequences=[pb.Sequence(frames=messages[t % len(messages)])])
        await stub.Predict(request)
        window.add(sent, time.perf_counter(), 1)
        if t == 0:
            await window.arrived()
        t += 1


async def window_predicts(
    server: Server, frames: Frames, clients: int, width: int, *, warmup: float, seconds: float
) -> Run:
    """``clients`` stateless clients: every new frame, Predict on the last ``width`` frames."""
    window = _Window(clients, warmup, seconds)
    async with _channel(server) as channel:
        stub = pb_grpc.SeqServeStub(channel)
        load = asyncio.gather(
            *(_window_client(stub, frames.windows(i, width), window) for i in range(clients))
        )
        return await window.measure(server, load)


# -- whole sequences in one call (Predict) -----------------------------------------------------


@asynccontextmanager
async def predict_caller(
    server: Server, sequences: np.ndarray
) -> AsyncIterator[Callable[[], Awaitable[float]]]:
    """A function timing one Predict call carrying every sequence of ``[N, T, F]`` (the request
    is encoded once, up front)."""
    request = pb.PredictRequest(sequences=[pb.Sequence(frames=to_matrix(s)) for s in sequences])
    async with _channel(server) as channel:
        stub = pb_grpc.SeqServeStub(channel)

        async def call() -> float:
            started = time.perf_counter()
            response = await stub.Predict(request)
            seconds = time.perf_counter() - started
            if len(response.predictions) != len(sequences):
                raise BenchError(f"Predict answered {len(response.predictions)} sequences")
            return seconds

        yield call
