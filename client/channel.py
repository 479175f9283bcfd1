"""Channel construction: target, TLS, call metadata (token)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

__all__ = ["TLS", "call_metadata", "make_channel"]

#: ``None`` (plaintext), ``True`` (TLS with the system roots), PEM root certificate bytes, or
#: ready ``grpc.ChannelCredentials``.
TLS: TypeAlias = bool | bytes | grpc.ChannelCredentials | None

_DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def credentials(
    tls: TLS, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials | None:
    """Channel credentials; ``cert`` and ``key`` (PEM) are a client certificate for mutual TLS
    and imply TLS (system roots unless ``tls`` gives the root certificates)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its private key, and the key its certificate")
    if isinstance(tls, grpc.ChannelCredentials):
        if cert:
            raise ValueError("give the client certificate inside your ChannelCredentials")
        return tls
    if (tls is None or tls is False) and not cert:
        return None
    if tls is None or tls is False or tls is True:
        return grpc.ssl_channel_credentials(private_key=key, certificate_chain=cert)
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(
            root_certificates=tls, private_key=key, certificate_chain=cert
        )
    raise TypeError(f"tls must be None, True, PEM bytes or grpc.ChannelCredentials, not {tls!r}")


def make_channel(
    target: str,
    tls: TLS = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    cert: bytes | None = None,
    key: bytes | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel; call from the event loop that will use it."""
    merged = dict(_DEFAULT_OPTIONS)
    merged.update(dict(options))
    creds = credentials(tls, cert, key)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=list(merged.items()))
    return grpc.aio.secure_channel(target, creds, options=list(merged.items()))


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: ``authorization: Bearer <token>`` when a token is set."""
    if token and not (token.isascii() and token.isprintable()):
        raise ValueError("token must be printable ASCII (it travels as an HTTP/2 header)")
    return (("authorization", f"Bearer {token}"),) if token else ()
