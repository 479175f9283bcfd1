"""Registering the SeqServe service with request decoders that never raise.

grpc-python decodes a request with the handler's ``request_deserializer`` before the servicer
sees it; the generated registration uses ``Message.FromString``, whose ``DecodeError`` grpc turns
into ``UNKNOWN`` and which ends a whole stream (every session on it) at the first bad message.
Here a message that does not parse becomes an ``Undecodable`` value instead, which the servicer
answers like any bad request: ``INVALID_ARGUMENT`` ``undecodable``, in the stream for ``Stream``
and ``StreamBatch``, and the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from seqserve.proto import seqserve_pb2 as pb

from .errors import BadRequest

__all__ = ["SERVICE", "Undecodable", "add_to_server", "decoded", "lenient"]

log = logging.getLogger("seqserve.wire")

SERVICE = pb.DESCRIPTOR.services_by_name["SeqServe"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes are not a valid message of its method's type. What could still be
    read of it (session id, position, tag) is kept so an in-stream answer can echo it."""

    message_type: str
    problem: str
    session_id: str = ""
    position: int = 0
    tag: int = 0

    def error(self) -> BadRequest:
        return BadRequest(
            f"the request is not a valid {self.message_type} message ({self.problem}): corrupt "
            "or truncated bytes, another message type, or a string field that is not UTF-8",
            reason="undecodable",
        )


def decoded(request: T | Undecodable) -> T:
    """The request, or BadRequest ``undecodable`` if it did not decode."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def _envelope_types() -> dict[str, Any]:
    """Per request type with a session id, position or tag: a message holding just those fields
    (the id as bytes), which still parses when the full message does not (a bad UTF-8 id, a
    corrupt frames matrix, which it skips as an unknown field)."""
    kept = {"session_id": "TYPE_BYTES", "position": "TYPE_UINT64", "tag": "TYPE_UINT64"}
    file = descriptor_pb2.FileDescriptorProto(
        name="seqserve/server/envelopes.proto", package="seqserve.envelopes", syntax="proto3"
    )
    for message in (pb.StepRequest, pb.StepBatchRequest):
        envelope = file.message_type.add(name=message.DESCRIPTOR.name)
        for field in message.DESCRIPTOR.fields:
            if field.name in kept:
                envelope.field.add(
                    name=field.name,
                    number=field.number,
                    type=getattr(descriptor_pb2.FieldDescriptorProto, kept[field.name]),
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        message.DESCRIPTOR.full_name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"seqserve.envelopes.{message.DESCRIPTOR.name}")
        )
        for message in (pb.StepRequest, pb.StepBatchRequest)
    }


_ENVELOPES = _envelope_types()


def _undecodable(name: str, data: bytes, exc: Exception) -> Undecodable:
    problem = str(exc).rpartition(": ")[2] or type(exc).__name__
    envelope_type = _ENVELOPES.get(name)
    if envelope_type is None:
        return Undecodable(name, problem)
    try:
        envelope = envelope_type.FromString(data)
    except Exception:  # nothing readable at all
        return Undecodable(name, problem)
    raw_id = getattr(envelope, "session_id", b"")
    try:
        session_id = raw_id.decode("utf-8")
    except UnicodeDecodeError:
        session_id = ""  # a string field cannot carry it back
    return Undecodable(
        name, problem, session_id, getattr(envelope, "position", 0), getattr(envelope, "tag", 0)
    )


def lenient(message: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising."""
    parse = message.FromString
    name = message.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or whatever else the parser may raise
            log.debug("undecodable %s (%d bytes): %s", name, len(data), exc)
            return _undecodable(name, data, exc)

    return decode


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """What the generated ``add_SeqServeServicer_to_server`` does, every method's request
    decoded by ``lenient``."""
    handlers = {}
    for method in SERVICE.methods:
        factory: Any = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
