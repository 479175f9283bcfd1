"""``AsyncSession``: one server-side session driven through a ``Multiplexer``.

Positions are assigned here, at submission, so sends can be pipelined (``send_nowait``). At most
``window`` frames (and ``max_requests`` requests) of a session are in flight at once; sends queued
behind them are coalesced into multi-frame requests of at most ``window`` frames. Every request
the server applied but could not answer before a drop is then still within its replay window
(keep ``window`` at most the server's ``--replay-window``) and is answered again after a resume.
A rejected request rewinds the session to its position; requests pipelined behind it fail too.

A session belongs to one model and is pinned to one of its versions for life, the one the server
names (``OpenSession``, ``GetSession``, the first answer). Every request names the model. Only a
request that can create the session (position 0) names a version, the one asked for at open (0:
the latest): later requests go wherever the server keeps the session, which is its version
(another replica finds it through the shared store and loads that version if need be; naming the
version there would refuse a version the replica has not loaded yet). Every answer is checked
against the pinned version: one from another version would end the session (``VersionConflict``)
rather than mix two versions' outputs.
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

from .errors import (
    DeadlineExceeded,
    ModelNotFound,
    SeqServeError,
    ServerError,
    SessionLost,
    SessionNotFound,
    Unavailable,
    VersionConflict,
)
from .frames import as_frames
from .mux import Multiplexer
from .results import Prediction

__all__ = ["AsyncSession"]


@dataclass(slots=True, eq=False)
class _Send:
    """One ``send`` call: its future and the outputs of its parts as they arrive."""

    result: asyncio.Future[Prediction]
    position: int
    started: float
    outputs: list[np.ndarray | None]
    left: int
    replayed: bool = True
    version: int = 0


@dataclass(slots=True, eq=False)
class _Part:
    """At most ``window`` consecutive frames of one send; parts of several sends may travel in
    one request."""

    send: _Send
    index: int
    position: int
    frames: np.ndarray
    end: bool


class AsyncSession:
    """Send frames, get per-frame probabilities. Use as ``async with client.session() as s``."""

    max_requests = 4  # requests in flight per session; further sends queue and coalesce

    def __init__(
        self,
        mux: Multiplexer,
        session_id: str,
        *,
        position: int = 0,
        labels: tuple[str, ...] = (),
        features: int = 0,
        window: int = 64,
        closer: Callable[[str], Awaitable[Any]] | None = None,
        model: str = "",
        version: int = 0,
        asked: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.id = session_id
        self.labels = labels
        self.features = features
        self.model = model  # "" until the server names it: its default model
        self._version = version  # the version it is pinned to (0: not known yet)
        self._asked = asked  # the version asked for when it was opened (0: the latest)
        self._mux = mux
        self._window = window
        self._closer = closer
        self._next = position  # position of the next frame to send
        self._acked = position  # frames answered, contiguous from the start
        self._backlog: deque[_Part] = deque()
        self._inflight = 0  # frames submitted to the multiplexer, not yet answered
        self._inflight_requests = 0
        self._outstanding: set[asyncio.Future[Prediction]] = set()
        self._dead: SeqServeError | None = None  # the session is gone (or the link given up)
        self._failed_at: tuple[int, Exception] | None = None  # later in-flight ones fail too
        self._ended = False
        self._closed = False

    def __repr__(self) -> str:
        model = f" model={self.model}:{self._version}" if self.model else ""
        return f"<AsyncSession {self.id!r}{model} position={self._next}>"

    @property
    def version(self) -> int:
        """The model version the session is pinned to (0 until the server has said)."""
        return self._version

    def version_for(self, position: int) -> int:
        """The version a request at ``position`` names: at 0 (it may create the session) the
        one asked for at open, else none (the session's own)."""
        return self._asked if position == 0 else 0

    @property
    def stream(self) -> Multiplexer:
        """The stream this session's requests travel on (its ``route`` is the session's)."""
        return self._mux

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

    async def send(
        self, frames: Any, *, end: bool = False, timeout: float | None = None
    ) -> Prediction:
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
            raise DeadlineExceeded(
                f"session {self.id!r}: no answer within {timeout}s",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
                session_id=self.id,
            ) from None

    def send_nowait(self, frames: Any, *, end: bool = False) -> asyncio.Future[Prediction]:
        """Like ``send`` but returns at once with a future: pipelines sends on the stream.

        While earlier sends are in flight, queued sends are coalesced into multi-frame requests
        (the outputs are the same, the stream carries fewer messages)."""
        self._check_usable()
        array = as_frames(frames, self.features)
        loop = asyncio.get_running_loop()
        pieces = range(0, len(array), self._window)
        result: asyncio.Future[Prediction] = loop.create_future()
        send = _Send(result, self._next, time.perf_counter(), [None] * len(pieces), len(pieces))
        for index, lo in enumerate(pieces):
            piece = array[lo : lo + self._window]
            last = lo + self._window >= len(array)
            self._backlog.append(_Part(send, index, self._next, piece, end and last))
            self._next += len(piece)
        if end:
            self._ended = True
        self._outstanding.add(result)
        result.add_done_callback(self._outstanding.discard)
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
            raise SessionLost(
                f"session {self.id!r} is closed",
                code=grpc.StatusCode.NOT_FOUND,
                reason="closed",
                session_id=self.id,
                position=self._next,
            )

    def _pump(self) -> None:
        """Turn backlog parts into requests while the in-flight limits allow."""
        while (
            self._backlog
            and self._failed_at is None
            and self._inflight_requests < self.max_requests
        ):
            room = self._window - self._inflight
            if self._inflight and len(self._backlog[0].frames) > room:
                return
            parts = [self._backlog.popleft()]
            count = len(parts[0].frames)
            while (
                self._backlog and not parts[-1].end and count + len(self._backlog[0].frames) <= room
            ):
                parts.append(self._backlog.popleft())
                count += len(parts[-1].frames)
            frames = (
                parts[0].frames if len(parts) == 1 else np.concatenate([p.frames for p in parts])
            )
            position = parts[0].position
            request = pb.StepRequest(
                session_id=self.id,
                position=position,
                frames=to_matrix(frames),
                start=position == 0,
                end=parts[-1].end,
                model=self.model,
                version=self.version_for(position),
            )
            try:
                future = self._mux.submit(request)
            except Exception as exc:
                for part in parts:
                    _fail(part, exc)
                continue
            self._inflight += count
            self._inflight_requests += 1
            future.add_done_callback(functools.partial(self._answered, parts, count))

    def _answered(
        self, parts: list[_Part], count: int, future: asyncio.Future[pb.StepResponse]
    ) -> None:
        self._inflight -= count
        self._inflight_requests -= 1
        position = parts[0].position
        exc = future.exception() if not future.cancelled() else Unavailable("cancelled")
        if exc is None:
            response = future.result()
            probs = np.array(from_matrix(response.probabilities))
            if len(probs) != count:
                exc = ServerError(
                    f"{len(probs)} rows of probabilities for {count} frames",
                    session_id=self.id,
                    position=position,
                )
            elif self._version and response.model_version not in (0, self._version):
                exc = VersionConflict(
                    f"session {self.id!r} is pinned to version {self._version} of model "
                    f"{self.model!r}, but version {response.model_version} answered: the session "
                    "cannot go on",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                    reason="version_mismatch",
                    session_id=self.id,
                    position=position,
                )
            else:
                self._acked = max(self._acked, response.next_position)
                self._version = self._version or response.model_version
                self.model = self.model or response.model
                offset = 0
                for part in parts:
                    n = len(part.frames)
                    _done(part, probs[offset : offset + n], response, self.labels)
                    offset += n
        if exc is not None:
            assert isinstance(exc, Exception)
            if self._failed_at is not None and position > self._failed_at[0]:
                exc = _after(self._failed_at[1], self._failed_at[0])
            elif isinstance(exc, _FATAL):
                self._dead = exc
                self._fail_backlog(exc, position)
            else:  # nothing of it was applied: later sends go again from its position
                self._failed_at = (position, exc)
                self._next = position
                self._ended = False
                self._fail_backlog(exc, position)
            for part in parts:
                _fail(part, exc)
        if self._failed_at is not None and self._inflight_requests == 0:
            self._failed_at = None
        self._pump()

    def _fail_backlog(self, exc: Exception, failed: int) -> None:
        while self._backlog:
            _fail(self._backlog.popleft(), _after(exc, failed))


# Errors after which the session cannot go on: gone, unreachable past the retry budget, its
# model or version missing, or pinned to another version than the one the server has for it.
_FATAL = (SessionNotFound, Unavailable, ModelNotFound, VersionConflict)


def _done(
    part: _Part, probs: np.ndarray, response: pb.StepResponse, labels: tuple[str, ...]
) -> None:
    send = part.send
    if send.result.done():
        return
    send.outputs[part.index] = probs
    send.replayed = send.replayed and response.replayed
    send.version = send.version or response.model_version
    send.left -= 1
    if send.left:
        return
    outputs = [o for o in send.outputs if o is not None]
    send.result.set_result(
        Prediction(
            session_id=response.session_id,
            position=send.position,
            probabilities=outputs[0] if len(outputs) == 1 else np.concatenate(outputs),
            labels=labels,
            latency=time.perf_counter() - send.started,
            replayed=send.replayed,
            model=response.model,
            model_version=send.version,
        )
    )


def _fail(part: _Part, exc: BaseException) -> None:
    if not part.send.result.done():
        part.send.result.set_exception(exc)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody waits for it any more: do not log it as unretrieved


def _again(exc: SeqServeError) -> SeqServeError:
    return type(exc)(
        str(exc), code=exc.code, reason=exc.reason, session_id=exc.session_id, position=exc.position
    )


def _after(exc: Exception, failed: int) -> Exception:
    """The error for a request queued behind one that failed at position ``failed``."""
    if not isinstance(exc, SeqServeError):
        return exc
    if isinstance(exc, _FATAL):
        return _again(exc)
    return type(exc)(
        f"not applied: the send at position {failed} before it failed: {exc}",
        code=exc.code,
        reason=exc.reason,
        session_id=exc.session_id,
        position=exc.position,
    )
