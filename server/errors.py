"""Domain errors of the serving core. They know nothing of gRPC: the servicer maps them to codes.

Every error carries a stable machine-readable ``reason`` that clients can branch on.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "CapacityExceeded",
    "Draining",
    "ModelError",
    "NotAllowed",
    "PositionError",
    "SeqServeError",
    "SessionExists",
    "SessionMoved",
    "SessionNotFound",
    "SnapshotError",
    "StoreUnavailable",
    "UnknownModel",
    "VersionDraining",
    "VersionElsewhere",
    "VersionMismatch",
    "VersionRetired",
    "VersionUnavailable",
]


class SeqServeError(Exception):
    """Base of every error a request can end in; ``reason`` is stable, the message is prose."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class BadRequest(SeqServeError):
    """The request itself is malformed (frames, ids, sizes); nothing was applied."""

    reason = "bad_request"


class SessionNotFound(SeqServeError):
    """No live session by that id; reason is ``unknown``, ``expired`` or ``closed``."""

    reason = "unknown"

    def __init__(self, message: str, *, reason: str = "unknown", position: int = 0) -> None:
        super().__init__(message, reason=reason)
        self.position = position


class PositionError(SeqServeError):
    """The request's position does not continue the session: ``position_gap`` (frames are
    missing before it) or ``stale_position`` (too old to replay)."""

    reason = "position_gap"

    def __init__(self, message: str, *, reason: str, expected: int) -> None:
        super().__init__(message, reason=reason)
        self.expected = expected


class CapacityExceeded(SeqServeError):
    reason = "session_limit"


class SessionExists(SeqServeError):
    reason = "session_exists"


class Draining(SeqServeError):
    reason = "draining"


class ModelError(Exception):
    """The model directory is unusable (missing files, wrong names, checksum mismatch)."""


class SnapshotError(Exception):
    """A session snapshot cannot be restored (corrupt, truncated, or from another model)."""


class StoreUnavailable(SeqServeError):
    """The session is not held here and the shared store cannot be reached to resume it."""

    reason = "store_unavailable"


class SessionMoved(SeqServeError):
    """Another replica took the session over; this one dropped its copy. Retry: the request
    goes to (or reloads on) the current owner."""

    reason = "session_moved"


class VersionDraining(SeqServeError):
    """The model version is being retired: it takes no new sessions (its own go on)."""

    reason = "version_draining"


class VersionRetired(SeqServeError):
    """The session's model version was retired (unloaded, or out of the version policy past
    --version-drain-timeout); the session ended with it, never moved to another graph."""

    reason = "version_retired"

    def __init__(self, message: str, *, position: int = 0) -> None:
        super().__init__(message)
        self.position = position


class VersionUnavailable(SeqServeError):
    """The session ran on a model version (exact graphs) this server cannot load: it is kept
    until a server that has that version takes it."""

    reason = "version_unavailable"


class UnknownModel(SeqServeError):
    """No such model (``unknown_model``) or version (``unknown_version``) here."""

    reason = "unknown_model"


class VersionMismatch(SeqServeError):
    """The request names a version other than the one its session is pinned to."""

    reason = "version_mismatch"


class NotAllowed(SeqServeError):
    """The caller may not do this (loading and unloading models: --admin-principals)."""

    reason = "not_allowed"


class VersionElsewhere(VersionUnavailable):
    """The session lives (in the shared store) on another version of its model: ``where`` is
    that version's tag, ``<version>|<graphs>``. The server loads that version and retries; a
    client sees it only when that fails, as version_unavailable (which it is)."""

    def __init__(self, message: str, *, where: str) -> None:
        super().__init__(message)
        self.where = where

    @property
    def version(self) -> int:
        number = self.where.partition("|")[0]
        return int(number) if number.isdigit() else 0

    @property
    def fingerprint(self) -> str:
        return self.where.partition("|")[2]
