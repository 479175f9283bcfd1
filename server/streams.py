"""Bidirectional request streams answered as requests settle, shared by the native ``Stream`` /
``StreamBatch`` and the Open Inference Protocol's ``ModelStreamInfer``; and their drain.

A front gives three callables: ``submit(request) -> (ticket, future)`` admits one request (or
raises, which ``failed(request, started, exc)`` turns into that request's in-stream error), and
``respond(ticket, started, future)`` turns a settled future into the answer (an error answer
included). The stream stays open through per-request errors.

While every answer is ready the moment its request is submitted (a lone client of an idle
server), the stream's own task reads, answers and writes: one loop turn per message. From the
first request that has to wait, a reader task takes over reading, so requests keep being
admitted (and batched) while answers wait, and the stream's task only writes, at most
``inflight`` unanswered requests ahead of the client.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["Drained", "Streams"]

Submit = Callable[[Any], tuple[Any, "asyncio.Future[Any]"]]
Respond = Callable[[Any, float, "asyncio.Future[Any]"], Any]
Failed = Callable[[Any, float, Exception], Any]

_END = object()  # reader finished
_DRAIN = object()  # server draining: end the stream once every accepted request is answered


class Drained(Exception):
    """The server is draining: the stream ended after answering every request it accepted; the
    front closes it with its own UNAVAILABLE status."""


class Streams:
    """The open streams of one front."""

    def __init__(self, inflight: int, draining: Callable[[], bool]) -> None:
        self.inflight = inflight
        self._draining = draining
        self._queues: set[asyncio.Queue[Any]] = set()
        # Streams whose one task is waiting for the next request (nothing outstanding).
        self._reading: dict[asyncio.Queue[Any], asyncio.Task[Any]] = {}

    def drain(self) -> None:
        """Ask every open stream to end once its accepted requests are answered."""
        for queue in self._queues:
            queue.put_nowait(_DRAIN)
        for task in list(self._reading.values()):  # streams waiting for their next request
            task.cancel()

    async def serve(
        self, requests: AsyncIterator[Any], submit: Submit, respond: Respond, failed: Failed
    ) -> AsyncIterator[Any]:
        """The answers, in the order they settle; raises Drained at the end of a drain."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues.add(queue)
        iterator = requests.__aiter__()
        reader: asyncio.Task[None] | None = None
        task = asyncio.current_task()
        drained = [False]
        try:
            while not drained[0]:
                if self._draining():
                    drained[0] = True
                    break
                if task is not None:
                    self._reading[queue] = task  # drain() may cancel this read
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not self._draining():
                        raise
                    drained[0] = True
                    break
                finally:
                    self._reading.pop(queue, None)
                started = time.perf_counter()
                try:
                    ticket, future = submit(request)
                except Exception as exc:
                    yield failed(request, started, exc)
                    continue
                if future.done():
                    yield respond(ticket, started, future)
                    continue
                # From here on a reader task reads; this task writes what settles.
                slots = asyncio.Semaphore(self.inflight - 1)
                outstanding = [1]
                future.add_done_callback(
                    functools.partial(_answer, queue, respond, ticket, started)
                )
                reader = asyncio.create_task(
                    _read(iterator, queue, slots, outstanding, submit, respond, failed)
                )
                async for response in self._write(queue, slots, outstanding, drained):
                    yield response
                break
        finally:
            self._queues.discard(queue)
            self._reading.pop(queue, None)
            if reader is not None:
                reader.cancel()
        if (
            reader is not None
            and not reader.cancelled()
            and reader.done()
            and reader.exception() is not None
        ):
            raise reader.exception()  # type: ignore[misc]
        if drained[0]:
            raise Drained

    async def _write(
        self,
        queue: asyncio.Queue[Any],
        slots: asyncio.Semaphore,
        outstanding: list[int],
        drained: list[bool],
    ) -> AsyncIterator[Any]:
        """Answers as they settle, until the reader is done and every request is answered, or
        the server drains and every accepted request is answered (``drained[0]`` then)."""
        reading = True
        draining = self._draining()
        while reading or outstanding[0]:
            if draining and not outstanding[0]:
                break
            item = await queue.get()
            if item is _END:
                reading = False
            elif item is _DRAIN:
                draining = True
            else:
                outstanding[0] -= 1
                slots.release()
                yield item
        drained[0] = draining


async def _read(
    requests: AsyncIterator[Any],
    queue: asyncio.Queue[Any],
    slots: asyncio.Semaphore,
    outstanding: list[int],
    submit: Submit,
    respond: Respond,
    failed: Failed,
) -> None:
    try:
        async for request in requests:
            await slots.acquire()
            outstanding[0] += 1
            started = time.perf_counter()
            try:
                ticket, future = submit(request)
            except Exception as exc:
                queue.put_nowait(failed(request, started, exc))
                continue
            if future.done() and outstanding[0] == 1:
                # Answered at once with nothing else outstanding (so it overtakes no answer
                # still on its way): no callback's loop turn.
                queue.put_nowait(respond(ticket, started, future))
            else:
                future.add_done_callback(
                    functools.partial(_answer, queue, respond, ticket, started)
                )
    finally:
        queue.put_nowait(_END)


def _answer(
    queue: asyncio.Queue[Any],
    respond: Respond,
    ticket: Any,
    started: float,
    future: asyncio.Future[Any],
) -> None:
    queue.put_nowait(respond(ticket, started, future))
