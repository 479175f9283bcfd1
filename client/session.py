"""``AsyncSession``: one server-side session driven through a ``Multiplexer``.

Positions are assigned here, at submission, so sends can be pipelined (``send_nowait``). A send
longer than the replay window is cut into requests of at most ``window`` frames, and at most
``window`` frames are in flight at once: every request the server applied but did not get to
answer before a drop can then still be answered from its replay store after a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto.codec import from_matrix, to_matrix

from .errors import DeadlineExceeded, SeqServeError, SessionLost, SessionNotFound, Unavailable
from .frames import as_frames
from .mux import Multiplexer
from .results import Prediction

__all__ = ["AsyncSession"]


@dataclass(slots=True, eq=False)
class _Chunk:
    request: pb.StepRequest
    frames: int
    future: asyncio.Future[pb.StepResponse]


class AsyncSession:
    """Send frames, get per-frame probabilities. Use as ``async with client.session() as s``."""

    def __init__(self, mux: Multiplexer, session_id: str, *, position: int = 0,
                 labels: tuple[str, ...] = (), features: int = 0, window: int = 64,
                 closer: Callable[[str], Awaitable[Any]] | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.id = session_id
        self.labels = labels
        self.features = features
        self._mux = mux
        self._window = window
        self._closer = closer
        self._next = position  # position of the next frame to send
        self._acked = position  # frames answered, contiguous from the start
        self._backlog: deque[_Chunk] = deque()
        self._inflight = 0  # frames submitted to the multiplexer, not yet answered
        self._inflight_chunks = 0
        self._outstanding: set[asyncio.Future[Prediction]] = set()
        self._dead: SeqServeError | None = None  # the session is gone (or the link given up)
        self._failed_at: tuple[int, Exception] | None = None  # later in-flight ones fail too
        self._ended = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncSession {self.id!r} position={self._next}>"

    @property
    def position(self) -> int:
        """Frames sent so far (the position the next ``send`` starts at)."""
        return self._next

    @property
    def acknowledged(self) -> int:
        """Frames the server has answered for."""
        return self._acked

    @property
    def pending(self) -> int:
        """Sends not answered yet."""
        return len(self._outstanding)

    async def send(self, frames: Any, *, end: bool = False,
                   timeout: float | None = None) -> Prediction:
        """Apply one frame ``[F]`` or frames ``[T, F]``; per-frame probabilities back.

        ``timeout`` bounds the wait (DeadlineExceeded); the send itself stays queued and is
        still applied, in order, so the session remains consistent."""
        future = self.send_nowait(frames, end=end)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            future.add_done_callback(_consume)
            raise DeadlineExceeded(f"session {self.id!r}: no answer within {timeout}s",
                                   code=grpc.StatusCode.DEADLINE_EXCEEDED,
                                   session_id=self.id) from None

    def send_nowait(self, frames: Any, *, end: bool = False) -> asyncio.Future[Prediction]:
        """Like ``send`` but returns at once with a future: pipelines sends on the stream."""
        self._check_usable()
        array = as_frames(frames, self.features)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        chunks = []
        for lo in range(0, len(array), self._window):
            piece = array[lo : lo + self._window]
            last = lo + self._window >= len(array)
            request = pb.StepRequest(session_id=self.id, position=self._next,
                                     frames=to_matrix(piece), start=self._next == 0,
                                     end=end and last)
            self._next += len(piece)
            chunks.append(_Chunk(request, len(piece), loop.create_future()))
        if end:
            self._ended = True
        self._backlog.extend(chunks)
        result: asyncio.Future[Prediction] = loop.create_future()
        self._outstanding.add(result)
        gathered = asyncio.gather(*(c.future for c in chunks), return_exceptions=True)
        gathered.add_done_callback(lambda g: self._settle(result, chunks, g, started))
        self._pump()
        return result

    async def flush(self) -> None:
        """Wait until every send so far is answered (errors stay with their futures)."""
        if self._outstanding:
            await asyncio.gather(*self._outstanding, return_exceptions=True)

    async def close(self) -> None:
        """Wait for pending sends, then close the session on the server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.flush()
        if self._ended or self._dead is not None or self._closer is None:
            return
        self._ended = True
        with contextlib.suppress(SessionNotFound):
            await self._closer(self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise _again(self._dead)
        if self._ended or self._closed:
            raise SessionLost(f"session {self.id!r} is closed", code=grpc.StatusCode.NOT_FOUND,
                              reason="closed", session_id=self.id, position=self._next)

    def _pump(self) -> None:
        """Hand backlog chunks to the multiplexer while the in-flight window allows."""
        while self._backlog and self._failed_at is None and (
                self._inflight == 0 or self._inflight + self._backlog[0].frames <= self._window):
            chunk = self._backlog.popleft()
            try:
                future = self._mux.submit(chunk.request)
            except Exception as exc:
                chunk.future.set_exception(exc)
                continue
            self._inflight += chunk.frames
            self._inflight_chunks += 1
            future.add_done_callback(functools.partial(self._answered, chunk))

    def _answered(self, chunk: _Chunk, future: asyncio.Future[pb.StepResponse]) -> None:
        self._inflight -= chunk.frames
        self._inflight_chunks -= 1
        position = chunk.request.position
        exc = future.exception() if not future.cancelled() else Unavailable("cancelled")
        if exc is None:
            response = future.result()
            self._acked = max(self._acked, response.next_position)
            chunk.future.set_result(response)
        else:
            assert isinstance(exc, Exception)
            if self._failed_at is not None and position > self._failed_at[0]:
                exc = _after(self._failed_at[1], self._failed_at[0])
            elif isinstance(exc, (SessionNotFound, Unavailable)):
                self._dead = exc
                self._fail_backlog(exc, position)
            else:  # nothing of it was applied: later sends go again from its position
                self._failed_at = (position, exc)
                self._next = position
                self._ended = False
                self._fail_backlog(exc, position)
            chunk.future.set_exception(exc)
        if self._failed_at is not None and self._inflight_chunks == 0:
            self._failed_at = None
        self._pump()

    def _fail_backlog(self, exc: Exception, failed: int) -> None:
        while self._backlog:
            self._backlog.popleft().future.set_exception(_after(exc, failed))

    def _settle(self, result: asyncio.Future[Prediction], chunks: list[_Chunk],
                gathered: asyncio.Future[list[Any]], started: float) -> None:
        self._outstanding.discard(result)
        if result.done():
            return
        outcomes = gathered.result()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
                return
        probs = [np.array(from_matrix(r.probabilities)) for r in outcomes]
        result.set_result(Prediction(
            session_id=self.id, position=chunks[0].request.position,
            probabilities=probs[0] if len(probs) == 1 else np.concatenate(probs),
            labels=self.labels, latency=time.perf_counter() - started,
            replayed=all(r.replayed for r in outcomes)))


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody waits for it any more: do not log it as unretrieved


def _again(exc: SeqServeError) -> SeqServeError:
    return type(exc)(str(exc), code=exc.code, reason=exc.reason, session_id=exc.session_id,
                     position=exc.position)


def _after(exc: Exception, failed: int) -> Exception:
    """The error for a request queued behind one that failed at position ``failed``."""
    if not isinstance(exc, SeqServeError):
        return exc
    if isinstance(exc, (SessionNotFound, Unavailable)):
        return _again(exc)
    return type(exc)(f"not applied: the send at position {failed} before it failed: {exc}",
                     code=exc.code, reason=exc.reason, session_id=exc.session_id,
                     position=exc.position)
