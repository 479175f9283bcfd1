"""``AsyncClient``: the asyncio client. Unary calls, batch predict, and sessions multiplexed on
one ``Stream`` call that resumes by itself after a drop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import from_matrix, to_matrix

from .channel import TLS, call_metadata, make_channel
from .errors import Unavailable, error_from_rpc, error_from_status
from .frames import as_frames, as_sequences
from .health import HEALTH_CHECK, decode_status, encode_request
from .mux import Multiplexer
from .results import BatchPrediction, ModelInfo, Prediction, SequencePrediction, SessionInfo
from .retry import Backoff, Contact
from .routing import check_route, route_metadata
from .session import AsyncSession

__all__ = ["DEFAULT_TARGET", "AsyncClient"]

DEFAULT_TARGET = "localhost:50051"
_PREDICT_BYTES = 4 * 1024 * 1024  # frames per Predict call, well under message limits
_NO_CONTACT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
# Refusals the proto says to answer by sending the same call again: nothing was applied, and the
# call resumes the session where it now is (UNAVAILABLE of any reason is retried anyway).
_RESEND = frozenset({"session_moved"})
T = TypeVar("T")


class AsyncClient:
    """Client of a seqserve server; create and use it inside one event loop.

    ``timeout`` bounds each unary call and each send's wait (None: no bound). ``retry`` is the
    reconnect policy for dropped streams and unavailable servers. ``window`` is the most frames a
    session has in flight; sessions use at most the server's ``--replay-window`` (from
    ``GetModel``) so every resend can be answered. ``token`` is sent as ``authorization: Bearer``
    with every call; ``cert`` and ``key`` (PEM bytes) are a client certificate for mutual TLS.

    Behind a front proxy that hashes on the ``seqserve-route`` header (see ``routing``), a
    session's calls all reach one replica: unary calls route by session id, a stream by its own
    key, which the sessions opened on it share. ``route`` fixes the key of the shared stream
    (default: random per client).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS = None,
        timeout: float | None = None,
        retry: Backoff | None = None,
        window: int = 64,
        options: Sequence[tuple[str, Any]] = (),
        cert: bytes | None = None,
        key: bytes | None = None,
        route: str | None = None,
    ) -> None:
        self.target = target
        self.route = None if route is None else check_route(route)
        self.timeout = timeout
        self.retry = retry or Backoff()
        self.window = window
        self._metadata = call_metadata(token)
        self._channel = make_channel(target, tls, options, cert=cert, key=key)
        self._stub = pb_grpc.SeqServeStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=encode_request, response_deserializer=decode_status
        )
        self._contact = Contact()
        self._mux: Multiplexer | None = None
        self._streams: list[Multiplexer] = []
        # the stream each live session of this client was opened on: its calls route with it
        self._sessions: weakref.WeakValueDictionary[str, AsyncSession] = (
            weakref.WeakValueDictionary()
        )
        self._model: ModelInfo | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the streams (pending sends get a moment to finish) and the channel."""
        for mux in self._streams:
            await mux.aclose(timeout=1.0 if self.timeout is None else self.timeout)
        await self._channel.close()

    # -- unary calls --------------------------------------------------------------------------

    async def model(self) -> ModelInfo:
        """Model metadata: name, version, features, labels, layers, limits."""
        info = ModelInfo.from_pb(await self._call(self._stub.GetModel, pb.ModelRequest()))
        self._model = info
        return info

    async def health(self, service: str = "") -> str:
        """The gRPC health status: ``SERVING``, ``NOT_SERVING`` (e.g. draining), ..."""
        return await self._call(self._health, service, retry=False)

    async def predict(
        self, sequences: Any, lengths: Any = None, *, per_step: bool = False
    ) -> list[SequencePrediction]:
        """Whole-sequence inference on independent sequences (a list of ``[T_i, F]`` arrays, or a
        padded ``[n, T, F]`` array with ``lengths``); one result per sequence, in order."""
        model = await self._model_info()
        arrays = as_sequences(sequences, lengths, model.features)
        results: list[SequencePrediction] = []
        for batch in _batches(arrays, _PREDICT_BYTES):
            request = pb.PredictRequest(
                sequences=[pb.Sequence(frames=to_matrix(a)) for a in batch], per_step=per_step
            )
            response = await self._call(self._stub.Predict, request)
            for p in response.predictions:
                results.append(
                    SequencePrediction(
                        probabilities=from_matrix(p.probabilities)[0].copy(),
                        labels=model.labels,
                        per_step=from_matrix(p.per_step).copy() if per_step else None,
                    )
                )
        return results

    async def step(
        self,
        session_id: str,
        frames: Any,
        *,
        position: int,
        start: bool | None = None,
        end: bool = False,
        route: str | None = None,
    ) -> Prediction:
        """One unary ``Step``: apply ``frames`` (``[F]`` or ``[T, F]``) at ``position`` of the
        session, for callers that keep no stream. ``start`` (default: at position 0) creates the
        session if it does not exist. Positions make a retried step harmless (answered from the
        server's replay window), so UNAVAILABLE is retried like any unary call."""
        model = await self._model_info()
        array = as_frames(frames, model.features)
        request = pb.StepRequest(
            session_id=session_id,
            position=position,
            frames=to_matrix(array),
            start=position == 0 if start is None else start,
            end=end,
        )
        started = time.perf_counter()
        response = await self._call(
            self._stub.Step, request, route=self._route_of(session_id, route)
        )
        return Prediction(
            session_id=session_id,
            position=position,
            probabilities=from_matrix(response.probabilities).copy(),
            labels=model.labels,
            latency=time.perf_counter() - started,
            replayed=response.replayed,
        )

    async def step_batch(
        self,
        session_ids: Sequence[str],
        frames: Any,
        positions: Sequence[int] | np.ndarray,
        *,
        start: bool = False,
        route: str | None = None,
    ) -> BatchPrediction:
        """One frame for each of many sessions in one ``StepBatch`` call: ``frames[i]`` at
        ``positions[i]`` of ``session_ids[i]``. Entries succeed or fail on their own (see
        ``BatchPrediction.errors``); a malformed batch raises. ``start`` creates the sessions
        that do not exist (at position 0). Behind a hashing proxy the call goes by ``route``
        (default: this client's shared stream key), so all these sessions share a replica."""
        model = await self._model_info()
        array = as_frames(frames, model.features)
        ids = tuple(session_ids)
        if array.shape[0] != len(ids) or len(positions) != len(ids):
            raise ValueError(
                f"{len(ids)} session ids, {array.shape[0]} frames and "
                f"{len(positions)} positions: a batch has one of each per entry"
            )
        request = pb.StepBatchRequest(
            session_ids=ids,
            positions=[int(p) for p in positions],
            frames=to_matrix(array),
            start=start,
        )
        response = await self._call(
            self._stub.StepBatch, request, route=route or self.multiplexer.route
        )
        errors: dict[int, Exception] = {
            e.index: error_from_status(
                e.error.code,
                e.error.message,
                reason=e.error.reason,
                session_id=ids[e.index] if e.index < len(ids) else "",
                position=e.error.expected_position,
                in_session=True,
            )
            for e in response.errors
        }
        return BatchPrediction(
            session_ids=ids,
            probabilities=from_matrix(response.probabilities).copy(),
            next_positions=np.array(response.next_positions, np.int64),
            replayed=np.array(response.replayed, np.bool_),
            errors=errors,
            labels=model.labels,
        )

    async def get_session(self, session_id: str, *, route: str | None = None) -> SessionInfo:
        """A session's position and expiry. Routed like the session's other calls: by the
        stream it was opened on in this client, else by its id (or ``route``)."""
        return SessionInfo.from_pb(
            await self._call(
                self._stub.GetSession,
                pb.SessionRef(session_id=session_id),
                route=self._route_of(session_id, route),
            )
        )

    async def reset_session(self, session_id: str, *, route: str | None = None) -> SessionInfo:
        """Back to the zero state at position 0 (routed like ``get_session``)."""
        return SessionInfo.from_pb(
            await self._call(
                self._stub.ResetSession,
                pb.SessionRef(session_id=session_id),
                route=self._route_of(session_id, route),
            )
        )

    async def close_session(self, session_id: str, *, route: str | None = None) -> SessionInfo:
        """Close the session on the server (routed like ``get_session``)."""
        return SessionInfo.from_pb(
            await self._call(
                self._stub.CloseSession,
                pb.SessionRef(session_id=session_id),
                route=self._route_of(session_id, route),
            )
        )

    # -- sessions -----------------------------------------------------------------------------

    def stream(self, *, route: str | None = None) -> Multiplexer:
        """A further ``Stream`` call of its own (sessions use one shared call by default), with
        route key ``route`` (default: a random one; the proxy then picks its replica)."""
        mux = Multiplexer(
            self._stub,
            metadata=self._metadata,
            retry=self.retry,
            contact=self._contact,
            target=self.target,
            route=route,
        )
        self._streams.append(mux)
        return mux

    @property
    def multiplexer(self) -> Multiplexer:
        """The shared stream every session of this client uses unless told otherwise."""
        if self._mux is None:
            self._mux = self.stream(route=self.route)
        return self._mux

    async def open_session(
        self,
        session_id: str | None = None,
        *,
        resume: bool = False,
        stream: Multiplexer | None = None,
    ) -> AsyncSession:
        """Open a new session (server-assigned id when None; SessionExists if taken), or with
        ``resume=True`` continue an existing one from its current position.

        The session is opened, and later closed, with the route key of the stream it will use
        (``stream``, else the shared one), so behind a hashing proxy it lives on the replica
        that stream reaches."""
        model = await self._model_info()
        mux = stream or self.multiplexer
        if resume:
            if not session_id:
                raise ValueError("resume needs the session id")
            info = await self.get_session(session_id, route=mux.route)
        else:
            info = SessionInfo.from_pb(
                await self._call(
                    self._stub.OpenSession,
                    pb.OpenSessionRequest(session_id=session_id or ""),
                    route=mux.route,
                )
            )
        session = AsyncSession(
            mux,
            info.session_id,
            position=info.position,
            labels=model.labels,
            features=model.features,
            window=min(self.window, model.replay_window or self.window),
            closer=functools.partial(self.close_session, route=mux.route),
        )
        self._sessions[session.id] = session
        return session

    @contextlib.asynccontextmanager
    async def session(
        self,
        session_id: str | None = None,
        *,
        resume: bool = False,
        stream: Multiplexer | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """``async with client.session() as s:`` opens a session and closes it at the end."""
        session = await self.open_session(session_id, resume=resume, stream=stream)
        try:
            yield session
        finally:
            await session.close()

    # -- internals ----------------------------------------------------------------------------

    async def _model_info(self) -> ModelInfo:
        return self._model or await self.model()

    def _route_of(self, session_id: str, route: str | None) -> str:
        """The route key of a call about ``session_id``: ``route`` if given, else the key of
        the stream this client opened the session on, else the id itself."""
        if route is not None:
            return check_route(route)
        session = self._sessions.get(session_id)
        return session.stream.route if session is not None else session_id

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        retry: bool = True,
        route: str | None = None,
    ) -> T:
        """One unary call; UNAVAILABLE (and ABORTED ``session_moved``) is retried under the
        backoff once the server has been reached (an address that never answered fails at
        once). ``route`` goes as the ``seqserve-route`` header (none: any replica may answer)."""
        metadata = (*self._metadata, *route_metadata(route))
        attempt, first_failure = 0, 0.0
        while True:
            try:
                response = await method(request, metadata=metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc, target=self.target)
            else:
                self._contact.seen = True
                return response
            if error.code not in _NO_CONTACT:
                self._contact.seen = True
            if attempt == 0:
                first_failure = time.monotonic()
            elapsed = time.monotonic() - first_failure
            again = error.code is grpc.StatusCode.UNAVAILABLE or error.reason in _RESEND
            if not (retry and again and self._contact.seen):
                raise error from None
            if not self.retry.allows(attempt, elapsed):
                raise Unavailable(
                    f"{error} (gave up after {attempt} retries, {elapsed:.1f}s)",
                    code=error.code,
                    reason=error.reason,
                ) from None
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1


def _batches(arrays: list[Any], limit: int) -> list[list[Any]]:
    batches: list[list[Any]] = [[]]
    size = 0
    for array in arrays:
        if batches[-1] and size + array.nbytes > limit:
            batches.append([])
            size = 0
        batches[-1].append(array)
        size += array.nbytes
    return batches
