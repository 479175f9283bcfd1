"""Access control at the gRPC edge: TLS credentials, bearer tokens, the caller's principal.

An interceptor authenticates every call except the health service (orchestrator probes send no
token) and runs the handler with the caller's principal in ``current_principal()``; the servicer
passes it to the engine as a plain str. A call authenticates with ``authorization: Bearer
<token>`` (compared in constant time) or, under mutual TLS, with its client certificate, whose
common name is then the principal. Tokens are never logged.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc

from .settings import Settings

__all__ = [
    "AuthInterceptor",
    "ConfigError",
    "current_principal",
    "load_tokens",
    "server_credentials",
]

log = logging.getLogger("seqserve.auth")

EXEMPT_PREFIX = "/grpc.health.v1.Health/"
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
_principal: contextvars.ContextVar[str] = contextvars.ContextVar("seqserve_principal", default="")


class ConfigError(ValueError):
    """TLS or token settings that cannot be used; the message says which and why."""


def current_principal() -> str:
    """The authenticated caller of the running handler ("" when authentication is off)."""
    return _principal.get()


def _read(path: str, what: str, pem: str = "") -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path!r}: cannot read ({exc.strerror or exc})") from None
    if pem and f"-----BEGIN {pem}".encode() not in data:
        raise ConfigError(f"{what} {path!r}: no PEM {pem.lower()} in it")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual with ``tls_client_ca``) credentials, or None for plaintext."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not settings.tls_cert:
        if settings.tls_client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    cert = _read(settings.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _read(settings.tls_key, "--tls-key")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"--tls-key {settings.tls_key!r}: no PEM private key in it")
    roots = (
        _read(settings.tls_client_ca, "--tls-client-ca", "CERTIFICATE")
        if settings.tls_client_ca
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=roots, require_client_auth=roots is not None
    )


def load_tokens(settings: Settings) -> dict[bytes, str]:
    """Accepted tokens -> principal, from ``tokens_file`` and ``auth_token``. Raises ConfigError on
    a malformed file (line number given, never the token)."""
    tokens: dict[bytes, str] = {}

    def add(principal: str, token: str, where: str) -> None:
        if not _PRINCIPAL_RE.fullmatch(principal):
            raise ConfigError(
                f"{where}: principal {principal!r} must be 1-128 characters of [A-Za-z0-9._@:-]"
            )
        if len(token) < 16 or not (token.isascii() and token.isprintable()) or " " in token:
            raise ConfigError(
                f"{where}: token must be 16 or more printable ASCII characters without spaces"
            )
        if token.encode() in tokens:
            raise ConfigError(f"{where}: token already given to another principal")
        tokens[token.encode()] = principal

    if settings.tokens_file:
        text = _read(settings.tokens_file, "--tokens-file").decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            principal, sep, token = line.partition(":")
            where = f"--tokens-file {settings.tokens_file!r} line {number}"
            if not sep:
                raise ConfigError(f"{where}: expected 'principal:token'")
            add(principal.strip(), token.strip(), where)
        if not tokens:
            raise ConfigError(f"--tokens-file {settings.tokens_file!r}: no tokens in it")
    if settings.auth_token:
        add("default", settings.auth_token, "--auth-token")
    return tokens


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses unauthenticated calls with UNAUTHENTICATED (``seqserve-reason: unauthenticated``)
    and runs the others with their principal set."""

    def __init__(self, tokens: dict[bytes, str], *, certificates: bool = False) -> None:
        self.tokens = tokens
        self.certificates = certificates  # mutual TLS: a verified client CN is a principal

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)  # None: no such method
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIX):
            return handler
        return _wrap(handler, self._authenticate, method)

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return self._principal_of(token.strip().encode("utf-8", "replace"))
        if self.certificates:
            names = list(context.auth_context().get("x509_common_name") or ())
            if names:
                name = names[0].decode("utf-8", "replace")
                return name if _PRINCIPAL_RE.fullmatch(name) else None
        return None

    def _principal_of(self, token: bytes) -> str | None:
        found = None
        for known, principal in self.tokens.items():  # no early exit: time says nothing
            if hmac.compare_digest(known, token):
                found = principal
        return found


_REFUSAL = "missing or invalid credentials: send 'authorization: Bearer <token>'"


async def _refuse(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    log.debug("refused %s from %s: no valid credentials", method, context.peer())
    context.set_trailing_metadata((("seqserve-reason", "unauthenticated"),))
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
    raise AssertionError("abort returned")


# A method's function on a grpc.aio server: a coroutine function (unary response) or an async
# generator function (or a coroutine function writing with context.write()) for streams, of any
# request type. grpc's stubs type RpcMethodHandler's behaviours as sync functions of a sync
# ServicerContext only.
_AioBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> _AioBehavior:
    found = (
        handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    )
    if found is None:
        raise TypeError("a method handler without a behaviour")
    return cast(_AioBehavior, found)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    authenticate: Callable[[grpc.aio.ServicerContext[Any, Any]], str | None],
    method: str,
) -> grpc.RpcMethodHandler[Any, Any]:
    behavior = _behavior(handler)
    if handler.unary_unary or handler.stream_unary:

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal = authenticate(context)
            if principal is None:
                await _refuse(context, method)
            _principal.set(principal)  # this call's task only
            return await behavior(request, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        principal = authenticate(context)
        if principal is None:
            await _refuse(context, method)
        _principal.set(principal)
        result = behavior(request, context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        else:  # a handler that writes with context.write()
            await result

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        streaming,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
