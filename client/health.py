"""The standard gRPC health check, encoded by hand: the base install has no health stubs.

``grpc.health.v1.HealthCheckRequest`` is ``{string service = 1}`` and ``HealthCheckResponse`` is
``{ServingStatus status = 1}``; a few lines of protobuf wire format cover both."""

from __future__ import annotations

__all__ = ["HEALTH_CHECK", "decode_status", "encode_request"]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def encode_request(service: str) -> bytes:
    """``grpc.health.v1.HealthCheckRequest`` by hand: the base install has no health stubs."""
    raw = service.encode()
    if not raw:
        return b""
    return b"\x0a" + _varint(len(raw)) + raw


def decode_status(data: bytes) -> str:
    """The ``status`` (field 1, varint) of a ``HealthCheckResponse``."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key == 0x08:
            value, i = _read_varint(data, i)
            return _STATUS.get(value, str(value))
        if key & 7 == 0:
            _, i = _read_varint(data, i)
        elif key & 7 == 2:
            length, i = _read_varint(data, i)
            i += length
        else:
            break
    return "UNKNOWN"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data):
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, i
