"""Client exceptions: one small hierarchy keyed by gRPC status code and ``seqserve-reason``.

Every exception carries ``code`` (a ``grpc.StatusCode``), ``reason`` (the server's stable
machine-readable reason, e.g. ``expired``) and a one-line message fit for a user. Most classes
follow the status code; the model repository's reasons pick their own (``_BY_REASON``): a
missing model or version is not a missing session, a version conflict is not a position one.
"""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InvalidInput",
    "ModelNotFound",
    "PermissionDenied",
    "PositionConflict",
    "SeqServeError",
    "ServerBusy",
    "ServerError",
    "SessionExists",
    "SessionLost",
    "SessionNotFound",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "VersionUnavailable",
    "error_from_rpc",
    "error_from_status",
]


class SeqServeError(Exception):
    """Base of every error the client raises for a failed call."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        session_id: str = "",
        position: int | None = None,
    ) -> None:
        super().__init__(" ".join(message.split()))  # always one line
        self.code = code
        self.reason = reason
        self.session_id = session_id
        self.position = position


class InvalidInput(SeqServeError, ValueError):
    """The request was malformed (frame shape, feature count, NaN, sizes, session id)."""


class SessionNotFound(SeqServeError):
    """No live session by that id; ``reason`` is ``unknown``, ``expired`` or ``closed`` and
    ``position`` the last position the server knew (when it knew one)."""


class SessionLost(SessionNotFound):
    """A session this client was using is gone on the server (expired, closed, unknown after a
    restart without snapshot, or ``version_retired``: the model version it was pinned to was
    retired); nothing of the failed request was applied."""


class ModelNotFound(SeqServeError, LookupError):
    """No such model (``unknown_model``) or no such version of it (``unknown_version``) on the
    server; ``client.models()`` lists what there is."""


class VersionConflict(SeqServeError):
    """A request at odds with model versions (FAILED_PRECONDITION): ``version_mismatch`` (it
    names a version other than the one its session is pinned to) or ``version_draining`` (a new
    session asked for a version that takes no new sessions; name none to get the latest)."""


class PositionConflict(SeqServeError):
    """The request's position does not continue the session (``position_gap`` or
    ``stale_position``); ``position`` is the position the server expects."""


class ServerBusy(SeqServeError):
    """RESOURCE_EXHAUSTED: e.g. the server's session limit is reached."""


class SessionExists(SeqServeError):
    """A session with that id already exists (opening it again)."""


class Unavailable(SeqServeError):
    """The server cannot be reached, or stayed unreachable longer than the retry budget."""


class VersionUnavailable(Unavailable):
    """``version_unavailable``: the model version a request needs (a session's exact graphs, or
    any ready version of the model) is not loaded on the server that answered and cannot be
    there; the message names the version. Not retried by the client: on the replica a session
    routes to this rarely clears by itself (its causes are a version this server does not have,
    or one whose load failed). Resume the session on a server that has the version, or retry
    once it is loaded."""


class PermissionDenied(SeqServeError, PermissionError):
    """PERMISSION_DENIED: e.g. ``not_allowed``, loading or unloading models as a principal not
    in the server's ``--admin-principals``."""


class DeadlineExceeded(SeqServeError, TimeoutError):
    """The call did not finish within its timeout."""


class Cancelled(SeqServeError):
    """The call was cancelled (usually: the client was closed while it was pending)."""


class Unauthenticated(SeqServeError, PermissionError):
    """No valid token or client certificate (the server answered UNAUTHENTICATED)."""


class ServerError(SeqServeError):
    """Anything else (INTERNAL, UNKNOWN, UNIMPLEMENTED...)."""


_BY_CODE: dict[grpc.StatusCode, type[SeqServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PositionConflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusy,
    grpc.StatusCode.ALREADY_EXISTS: SessionExists,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}
# Reasons whose class is not their status code's.
_BY_REASON: dict[str, type[SeqServeError]] = {
    "unknown_model": ModelNotFound,
    "unknown_version": ModelNotFound,
    "version_mismatch": VersionConflict,
    "version_draining": VersionConflict,
    "version_retired": SessionLost,  # the session existed: it ended with its version
    "version_unavailable": VersionUnavailable,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(
    code: grpc.StatusCode | int,
    message: str,
    *,
    reason: str = "",
    session_id: str = "",
    position: int | None = None,
    in_session: bool = False,
) -> SeqServeError:
    """The exception for a status; ``in_session`` turns NOT_FOUND into ``SessionLost``."""
    if isinstance(code, int):
        code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, ServerError)
    if kind is SessionNotFound and in_session:
        kind = SessionLost
        if reason == "unknown":
            message += " (the server no longer has it: restarted without its session snapshot?)"
    if kind is ServerError:
        message = f"server error ({code.name}): {message}"
    return kind(
        message or code.name, code=code, reason=reason, session_id=session_id, position=position
    )


def error_from_rpc(
    exc: grpc.RpcError, *, target: str = "", session_id: str = "", in_session: bool = False
) -> SeqServeError:
    """Map a failed call (status + trailing ``seqserve-reason`` metadata) to an exception."""
    code = exc.code()
    details = exc.details() or ""
    # The stubs type each item as an object with .key/.value; it is a (key, value) pair (a
    # namedtuple on sync calls, a plain tuple in grpc.aio's Metadata).
    trailing: dict[str, str | bytes] = dict(exc.trailing_metadata() or ())  # type: ignore[arg-type]
    reason = str(trailing.get("seqserve-reason", ""))
    raw_position = trailing.get("seqserve-expected-position")
    position = int(raw_position) if raw_position not in (None, "") else None
    if code is grpc.StatusCode.UNAVAILABLE and not reason:  # the transport, not seqserve
        where = f" at {target}" if target else ""
        details = f"cannot reach the seqserve server{where} ({_short(details)})"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"no answer from {target or 'the server'} within the timeout"
    elif code is grpc.StatusCode.UNIMPLEMENTED:
        details = f"{target or 'the server'} does not implement this call (not a seqserve server?)"
    return error_from_status(
        code,
        details,
        reason=reason,
        session_id=session_id,
        position=position,
        in_session=in_session,
    )


def _short(details: str) -> str:
    """grpc's connection errors are long; keep the useful tail (e.g. 'Connection refused')."""
    text = " ".join(details.split())
    for marker in (
        "Connection refused",
        "Socket closed",
        "Connection reset",
        "DNS resolution",
        "Name or service not known",
        "Deadline Exceeded",
        "handshake",
    ):
        if marker.lower() in text.lower():
            return marker.lower() if marker != "DNS resolution" else "DNS resolution failed"
    return text if len(text) <= 120 else text[:117] + "..."
