"""``inference.GRPCInferenceService`` on the server's gRPC port: protobuf <-> plain values, domain
errors -> status codes, nothing else.

Served through one generic handler: the methods of proto/inference.proto, and for any other
method of the service an UNIMPLEMENTED status that names it. A unary call that fails ends with
the status (and trailing metadata ``seqserve-reason``, plus ``seqserve-expected-position`` for
position errors); on ``ModelStreamInfer`` a failed request is answered in the stream
(``error_message``; ``infer_response`` carries the request id and the same two values as
parameters) and the stream goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from seqserve.proto import inference as pb

from ..auth import current_principal
from ..engine import StepResult
from ..errors import BadRequest, Draining
from ..streams import Drained, Streams
from . import infer
from .front import OipFront, error_message, expected_position, status_of
from .sequences import ParamValue

__all__ = ["InferenceService"]

log = logging.getLogger("seqserve.oip.grpc")

PROTOCOL = "oip-grpc"
_PREFIX = f"/{pb.SERVICE}/"
_TYPED = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp64_contents",
    "bytes_contents",
)


def _params(parameters: Any) -> dict[str, ParamValue]:
    values: dict[str, ParamValue] = {}
    for key in parameters:  # (the map's items() view is several times slower)
        param = parameters[key]
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            values[key] = getattr(param, which)
    return values


def _set_param(parameters: Any, key: str, value: ParamValue) -> None:
    if isinstance(value, bool):
        parameters[key].bool_param = value
    elif isinstance(value, int):
        parameters[key].int64_param = value
    else:
        parameters[key].string_param = str(value)


def _input(tensor: Any, raw: bytes | None) -> infer.InputTensor:
    values = None
    if tensor.HasField("contents"):
        contents = tensor.contents
        for name in _TYPED:
            if len(getattr(contents, name)):
                raise BadRequest(
                    f"input {tensor.name!r}: FP32 data goes in fp32_contents (or "
                    f"raw_input_contents), not {name}",
                    reason="bad_frames",
                )
        if len(contents.fp32_contents):
            values = contents.fp32_contents
    return infer.InputTensor(tensor.name, tensor.datatype, tensor.shape, raw, values)


def _requested(out: Any) -> infer.RequestedOutput:
    param = out.parameters.get("classification")
    k = 0
    if param is not None:
        which = param.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param"):
            raise BadRequest(
                f"output {out.name!r}: classification must be an integer", reason="bad_parameter"
            )
        k = getattr(param, which)
    return infer.RequestedOutput(out.name, k)


class InferenceService(grpc.GenericRpcHandler):
    def __init__(self, front: OipFront) -> None:
        self.front = front
        self.models = front.models
        self._streams = Streams(
            front.settings.stream_inflight, lambda: front.models.models.draining
        )
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, (kind, request, _) in pb.METHODS.items():
            behaviour = getattr(self, name)
            if kind == "stream":
                self._handlers[name] = grpc.stream_stream_rpc_method_handler(
                    behaviour,
                    request_deserializer=request.FromString,
                    response_serializer=_serialize,
                )
            else:
                self._handlers[name] = grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._unary, name, behaviour),
                    request_deserializer=request.FromString,
                    response_serializer=_serialize,
                )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(_PREFIX):
            return None
        name = method[len(_PREFIX) :]
        found = self._handlers.get(name)
        if found is not None:
            return found
        return grpc.unary_unary_rpc_method_handler(
            functools.partial(_unimplemented, name),
            request_deserializer=None,
            response_serializer=None,
        )

    def drain(self) -> None:
        """End every open stream (UNAVAILABLE) once its accepted requests are answered."""
        self._streams.drain()

    # -- unary calls --------------------------------------------------------------------------

    async def _unary(
        self,
        rpc: str,
        behaviour: Callable[[Any], Any],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        started = time.perf_counter()
        try:
            response = behaviour(request)
            if asyncio.iscoroutine(response):
                response = await response
        except Exception as exc:
            await self._abort(context, rpc, started, exc)
        self.front.done(rpc, PROTOCOL, started, "OK")
        return response

    async def _abort(
        self, context: grpc.aio.ServicerContext, rpc: str, started: float, exc: Exception
    ) -> None:
        code, _ = status_of(exc)
        self.front.done(rpc, PROTOCOL, started, code)
        if code == "INTERNAL":
            log.error("%s failed", rpc, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        metadata = [("seqserve-reason", getattr(exc, "reason", "error"))]
        expected = expected_position(exc)
        if expected is not None:
            metadata.append(("seqserve-expected-position", str(expected)))
        context.set_trailing_metadata(tuple(metadata))
        await context.abort(grpc.StatusCode[code], error_message(exc))

    def ServerLive(self, request: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.front.ready)

    def ModelReady(self, request: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.models.ready(request.name, request.version))

    def ServerMetadata(self, request: Any) -> Any:
        return json_format.ParseDict(self.front.server_metadata(), pb.ServerMetadataResponse())

    def ModelMetadata(self, request: Any) -> Any:
        return json_format.ParseDict(
            self.front.model_metadata(request.name, request.version), pb.ModelMetadataResponse()
        )

    def ModelConfig(self, request: Any) -> Any:
        response = pb.ModelConfigResponse()
        json_format.ParseDict(
            self.front.model_config(request.name, request.version), response.config
        )
        return response

    def ModelStatistics(self, request: Any) -> Any:
        stats = self.front.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    def RepositoryIndex(self, request: Any) -> Any:
        models = self.front.repository_index(request.ready)
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any) -> Any:
        await self.front.load(
            request.model_name, bool(len(request.parameters)), current_principal()
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any) -> Any:
        await self.front.unload(request.model_name, current_principal())
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: Any) -> Any:
        call = None
        try:
            call = self._prepare(request)
            result = await self.front.start(call, current_principal())
        except Exception as exc:
            raise infer.explain(call, exc) from None
        return self._response(request, call, result, pb.ModelInferResponse())

    # -- inference ----------------------------------------------------------------------------

    def _prepare(self, request: Any) -> infer.InferCall:
        raw, tensors = request.raw_input_contents, request.inputs
        if not len(raw):
            inputs = [_input(tensor, None) for tensor in tensors]
        elif len(raw) == len(tensors):
            inputs = [_input(tensor, data) for tensor, data in zip(tensors, raw, strict=True)]
        else:
            raise BadRequest(
                f"{len(raw)} raw_input_contents for {len(tensors)} inputs: give one "
                "per input, or none",
                reason="bad_frames",
            )
        return infer.prepare(
            self.models,
            request.model_name,
            request.model_version,
            request.id,
            _params(request.parameters),
            inputs,
            [_requested(out) for out in request.outputs],
        )

    def _response(self, request: Any, call: infer.InferCall, result: Any, response: Any) -> Any:
        """Fill ``response`` (a ModelInferResponse, or a stream reply's own ``infer_response``:
        built in place, not copied in)."""
        version = result.version if isinstance(result, StepResult) else call.engine.version
        response.model_name = call.spec.name
        response.model_version = str(version)
        response.id = request.id
        if isinstance(result, StepResult):
            response.parameters["sequence_position"].int64_param = result.position
            response.parameters["sequence_next_position"].int64_param = result.next_position
            if result.replayed:
                response.parameters["sequence_replayed"].bool_param = True
        for tensor in infer.outputs(call, infer.probabilities(result)):
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(tensor.raw())
        return response

    def _stream_error(self, request: Any, started: float, exc: BaseException) -> Any:
        code, _ = status_of(exc)
        if code == "INTERNAL":
            log.error("ModelStreamInfer request failed", exc_info=exc)
        self.front.done("ModelStreamInfer", PROTOCOL, started, code)
        reply = pb.ModelStreamInferResponse(error_message=error_message(exc))
        answer = reply.infer_response
        answer.model_name, answer.model_version, answer.id = (
            request.model_name,
            request.model_version,
            request.id,
        )
        _set_param(answer.parameters, "seqserve_reason", getattr(exc, "reason", "internal"))
        expected = expected_position(exc)
        if expected is not None:
            _set_param(answer.parameters, "sequence_expected_position", expected)
        return reply

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Answers as they settle (``streams.Streams``: one sequence's in the order read); a
        failed request is answered in the stream, which goes on."""
        try:
            async for reply in self._streams.serve(
                requests,
                functools.partial(self._stream_submit, current_principal()),
                self._stream_answer,
                self._stream_error,
            ):
                yield reply
        except Drained:
            context.set_trailing_metadata((("seqserve-reason", "draining"),))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining; resend unanswered requests after it restarts "
                "(with sequence_position, nothing is applied twice)",
            )

    def _stream_submit(
        self, principal: str, request: Any
    ) -> tuple[tuple[Any, infer.InferCall], asyncio.Future[Any]]:
        call = None
        try:
            call = self._prepare(request)
            return (request, call), self.front.start(call, principal)
        except Exception as exc:
            raise infer.explain(call, exc) from None

    def _stream_answer(
        self,
        ticket: tuple[Any, infer.InferCall],
        started: float,
        future: asyncio.Future[Any],
    ) -> Any:
        request, call = ticket
        if future.cancelled():
            exc: BaseException | None = Draining("cancelled")
        else:
            exc = future.exception()
        if exc is None:
            reply = pb.ModelStreamInferResponse()
            try:
                self._response(request, call, future.result(), reply.infer_response)
            except Exception as failure:
                exc = failure
            else:
                self.front.done("ModelStreamInfer", PROTOCOL, started, "OK")
                return reply
        return self._stream_error(request, started, infer.explain(call, exc))


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


async def _unimplemented(name: str, request: bytes, context: grpc.aio.ServicerContext) -> None:
    implemented = ", ".join(sorted(pb.METHODS))
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{pb.SERVICE}/{name} is not implemented by seqserve (it implements {implemented})",
    )
