"""The gRPC front: protobuf <-> numpy, domain errors -> status codes, nothing else.

In a stream, a failed request is answered in the stream (``StepResponse.error``) and the stream
goes on; a unary call ends with the status code and the trailing metadata ``seqserve-reason`` (and
``seqserve-expected-position`` for position errors). Requests arrive decoded by ``wire.lenient``:
one that did not decode is an ``Undecodable``, refused like any malformed request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import from_matrix, to_matrix

from .auth import current_principal
from .engine import BatchResult, SessionStatus, StepResult
from .errors import (
    BadRequest,
    CapacityExceeded,
    Draining,
    ModelError,
    NotAllowed,
    PositionError,
    SeqServeError,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StoreUnavailable,
    UnknownModel,
    VersionDraining,
    VersionMismatch,
    VersionRetired,
    VersionUnavailable,
)
from .metrics import Metrics
from .models import Models
from .streams import Drained, Streams
from .wire import Undecodable, decoded

__all__ = ["STATUS_CODES", "SeqServeServicer", "decode_matrix"]

log = logging.getLogger("seqserve.servicer")

STATUS_CODES: dict[type[SeqServeError], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    PositionError: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionExists: grpc.StatusCode.ALREADY_EXISTS,
    Draining: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    SessionMoved: grpc.StatusCode.ABORTED,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    VersionRetired: grpc.StatusCode.NOT_FOUND,
    VersionUnavailable: grpc.StatusCode.UNAVAILABLE,
    VersionDraining: grpc.StatusCode.FAILED_PRECONDITION,
    VersionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
}


def decode_matrix(m: pb.Matrix, features: int, what: str = "frames") -> np.ndarray:
    try:
        return from_matrix(m, features)
    except ValueError as exc:
        raise BadRequest(
            f"{what}: {exc} (model has {features} features)", reason="bad_frames"
        ) from None


def _status_code(exc: Exception) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _error(exc: Exception) -> pb.Error:
    if not isinstance(exc, SeqServeError):
        log.error("unexpected error", exc_info=exc)
        return pb.Error(
            code=grpc.StatusCode.INTERNAL.value[0], reason="internal", message="internal error"
        )
    return pb.Error(
        code=_status_code(exc).value[0],
        reason=exc.reason,
        message=str(exc),
        expected_position=_expected(exc),
    )


def _expected(exc: Exception) -> int:
    if isinstance(exc, PositionError):
        return exc.expected
    if isinstance(exc, (SessionNotFound, VersionRetired)):
        return exc.position
    return 0


def _session_info(status: SessionStatus) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=status.session_id,
        position=status.position,
        idle_seconds=status.idle_seconds,
        expires_in_seconds=status.expires_in_seconds,
        closed=status.closed,
        rolled_back=status.rolled_back,
        model=status.model,
        model_version=status.version,
    )


class SeqServeServicer(pb_grpc.SeqServeServicer):
    def __init__(self, models: Models, metrics: Metrics) -> None:
        self.models = models
        self.metrics = metrics
        self.settings = models.settings
        self._streams = Streams(self.settings.stream_inflight, lambda: models.draining)
        # Every (rpc, code) series of the default model exists from the start, so rate() sees
        # the first error too.
        metrics.declare(_RPCS, (c.name for c in _REPORTED_CODES), "native", models.default, "")

    def _model(self, name: str) -> str:
        """The model label of a request (the default for none; "" for an unknown one)."""
        found = self.models.models.get(name or self.models.default)
        return found.name if found is not None else ""

    def _features(self, name: str) -> int:
        """Features per frame of the model's latest version (the codec's hint for a Matrix
        that leaves cols 0; every version checks the frames against its own)."""
        return self.models.model(name).features

    def drain(self) -> None:
        """Ask every open stream to end (UNAVAILABLE) once its accepted requests are answered."""
        self._streams.drain()

    def _done(
        self, rpc: str, started: float, code: grpc.StatusCode, model: str = "", version: int = 0
    ) -> None:
        self.metrics.request(
            rpc,
            "native",
            model,
            str(version) if version else "",
            code.name,
            time.perf_counter() - started,
        )

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        started: float,
        exc: Exception,
        model: str = "",
    ) -> None:
        code = _status_code(exc)
        self._done(rpc, started, code, self._model(model))
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", rpc, exc_info=exc)
            await context.abort(code, "internal error")
        assert isinstance(exc, SeqServeError)
        context.set_trailing_metadata(
            (
                ("seqserve-reason", exc.reason),
                ("seqserve-expected-position", str(_expected(exc))),
            )
        )
        await context.abort(code, str(exc))

    # -- steps --------------------------------------------------------------------------------

    def _submit(self, request: pb.StepRequest | Undecodable) -> asyncio.Future[StepResult]:
        request = decoded(request)
        frames = decode_matrix(request.frames, self._features(request.model))
        return self.models.submit(
            request.model,
            request.version,
            request.session_id,
            request.position,
            frames,
            start=request.start,
            end=request.end,
            principal=current_principal(),
        )

    def _response(self, request: pb.StepRequest, result: StepResult) -> pb.StepResponse:
        probs = result.probabilities
        if request.output == pb.LAST_FRAME:
            probs = probs[-1:]
        return pb.StepResponse(
            session_id=result.session_id,
            position=result.position,
            frames=len(result.probabilities),
            probabilities=to_matrix(probs),
            top_class=probs.argmax(axis=1).tolist(),
            next_position=result.next_position,
            replayed=result.replayed,
            ended=result.ended,
            tag=request.tag,
            model=self._model(request.model),
            model_version=result.version,
        )

    async def Step(
        self, request: pb.StepRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        return await self._unary("Step", request, context, self._submit, self._response)

    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.StepRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StepResponse]:
        async for response in self._stream(
            "Stream", request_iterator, context, self._submit, self._response, self._step_error
        ):
            yield response

    async def StepBatch(
        self, request: pb.StepBatchRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.StepBatchResponse:
        return await self._unary(
            "StepBatch", request, context, self._submit_batch, self._batch_response
        )

    async def _unary(
        self,
        rpc: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        submit: Callable[[Any], Any],
        respond: Callable[[Any, Any], Any],
    ) -> Any:
        started = time.perf_counter()
        try:
            result = await submit(request)
        except Exception as exc:
            await self._abort(context, rpc, started, exc, _model_of(request))
        response = respond(request, result)
        self._answered(rpc, started, response)
        return response

    def _answered(self, rpc: str, started: float, response: Any) -> None:
        """Count a successful answer under the model and version that gave it."""
        version = response.model_version if hasattr(response, "model_version") else 0
        if not version and hasattr(response, "model_versions") and len(response.model_versions):
            version = max(response.model_versions)
        self._done(rpc, started, grpc.StatusCode.OK, response.model, version)

    async def StreamBatch(
        self,
        request_iterator: AsyncIterator[pb.StepBatchRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StepBatchResponse]:
        async for response in self._stream(
            "StreamBatch",
            request_iterator,
            context,
            self._submit_batch,
            self._batch_response,
            self._batch_error,
        ):
            yield response

    def _submit_batch(
        self, request: pb.StepBatchRequest | Undecodable
    ) -> asyncio.Future[BatchResult]:
        request = decoded(request)
        entries = len(request.session_ids)
        features = self._features(request.model)
        frames = (
            decode_matrix(request.frames, features)
            if entries or request.frames.data
            else np.zeros((0, features), np.float32)
        )
        return self.models.submit_batch(
            request.model,
            request.version,
            request.session_ids,
            request.positions,
            frames,
            start=request.start,
            principal=current_principal(),
        )

    def _batch_response(
        self, request: pb.StepBatchRequest, result: BatchResult
    ) -> pb.StepBatchResponse:
        probs = result.probabilities
        response = pb.StepBatchResponse(
            probabilities=to_matrix(probs),
            top_class=probs.argmax(axis=1).tolist(),
            next_positions=result.next_positions.tolist(),
            replayed=result.replayed.tolist(),
            tag=request.tag,
            model=self._model(request.model),
            model_versions=result.versions.tolist(),
        )
        for index, exc in sorted(result.errors.items()):
            response.errors.add(index=index, error=_error(exc))
        return response

    # -- streams ------------------------------------------------------------------------------

    async def _stream(
        self,
        rpc: str,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        submit: Callable[[Any], Any],
        respond: Callable[[Any, Any], Any],
        failed: Callable[[str, Any, float, Exception], Any],
    ) -> AsyncIterator[Any]:
        """Answers as they settle (``streams.Streams``); ``failed`` turns an error into that
        RPC's response message and the stream goes on."""
        try:
            async for response in self._streams.serve(
                requests,
                functools.partial(_ticket, submit),
                functools.partial(self._settled, rpc, respond, failed),
                functools.partial(failed, rpc),
            ):
                yield response
        except Drained:
            context.set_trailing_metadata((("seqserve-reason", "draining"),))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining; resume from your last acknowledged position after it restarts",
            )

    def _settled(
        self,
        rpc: str,
        respond: Callable[[Any, Any], Any],
        failed: Callable[[str, Any, float, Exception], Any],
        request: Any,
        started: float,
        future: asyncio.Future[Any],
    ) -> Any:
        """The response message of a settled request."""
        exc = future.exception() if not future.cancelled() else Draining("cancelled")
        if exc is not None:
            return failed(rpc, request, started, exc)  # type: ignore[arg-type]
        response = respond(request, future.result())
        self._answered(rpc, started, response)
        return response

    def _step_error(
        self, rpc: str, request: pb.StepRequest | Undecodable, started: float, exc: Exception
    ) -> pb.StepResponse:
        error = _error(exc)
        model = self._model(_model_of(request))
        self._done(rpc, started, grpc.StatusCode(_CODES[error.code]), model)
        return pb.StepResponse(
            session_id=request.session_id,
            position=request.position,
            tag=request.tag,
            error=error,
            next_position=_expected(exc),
            model=model,
        )

    def _batch_error(
        self, rpc: str, request: pb.StepBatchRequest | Undecodable, started: float, exc: Exception
    ) -> pb.StepBatchResponse:
        """The whole message failed (malformed, undecodable, draining): every entry carries the
        error (no entries: one error at index 0)."""
        error = _error(exc)
        model = self._model(_model_of(request))
        self._done(rpc, started, grpc.StatusCode(_CODES[error.code]), model)
        entries = 0 if isinstance(request, Undecodable) else len(request.session_ids)
        classes = self._classes(_model_of(request))
        return pb.StepBatchResponse(
            probabilities=pb.Matrix(rows=entries, cols=classes, data=bytes(4 * entries * classes)),
            top_class=[0] * entries,
            next_positions=[_expected(exc)] * entries,
            replayed=[False] * entries,
            tag=request.tag,
            errors=[pb.EntryError(index=i, error=error) for i in range(max(entries, 1))],
            model=model,
            model_versions=[0] * entries,
        )

    def _classes(self, name: str) -> int:
        try:
            return self.models.model(name).stateless(0).spec.classes
        except SeqServeError:
            return 0

    # -- whole sequences ----------------------------------------------------------------------

    async def Predict(
        self, request: pb.PredictRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        per_step = False
        try:
            request = decoded(request)
            per_step = request.per_step
            engine = self.models.model(request.model).stateless(request.version)
            features = engine.spec.features
            sequences = [
                decode_matrix(s.frames, features, f"sequence {i}")
                for i, s in enumerate(request.sequences)
            ]
            outputs = await engine.predict(sequences)
        except Exception as exc:
            await self._abort(context, "Predict", started, exc, _model_of(request))
        response = pb.PredictResponse(model=engine.model, model_version=engine.version)
        for probs in outputs:
            prediction = response.predictions.add(
                probabilities=to_matrix(probs[-1:]), top_class=int(probs[-1].argmax())
            )
            if per_step:
                prediction.per_step.CopyFrom(to_matrix(probs))
        self._answered("Predict", started, response)
        return response

    # -- sessions and model -------------------------------------------------------------------

    async def _session_call(
        self,
        rpc: str,
        call: Callable[[Any, str], Any],
        context: grpc.aio.ServicerContext,
        request: pb.OpenSessionRequest | pb.SessionRef | Undecodable,
    ) -> pb.SessionInfo:
        started = time.perf_counter()
        try:
            status = call(decoded(request), current_principal())
            if asyncio.iscoroutine(status):
                status = await status
        except Exception as exc:
            await self._abort(context, rpc, started, exc, _model_of(request))
        info = _session_info(status)
        self._answered(rpc, started, info)
        return info

    async def OpenSession(
        self, request: pb.OpenSessionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        return await self._session_call(
            "OpenSession",
            lambda r, p: self.models.open(r.model, r.version, r.session_id, p),
            context,
            request,
        )

    async def GetSession(
        self, request: pb.SessionRef | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        return await self._session_call(
            "GetSession",
            lambda r, p: self.models.lookup(r.model, r.session_id, p),
            context,
            request,
        )

    async def ResetSession(
        self, request: pb.SessionRef | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        return await self._session_call(
            "ResetSession",
            lambda r, p: self.models.reset(r.model, r.session_id, p),
            context,
            request,
        )

    async def CloseSession(
        self, request: pb.SessionRef | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        return await self._session_call(
            "CloseSession",
            lambda r, p: self.models.close(r.model, r.session_id, p),
            context,
            request,
        )

    async def GetModel(
        self, request: pb.ModelRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        started = time.perf_counter()
        try:
            request = decoded(request)
            model = self.models.model(request.model)
            engine = model.stateless(request.version)
        except Exception as exc:
            await self._abort(context, "GetModel", started, exc, _model_of(request))
        spec, settings = engine.spec, self.settings
        version = model.versions[engine.version]
        latest = model.latest()
        self._done("GetModel", started, grpc.StatusCode.OK, model.name, engine.version)
        return pb.ModelInfo(
            name=spec.name,
            version=str(engine.version),
            features=spec.features,
            labels=spec.labels,
            states=[
                pb.StateSpec(name=s.name, layer=s.layer, kind=s.kind, size=s.size)
                for s in engine.runtime.base_states
            ],
            layers=[
                pb.LayerSpec(
                    name=la.name,
                    type=la.type,
                    units=la.units,
                    input_size=la.input_size,
                    parameters=la.params,
                    activation=la.activation,
                )
                for la in spec.layers
            ],
            parameters=spec.parameters,
            state_bytes=4 * spec.state_floats,
            device=engine.runtime.device,
            max_frames_per_request=settings.max_frames_per_request,
            session_idle_timeout_seconds=settings.session_idle_timeout,
            replay_window=settings.replay_window,
            state=version.state,
            latest=latest is version,
            fingerprint=spec.fingerprint,
            max_message_bytes=settings.max_message_bytes,
            serving_mode=spec.mode,
            window=spec.window,
        )

    # -- the repository -----------------------------------------------------------------------

    def _model_list(self) -> pb.ModelList:
        out = pb.ModelList(default_model=self.models.default)
        for info in self.models.list():
            status = out.versions.add(
                model=info.model,
                version=info.version,
                state=info.state,
                sessions=info.sessions,
                fingerprint=info.fingerprint,
                load_seconds=info.load_seconds,
                default_model=info.default,
                latest=info.latest,
            )
            status.reason = info.reason  # why it is in that state (not an error reason)
        for model in self.models.models.values():
            for problem in model.problems:
                path, _, why = problem.partition(": ")
                out.problems.add(path=path, why=why)
        return out

    async def ListModels(
        self, request: pb.ListModelsRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ModelList:
        started = time.perf_counter()
        if isinstance(request, Undecodable):
            await self._abort(context, "ListModels", started, request.error())
        listed = self._model_list()
        self._done("ListModels", started, grpc.StatusCode.OK)
        return listed

    async def LoadModel(
        self, request: pb.LoadModelRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ModelList:
        return await self._repository_call("LoadModel", self.models.load, context, request)

    async def UnloadModel(
        self, request: pb.LoadModelRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ModelList:
        return await self._repository_call("UnloadModel", self.models.unload, context, request)

    async def _repository_call(
        self,
        rpc: str,
        call: Any,
        context: grpc.aio.ServicerContext,
        request: pb.LoadModelRequest | Undecodable,
    ) -> pb.ModelList:
        started = time.perf_counter()
        model = _model_of(request)
        try:
            version = decoded(request).version
            if not model:
                raise BadRequest("name the model to load or unload", reason="bad_request")
            await call(model, version, current_principal())
        except ModelError as exc:
            await self._abort(
                context, rpc, started, VersionUnavailable(f"load failed: {exc}"), model
            )
        except Exception as exc:
            await self._abort(context, rpc, started, exc, model)
        self._done(rpc, started, grpc.StatusCode.OK, self._model(model))
        return self._model_list()


_RPCS = (
    "Stream",
    "Step",
    "StepBatch",
    "StreamBatch",
    "Predict",
    "OpenSession",
    "GetSession",
    "ResetSession",
    "CloseSession",
    "GetModel",
)


def _ticket(
    submit: Callable[[Any], asyncio.Future[Any]], request: Any
) -> tuple[Any, asyncio.Future[Any]]:
    """A native request is its own ticket."""
    return request, submit(request)


def _model_of(request: object) -> str:
    """The model a request names ("" for one that did not decode)."""
    return "" if isinstance(request, Undecodable) else str(getattr(request, "model", ""))


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_REPORTED_CODES = (grpc.StatusCode.OK, *STATUS_CODES.values(), grpc.StatusCode.INTERNAL)
