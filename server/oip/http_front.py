"""The KServe v2 REST API (``/v2/...``) on ``--http-port``, served by aiohttp on the server's own
event loop (an ``AppRunner`` and a ``SockSite``, which install no signal handlers: the server's
``main`` keeps SIGTERM/SIGINT and drains this front with the rest).

JSON in and out, and the binary tensor data extension (``Inference-Header-Content-Length``: the
JSON header, then each binary input's bytes in order), which ``tritonclient.http`` uses by
default. Errors are ``{"error": "..."}`` with a 4xx/5xx status; responses also carry the gRPC
code name and the machine-readable reason in ``seqserve-code`` / ``seqserve-reason`` headers.
Authentication is the gRPC front's: ``Authorization: Bearer <token>`` (or, under mutual TLS, the
client certificate's CN); the health endpoints need none, as probes send none.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from ..engine import StepResult
from ..errors import BadRequest, SeqServeError
from ..settings import Settings
from . import infer
from .front import OipFront, error_message, expected_position, status_of
from .sequences import ParamValue

__all__ = ["HttpFront", "bind_socket"]

log = logging.getLogger("seqserve.oip.http")

PROTOCOL = "oip-http"
HEADER_LENGTH = "Inference-Header-Content-Length"
_PUBLIC = ("/v2/health/live", "/v2/health/ready")
# The caller, kept on the request. aiohttp 3.14+ warns about plain string keys and offers typed
# ones; older releases (the floor is 3.9) take the string.
_PRINCIPAL: web.RequestKey[str] | str = (
    web.RequestKey("principal", str) if hasattr(web, "RequestKey") else "principal"
)
_HTTP_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Unauthenticated(SeqServeError):
    reason = "unauthenticated"


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound now so ``create_server`` knows the port (0 picks one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the REST port {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpFront:
    def __init__(
        self,
        front: OipFront,
        settings: Settings,
        sock: socket.socket,
        tokens: dict[bytes, str],
    ) -> None:
        self.front = front
        self.models = front.models
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.tokens = tokens
        self.certificates = bool(settings.tls_client_ca)
        self.ssl = _ssl_context(settings)
        self.app = web.Application(
            middlewares=[self._errors], client_max_size=settings.max_message_bytes
        )
        self._routes()
        # Requests still running at stop get this long (the engine has drained by then).
        self.runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=min(settings.drain_grace, 5.0),
        )

    async def start(self) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock, ssl_context=self.ssl).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    def _routes(self) -> None:
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        get, post = web.get, web.post
        routes = [
            get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get("/v2", self.server_metadata),
            get("/v2/models/stats", self.statistics),
            post("/v2/repository/index", self.repository_index),
            post("/v2/repository/models/{model}/load", self.load),
            post("/v2/repository/models/{model}/unload", self.unload),
        ]
        for base in (model, version):
            routes += [
                get(base, self.model_metadata),
                get(base + "/ready", self.model_ready),
                get(base + "/config", self.model_config),
                get(base + "/stats", self.statistics),
                post(base + "/infer", self.infer),
            ]
        self.app.add_routes(routes)

    # -- errors, metrics and authentication, around every request -----------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        rpc = _rpc_name(request)
        try:
            if request.path not in _PUBLIC:
                request[_PRINCIPAL] = self._authenticate(request)
            response = await handler(request)
        except web.HTTPException as exc:  # no route, wrong method, body too large
            code = _HTTP_CODES.get(exc.status, "INVALID_ARGUMENT")
            self.front.done(rpc, PROTOCOL, started, code)
            text = exc.text or exc.reason
            if exc.status == 404:
                text = f"no such endpoint: {request.method} {request.path}"
            return _error_response(exc.status, text, code, "bad_request")
        except Exception as exc:
            code, status = status_of(exc)
            if isinstance(exc, _Unauthenticated):
                code, status = "UNAUTHENTICATED", 401
            self.front.done(rpc, PROTOCOL, started, code)
            if code == "INTERNAL":
                log.error("%s %s failed", request.method, request.path, exc_info=exc)
            reason = getattr(exc, "reason", "internal")
            response = _error_response(status, error_message(exc), code, reason)
            expected = expected_position(exc)
            if expected is not None:
                response.headers["seqserve-expected-position"] = str(expected)
            return response
        self.front.done(rpc, PROTOCOL, started, "OK")
        return response

    def _authenticate(self, request: web.Request) -> str:
        if not self.tokens and not self.certificates:
            return ""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and token:
                found = None
                for known, principal in self.tokens.items():  # no early exit
                    if hmac.compare_digest(known, token.strip().encode("utf-8", "replace")):
                        found = principal
                if found is not None:
                    return found
        elif self.certificates:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            for field in (peer or {}).get("subject", ()):
                for key, value in field:
                    if key == "commonName" and value:
                        return str(value)
        raise _Unauthenticated(
            "missing or invalid credentials: send 'Authorization: Bearer <token>'"
        )

    # -- health, metadata, configuration, statistics -------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.front.ready else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self.models.ready(request.match_info["model"], _version(request))
        return web.Response(status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.front.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self.front.model_metadata(request.match_info["model"], _version(request))
        return web.json_response(meta)

    async def model_config(self, request: web.Request) -> web.Response:
        config = self.front.model_config(request.match_info["model"], _version(request))
        return web.json_response(config)

    async def statistics(self, request: web.Request) -> web.Response:
        stats = self.front.statistics(request.match_info.get("model", ""), _version(request))
        return web.json_response({"model_stats": stats})

    # -- the repository -------------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _json_body(request, optional=True)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest("'ready' must be a bool", reason="bad_request")
        return web.json_response(self.front.repository_index(ready))

    async def load(self, request: web.Request) -> web.Response:
        body = await _json_body(request, optional=True)
        params = body.get("parameters") or {}
        await self.front.load(
            request.match_info["model"], bool(params), request.get("principal", "")
        )
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await _json_body(request, optional=True)  # unload_dependents: nothing depends on it
        await self.front.unload(request.match_info["model"], request.get("principal", ""))
        return web.json_response({})

    # -- inference ------------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        doc = _parse_json(header)
        params = _params(doc.get("parameters"), "parameters")
        inputs = _inputs(doc.get("inputs"), binary)
        outputs = _outputs(doc.get("outputs"))
        request_id = doc.get("id", "")
        if not isinstance(request_id, str):
            raise BadRequest("'id' must be a string", reason="bad_request")
        binary_default = params.pop("binary_data_output", False)
        if not isinstance(binary_default, bool):
            raise BadRequest("binary_data_output must be a bool", reason="bad_parameter")
        call = infer.prepare(
            self.models,
            request.match_info["model"],
            _version(request),
            request_id,
            params,
            inputs,
            [o for o, _ in outputs],
        )
        try:
            result = await self.front.start(call, request.get(_PRINCIPAL, ""))
        except Exception as exc:
            raise infer.explain(call, exc) from None
        return _infer_response(call, result, outputs, binary_default)


def _rpc_name(request: web.Request) -> str:
    path = request.path
    if path.endswith("/infer"):
        return "ModelInfer"
    for suffix, name in (
        ("/health/live", "ServerLive"),
        ("/health/ready", "ServerReady"),
        ("/ready", "ModelReady"),
        ("/config", "ModelConfig"),
        ("/stats", "ModelStatistics"),
        ("/index", "RepositoryIndex"),
        ("/load", "RepositoryModelLoad"),
        ("/unload", "RepositoryModelUnload"),
    ):
        if path.endswith(suffix):
            return name
    if path.rstrip("/") == "/v2":
        return "ServerMetadata"
    if path.startswith("/v2/models/"):
        return "ModelMetadata"
    return "other"


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


def _error_response(status: int, message: str, code: str, reason: str) -> web.Response:
    return web.json_response(
        {"error": message},
        status=status,
        headers={"seqserve-code": code, "seqserve-reason": reason},
    )


async def _json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    body = await request.read()
    if not body.strip() and optional:
        return {}
    return _parse_json(body)


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}", reason="bad_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object", reason="bad_json")
    return doc


def _split(body: bytes, header: str | None) -> tuple[bytes, bytes]:
    """JSON header and binary tail of a binary-extension body."""
    if header is None:
        return body, b""
    try:
        size = int(header)
    except ValueError:
        size = -1
    if not 0 <= size <= len(body):
        raise BadRequest(
            f"{HEADER_LENGTH} is {header!r}; the body holds {len(body)} bytes",
            reason="bad_request",
        )
    return body[:size], body[size:]


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{what}' must be a JSON object", reason="bad_request")
    return dict(value)


def _params(value: Any, what: str) -> dict[str, ParamValue]:
    params = _dict(value, what)
    for key, item in params.items():
        if not isinstance(item, bool | int | float | str):
            raise BadRequest(
                f"{what}: {key!r} must be a bool, number or string", reason="bad_parameter"
            )
    return params


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest("tensor 'data' must be a JSON array", reason="bad_frames")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _inputs(value: Any, binary: bytes) -> list[infer.InputTensor]:
    if not isinstance(value, list):
        raise BadRequest("'inputs' must be a JSON array of tensors", reason="bad_input")
    tensors = []
    offset = 0
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(f"input {i} must be a JSON object", reason="bad_input")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise BadRequest(f"input {i} needs a 'name' and a 'datatype'", reason="bad_input")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise BadRequest(f"input {name!r}: 'shape' must be integers", reason="bad_shape")
        params = _params(item.get("parameters"), f"input {name!r} parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(
                    f"input {name!r}: binary_data_size must be an integer >= 0",
                    reason="bad_frames",
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} runs past the "
                    f"{len(binary) - offset} bytes left in the body",
                    reason="bad_frames",
                )
            tensors.append(
                infer.InputTensor(name, datatype, shape, data=binary[offset : offset + size])
            )
            offset += size
            if "data" in item:
                raise BadRequest(f"input {name!r}: data given twice", reason="bad_frames")
        else:
            data = item.get("data")
            values = None if data is None else _flatten(data)
            tensors.append(infer.InputTensor(name, datatype, shape, values=values))
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data belong to no input", reason="bad_frames"
        )
    return tensors


def _outputs(value: Any) -> list[tuple[infer.RequestedOutput, bool | None]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a JSON array", reason="bad_output")
    found = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"output {i} must be an object with a 'name'", reason="bad_output")
        params = _params(item.get("parameters"), f"output {item['name']!r} parameters")
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(
                f"output {item['name']!r}: classification must be an integer",
                reason="bad_parameter",
            )
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(
                f"output {item['name']!r}: binary_data must be a bool", reason="bad_parameter"
            )
        found.append((infer.RequestedOutput(item["name"], k, binary), binary))
    return found


def _infer_response(
    call: infer.InferCall,
    result: Any,
    requested: list[tuple[infer.RequestedOutput, bool | None]],
    binary_default: bool,
) -> web.Response:
    spec = call.spec
    doc: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if call.request_id:
        doc["id"] = call.request_id
    if isinstance(result, StepResult):
        doc["parameters"] = {
            "sequence_position": result.position,
            "sequence_next_position": result.next_position,
        }
        if result.replayed:
            doc["parameters"]["sequence_replayed"] = True
    binaries = [b for _, b in requested] or [None]
    tail: list[bytes] = []
    doc["outputs"] = []
    for tensor, binary in zip(
        infer.outputs(call, infer.probabilities(result)), binaries, strict=True
    ):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary_default if binary is None else binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = tensor.array.ravel().tolist()
        else:
            entry["data"] = np.asarray(tensor.array, np.float64).ravel().tolist()
        doc["outputs"].append(entry)
    header = json.dumps(doc).encode()
    if not tail:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=header + b"".join(tail),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
