"""Many sessions over one bidirectional ``Stream`` call, with transparent resume.

Every request carries ``(session_id, position)``, and the model and version it is for; the
multiplexer gives it a ``tag`` of its own, which the server echoes, and matches each response
back by that tag (session ids are one namespace per model, so one stream may carry the same id
for two models). Each request stays *unacknowledged* until its response arrives. When the call
breaks (connection lost, server draining or restarted: UNAVAILABLE), a new call is opened after
a backoff and every unacknowledged request is written again, in the original order. The server
answers requests it had already applied from its replay store (``replayed=true``) and applies
the rest, so nothing is lost or applied twice. Only a session truly gone (NOT_FOUND), a version
the server cannot serve it on, or a retry budget spent reaches the caller, as an exception on
the request's future.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import grpc

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

from .errors import SeqServeError, Unavailable, error_from_rpc, error_from_status
from .retry import Backoff, Contact
from .routing import check_route, new_route, route_metadata

__all__ = ["Multiplexer"]

log = logging.getLogger("seqserve.client.mux")

_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# How a connection torn down mid-call (RST, reset, GOAWAY) can surface besides UNAVAILABLE.
# "Internal error from Core" is grpc-python asyncio's local status when a write races the
# server's end of the stream (grpc/grpc#36066): it replaces the server's own status (e.g.
# UNAVAILABLE draining), so it is taken for a drop and the stream resumes.
_TRANSPORT = (
    "internal error from core",
    "rst_stream",
    "stream removed",
    "socket closed",
    "connection reset",
    "goaway",
    "broken pipe",
    "end of tcp stream",
)
_Key = int  # a request's tag
# In-stream errors that say "not now": the request is written again after a pause.
_TRY_AGAIN = frozenset({"store_unavailable", "session_moved"})


class Multiplexer:
    """Owns one ``Stream`` call (opened on first use) and routes responses to futures.

    Every call it opens carries ``seqserve-route: <route>``: one key for the multiplexer's life
    (random unless given), so a front proxy that hashes on it sends the resumed stream, and with
    it every session on it, to the same replica."""

    def __init__(
        self,
        stub: pb_grpc.SeqServeStub,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        retry: Backoff | None = None,
        contact: Contact | None = None,
        target: str = "",
        route: str | None = None,
    ) -> None:
        self._stub = stub
        self.route = new_route() if route is None else check_route(route)
        self._metadata = (*metadata, *route_metadata(self.route))
        self._retry = retry or Backoff()
        self._contact = contact or Contact()
        self._target = target
        self._unacked: dict[_Key, tuple[pb.StepRequest, asyncio.Future[pb.StepResponse]]] = {}
        self._pending: set[tuple[str, str, int]] = set()  # (model, session id, position)
        self._tags = itertools.count(1)
        self._tries: dict[_Key, tuple[int, float]] = {}  # retries of in-stream errors: n, since
        self._outbox: asyncio.Queue[pb.StepRequest | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._answered = False
        self._opened = 0  # calls opened so far
        self.reconnects = 0  # streams opened after the first
        self.resent = 0  # requests written again on a new call (their first answer was lost)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._unacked)

    def submit(self, request: pb.StepRequest) -> asyncio.Future[pb.StepResponse]:
        """Queue a request (its ``tag`` is set here); the future gives its response or raises a
        ``SeqServeError``."""
        if self._closing:
            raise Unavailable(
                "the client is closed",
                code=grpc.StatusCode.CANCELLED,
                session_id=request.session_id,
                position=request.position,
            )
        pending = (request.model, request.session_id, request.position)
        if pending in self._pending:
            raise ValueError(
                f"position {request.position} of session {request.session_id!r} is already pending"
            )
        future: asyncio.Future[pb.StepResponse] = asyncio.get_running_loop().create_future()
        request.tag = key = next(self._tags)
        self._pending.add(pending)
        self._unacked[key] = (request, future)
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="seqserve-client-stream")
        else:
            self._outbox.put_nowait(request)
        return future

    async def drain(self) -> None:
        """Wait until every submitted request is answered (or failed)."""
        await self._idle.wait()

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """Let pending requests finish (up to ``timeout``), then end the stream."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout)
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            self._outbox.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(task), 1.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail_all(
            Unavailable(
                "the client was closed before the server answered", code=grpc.StatusCode.CANCELLED
            )
        )

    # -- the connection loop ------------------------------------------------------------------

    async def _run(self) -> None:
        attempt, first_failure = 0, 0.0
        while self._unacked and not self._closing:
            if self._opened:
                self.reconnects += 1
                self.resent += len(self._unacked)
            self._opened += 1
            error = await self._one_call()
            if error is None:
                attempt = 0
                continue
            if attempt == 0 or self._answered:  # a fresh outage: a fresh retry budget
                first_failure, attempt = time.monotonic(), 0
            elapsed = time.monotonic() - first_failure
            retryable = error.code in _RETRY_CODES and self._contact.seen
            if self._closing or not self._unacked:
                return
            if not retryable or not self._retry.allows(attempt, elapsed):
                if retryable:
                    error = Unavailable(
                        f"lost the stream to {self._target or 'the server'} and "
                        f"could not resume within {elapsed:.1f}s "
                        f"({attempt} retries): {error}",
                        code=error.code,
                        reason=error.reason,
                    )
                self._fail_all(error)
                return
            delay = self._retry.delay(attempt)
            log.info(
                "stream to %s broke (%s); resuming %d requests in %.2fs",
                self._target,
                error,
                len(self._unacked),
                delay,
            )
            attempt += 1
            await asyncio.sleep(delay)

    async def _one_call(self) -> SeqServeError | None:
        """Open a call, write every unacknowledged request then new ones, read responses until
        the call ends. Returns the error that ended it (None: ended cleanly)."""
        self._answered = False
        outbox: asyncio.Queue[pb.StepRequest | None] = asyncio.Queue()
        for request, _ in self._unacked.values():
            outbox.put_nowait(request)
        if self._closing:
            outbox.put_nowait(None)
        self._outbox = outbox
        call = self._stub.Stream(metadata=self._metadata)
        writer = asyncio.create_task(_write(call, outbox))
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self._answered = True
                self._contact.seen = True
                self._on_response(response)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc, target=self._target, in_session=True)
            if error.reason:  # ended by seqserve itself (e.g. draining): the server was reached
                self._contact.seen = True
            if _dropped(exc):
                return Unavailable(
                    f"connection dropped ({exc.code().name}: {exc.details()})",
                    code=grpc.StatusCode.UNAVAILABLE,
                )
            return error
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            call.cancel()
        if self._unacked and not self._closing:
            return Unavailable(
                "the server ended the stream with requests unanswered",
                code=grpc.StatusCode.UNAVAILABLE,
            )
        return None

    def _on_response(self, response: pb.StepResponse) -> None:
        key = response.tag
        entry = self._unacked.get(key)
        if entry is None or entry[0].session_id != response.session_id:
            return  # answer to a duplicate write; the first answer already settled it
        error = response.error if response.HasField("error") else None
        if error is not None and error.reason in _TRY_AGAIN and self._again(key, error):
            return  # not applied; written again on this call after a pause
        if error is not None and error.reason == "draining":
            return  # not applied; written again on the next call
        self._settle(key)
        future = entry[1]
        if not future.done():
            if error is None:
                future.set_result(response)
            else:
                future.set_exception(
                    error_from_status(
                        error.code,
                        error.message,
                        reason=error.reason,
                        session_id=response.session_id,
                        position=error.expected_position,
                        in_session=True,
                    )
                )
        if not self._unacked:
            self._idle.set()

    def _settle(self, key: _Key) -> None:
        """Forget an answered request."""
        request, _ = self._unacked.pop(key)
        self._pending.discard((request.model, request.session_id, request.position))
        self._tries.pop(key, None)

    def _again(self, key: _Key, error: pb.Error) -> bool:
        """Write a request again after a backoff pause, within the retry budget: the replica
        could not reach the session store (``store_unavailable``), or found that another replica
        had taken the session over (``session_moved``; the new attempt reloads it)."""
        now = time.monotonic()
        attempt, first = self._tries.get(key, (0, now))
        if not self._retry.allows(attempt, now - first):
            return False
        self._tries[key] = (attempt + 1, first)
        request = self._unacked[key][0]
        log.info(
            "session %r position %d: %s; trying again",
            request.session_id,
            request.position,
            error.reason,
        )
        asyncio.get_running_loop().call_later(self._retry.delay(attempt), self._write_again, key)
        return True

    def _write_again(self, key: _Key) -> None:
        entry = self._unacked.get(key)
        if entry is not None and not self._closing:
            self._outbox.put_nowait(entry[0])

    def _fail_all(self, error: SeqServeError) -> None:
        entries = list(self._unacked.values())
        self._unacked.clear()
        self._pending.clear()
        self._tries.clear()
        for request, future in entries:
            if not future.done():
                future.set_exception(
                    type(error)(
                        str(error),
                        code=error.code,
                        reason=error.reason,
                        session_id=request.session_id,
                        position=request.position,
                    )
                )
        self._idle.set()


def _dropped(exc: grpc.aio.AioRpcError) -> bool:
    """A transport failure reported as INTERNAL/UNKNOWN rather than UNAVAILABLE."""
    if exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return False
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _TRANSPORT)


async def _write(
    call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[pb.StepRequest | None]
) -> None:
    try:
        while True:
            request = await outbox.get()
            if request is None:
                await call.done_writing()
                return
            await call.write(request)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
        return  # the call broke; the reader sees why
