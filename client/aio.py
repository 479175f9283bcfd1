"""``AsyncClient``: the asyncio client. Unary calls, batch predict, and sessions multiplexed on
one ``Stream`` call that resumes by itself after a drop; the server's models and versions."""

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
from .errors import (
    Unavailable,
    VersionConflict,
    VersionUnavailable,
    error_from_rpc,
    error_from_status,
)
from .frames import as_frames, as_sequences
from .health import HEALTH_CHECK, decode_status, encode_request
from .mux import Multiplexer
from .results import (
    BatchPrediction,
    ModelInfo,
    ModelList,
    Prediction,
    SequencePrediction,
    SessionInfo,
)
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
# UNAVAILABLE that is not retried: the server that answered lacks the version (see
# errors.VersionUnavailable); the route key would bring every retry back to it.
_NO_RETRY = frozenset({"version_unavailable"})
LOAD_TIMEOUT = 300.0  # seconds a LoadModel may take: it reads and checks the graphs
T = TypeVar("T")
_UNSET: Any = object()


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

    Models: every call takes ``model=`` (default ``""``: the server's default model) and, where
    it can start something, ``version=`` (0: the latest ready version). A session is pinned to
    the version it started on; calls about a session this client opened go to its model without
    naming it again. ``models()``, ``load_model()`` and ``unload_model()`` manage the server's
    repository.
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
        # The live sessions of this client by (model as named when opened, id): their calls
        # route with the stream they were opened on and go to their model.
        self._sessions: weakref.WeakValueDictionary[tuple[str, str], AsyncSession] = (
            weakref.WeakValueDictionary()
        )
        # GetModel answers by (model as named, version; 0: the latest ready one).
        self._infos: dict[tuple[str, int], ModelInfo] = {}

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

    async def model(self, model: str = "", *, version: int = 0) -> ModelInfo:
        """A model version's metadata: name, version, features, labels, layers, limits, state.
        ``model`` ``""``: the server's default model; ``version`` 0: its latest ready one."""
        info = ModelInfo.from_pb(
            await self._call(self._stub.GetModel, pb.ModelRequest(model=model, version=version))
        )
        self._infos[(model, version)] = info
        if info.version_number:
            self._infos[(model, info.version_number)] = info
        return info

    async def models(self) -> ModelList:
        """Every model and version the server holds (state, reason, sessions, fingerprint,
        latest and default flags) and the problems it found in its repository."""
        return ModelList.from_pb(await self._call(self._stub.ListModels, pb.ListModelsRequest()))

    async def load_model(
        self, model: str, version: int = 0, *, timeout: float | None = LOAD_TIMEOUT
    ) -> ModelList:
        """Load ``model`` from the server's repository: the versions its policy wants, or the
        one named (which then serves even if the policy does not want it). Returns the models
        as they are afterwards. A version that fails to load raises ``VersionUnavailable``
        with why (checksums, graphs, reference outputs); not retried. With authentication on,
        only the server's ``--admin-principals`` may (else ``PermissionDenied``)."""
        listed = await self._call(
            self._stub.LoadModel,
            pb.LoadModelRequest(model=model, version=version),
            retry=False,
            timeout=timeout,
        )
        self._forget(model)
        return ModelList.from_pb(listed)

    async def unload_model(self, model: str, version: int = 0) -> ModelList:
        """Drain ``model``'s versions (or the one named): the sessions pinned to them go on
        there until they end or the server's ``--version-drain-timeout``; new sessions go to
        the latest version still ready, or are refused. Same permission as ``load_model``."""
        listed = await self._call(
            self._stub.UnloadModel, pb.LoadModelRequest(model=model, version=version), retry=False
        )
        self._forget(model)
        return ModelList.from_pb(listed)

    async def health(self, service: str = "") -> str:
        """The gRPC health status: ``SERVING``, ``NOT_SERVING`` (e.g. draining), ..."""
        return await self._call(self._health, service, retry=False)

    async def predict(
        self,
        sequences: Any,
        lengths: Any = None,
        *,
        per_step: bool = False,
        model: str = "",
        version: int = 0,
    ) -> list[SequencePrediction]:
        """Whole-sequence inference on independent sequences (a list of ``[T_i, F]`` arrays, or a
        padded ``[n, T, F]`` array with ``lengths``); one result per sequence, in order, each
        with the model version that answered (``version`` 0: the latest ready one)."""
        info = await self._version_info(model, version)
        arrays = as_sequences(sequences, lengths, info.features)
        results: list[SequencePrediction] = []
        for batch in _batches(arrays, _PREDICT_BYTES):
            request = pb.PredictRequest(
                sequences=[pb.Sequence(frames=to_matrix(a)) for a in batch],
                per_step=per_step,
                model=model,
                version=version,
            )
            response = await self._call(self._stub.Predict, request)
            labels = await self._labels(model, version, response.model_version)
            for p in response.predictions:
                results.append(
                    SequencePrediction(
                        probabilities=from_matrix(p.probabilities)[0].copy(),
                        labels=labels,
                        per_step=from_matrix(p.per_step).copy() if per_step else None,
                        model=response.model,
                        model_version=response.model_version,
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
        model: str | None = None,
        version: int | None = None,
    ) -> Prediction:
        """One unary ``Step``: apply ``frames`` (``[F]`` or ``[T, F]``) at ``position`` of the
        session, for callers that keep no stream. ``start`` (default: at position 0) creates the
        session if it does not exist, on ``version`` of ``model`` (0: the latest ready one); an
        existing session answers from the version it is pinned to (naming another is
        ``VersionConflict``). For a session this client opened, ``model`` and ``version``
        default to the session's (see ``AsyncSession.version_for``). Positions make a retried
        step harmless (answered from the server's replay window), so UNAVAILABLE is retried
        like any unary call."""
        session = self._session_of(session_id, model)
        model = _pick(model, session.model if session else "")
        version = _pick(version, session.version_for(position) if session else 0)
        info = await self._version_info(model, version)
        array = as_frames(frames, info.features)
        request = pb.StepRequest(
            session_id=session_id,
            position=position,
            frames=to_matrix(array),
            start=position == 0 if start is None else start,
            end=end,
            model=model,
            version=version,
        )
        started = time.perf_counter()
        response = await self._call(
            self._stub.Step, request, route=self._route_of(session, session_id, route)
        )
        return Prediction(
            session_id=session_id,
            position=position,
            probabilities=from_matrix(response.probabilities).copy(),
            labels=await self._labels(model, version, response.model_version),
            latency=time.perf_counter() - started,
            replayed=response.replayed,
            model=response.model,
            model_version=response.model_version,
        )

    async def step_batch(
        self,
        session_ids: Sequence[str],
        frames: Any,
        positions: Sequence[int] | np.ndarray,
        *,
        start: bool = False,
        route: str | None = None,
        model: str = "",
        version: int = 0,
    ) -> BatchPrediction:
        """One frame for each of many sessions of ``model`` in one ``StepBatch`` call:
        ``frames[i]`` at ``positions[i]`` of ``session_ids[i]``. Entries succeed or fail on
        their own (see ``BatchPrediction.errors``); a malformed batch raises. ``start`` creates
        the sessions that do not exist (at position 0, on ``version``: 0 the latest). The
        sessions may be pinned to different versions: each entry is answered by its own
        (``BatchPrediction.model_versions``). Behind a hashing proxy the call goes by ``route``
        (default: this client's shared stream key), so all these sessions share a replica."""
        info = await self._version_info(model, version)
        array = as_frames(frames, info.features)
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
            model=model,
            version=version,
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
        answered = [v for v in response.model_versions if v]
        return BatchPrediction(
            session_ids=ids,
            probabilities=from_matrix(response.probabilities).copy(),
            next_positions=np.array(response.next_positions, np.int64),
            replayed=np.array(response.replayed, np.bool_),
            errors=errors,
            labels=await self._labels(model, version, max(answered, default=0)),
            model=response.model,
            model_versions=np.array(response.model_versions, np.uint64),
        )

    async def get_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        """A session's position, expiry, model and pinned version. Routed like the session's
        other calls: by the stream it was opened on in this client, else by its id (or
        ``route``); ``model`` defaults to the session's if this client opened it."""
        return await self._session_call(self._stub.GetSession, session_id, route, model)

    async def reset_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        """Back to the zero state at position 0, on the same version (routed like
        ``get_session``)."""
        return await self._session_call(self._stub.ResetSession, session_id, route, model)

    async def close_session(
        self, session_id: str, *, route: str | None = None, model: str | None = None
    ) -> SessionInfo:
        """Close the session on the server (routed like ``get_session``)."""
        return await self._session_call(self._stub.CloseSession, session_id, route, model)

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
        model: str = "",
        version: int = 0,
    ) -> AsyncSession:
        """Open a new session of ``model`` (``""``: the server's default) pinned to ``version``
        (0: the latest ready one; a draining version is ``VersionConflict``
        ``version_draining``), with a server-assigned id when None (SessionExists if taken); or
        with ``resume=True`` continue an existing one from its current position, on the
        version it is pinned to (naming another ``version`` is ``VersionConflict``).

        The session is opened, and later closed, with the route key of the stream it will use
        (``stream``, else the shared one), so behind a hashing proxy it lives on the replica
        that stream reaches."""
        mux = stream or self.multiplexer
        if resume:
            if not session_id:
                raise ValueError("resume needs the session id")
            info = await self.get_session(session_id, route=mux.route, model=model)
            if version and info.model_version and info.model_version != version:
                raise VersionConflict(
                    f"session {session_id!r} is pinned to model {info.model!r} version "
                    f"{info.model_version}, not {version}: a session keeps the version it "
                    "started on",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                    reason="version_mismatch",
                    session_id=session_id,
                )
        else:
            info = SessionInfo.from_pb(
                await self._call(
                    self._stub.OpenSession,
                    pb.OpenSessionRequest(
                        session_id=session_id or "", model=model, version=version
                    ),
                    route=mux.route,
                )
            )
            self._observe(model, version, info.model_version)
        meta = await self._version_info(model, info.model_version)
        session = AsyncSession(
            mux,
            info.session_id,
            position=info.position,
            labels=meta.labels,
            features=meta.features,
            window=min(self.window, meta.replay_window or self.window),
            closer=functools.partial(self.close_session, route=mux.route, model=info.model),
            model=info.model or model,
            version=info.model_version,
            asked=version,
        )
        self._sessions[(model, session.id)] = session
        self._sessions[(session.model, session.id)] = session  # named by the server's name too
        return session

    @contextlib.asynccontextmanager
    async def session(
        self,
        session_id: str | None = None,
        *,
        resume: bool = False,
        stream: Multiplexer | None = None,
        model: str = "",
        version: int = 0,
    ) -> AsyncIterator[AsyncSession]:
        """``async with client.session(model=...) as s:`` opens a session and closes it at the
        end (arguments as ``open_session``)."""
        session = await self.open_session(
            session_id, resume=resume, stream=stream, model=model, version=version
        )
        try:
            yield session
        finally:
            await session.close()

    # -- internals ----------------------------------------------------------------------------

    async def _version_info(self, model: str, version: int) -> ModelInfo:
        """Metadata of ``version`` of ``model`` (0: the latest), cached. A version that takes
        no new work answers GetModel no more (draining: ``version_draining``); its sessions
        then get the latest version's metadata, which serves their features and labels (a new
        version with other labels would differ only in what ``label`` prints)."""
        info = self._infos.get((model, version))
        if info is not None:
            return info
        try:
            return await self.model(model, version=version)
        except (VersionConflict, VersionUnavailable):
            if not version:
                raise
            info = self._infos[(model, version)] = await self._version_info(model, 0)
            return info

    async def _labels(self, model: str, version: int, answered: int) -> tuple[str, ...]:
        """The labels of the version that answered a request that named ``version``."""
        self._observe(model, version, answered)
        return (await self._version_info(model, answered or version)).labels

    def _observe(self, model: str, asked: int, answered: int) -> None:
        """A request that named no version was answered by ``answered``: if the latest version
        changed since its metadata was cached, forget it."""
        latest = self._infos.get((model, 0))
        if not asked and answered and latest is not None and latest.version_number != answered:
            del self._infos[(model, 0)]

    def _forget(self, model: str) -> None:
        """After a load or unload: which version is the latest may have changed."""
        for key in [k for k in self._infos if k[1] == 0 and k[0] in (model, "")]:
            del self._infos[key]

    def _session_of(self, session_id: str, model: str | None) -> AsyncSession | None:
        """The live session of this client with that id (and model, when named)."""
        if model is not None:
            return self._sessions.get((model, session_id))
        found = {id(s): s for (_, i), s in list(self._sessions.items()) if i == session_id}
        return next(iter(found.values())) if len(found) == 1 else None

    def _route_of(self, session: AsyncSession | None, session_id: str, route: str | None) -> str:
        """The route key of a call about ``session_id``: ``route`` if given, else the key of
        the stream this client opened the session on, else the id itself."""
        if route is not None:
            return check_route(route)
        return session.stream.route if session is not None else session_id

    async def _session_call(
        self,
        method: Callable[..., Awaitable[pb.SessionInfo]],
        session_id: str,
        route: str | None,
        model: str | None,
    ) -> SessionInfo:
        session = self._session_of(session_id, model)
        name = _pick(model, session.model if session else "")
        return SessionInfo.from_pb(
            await self._call(
                method,
                pb.SessionRef(session_id=session_id, model=name),
                route=self._route_of(session, session_id, route),
            )
        )

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        retry: bool = True,
        route: str | None = None,
        timeout: float | None = _UNSET,
    ) -> T:
        """One unary call; UNAVAILABLE (but ``version_unavailable``) and ABORTED
        ``session_moved`` are retried under the backoff once the server has been reached (an
        address that never answered fails at once). ``route`` goes as the ``seqserve-route``
        header (none: any replica may answer). ``timeout``: this call's, if not the client's."""
        metadata = (*self._metadata, *route_metadata(route))
        if timeout is _UNSET:
            timeout = self.timeout
        attempt, first_failure = 0, 0.0
        while True:
            try:
                response = await method(request, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc, target=self.target)
            else:
                self._contact.seen = True
                return response
            if error.code not in _NO_CONTACT or error.reason:  # a seqserve refusal: it answered
                self._contact.seen = True
            if attempt == 0:
                first_failure = time.monotonic()
            elapsed = time.monotonic() - first_failure
            again = (
                error.code is grpc.StatusCode.UNAVAILABLE and error.reason not in _NO_RETRY
            ) or error.reason in _RESEND
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


def _pick(given: T | None, default: T) -> T:
    return default if given is None else given


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
