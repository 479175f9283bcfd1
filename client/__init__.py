"""seqserve.client: async and sync clients, multiplexed resumable sessions, the ``seqserve`` CLI.

Needs only grpcio, protobuf and numpy (the base install)."""

from __future__ import annotations

from .aio import DEFAULT_TARGET, AsyncClient
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    PermissionDenied,
    PositionConflict,
    SeqServeError,
    ServerBusy,
    ServerError,
    SessionExists,
    SessionLost,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
    VersionConflict,
    VersionUnavailable,
)
from .mux import Multiplexer
from .results import (
    BatchPrediction,
    ModelInfo,
    ModelList,
    ModelVersionStatus,
    Prediction,
    RepositoryProblem,
    SequencePrediction,
    SessionInfo,
)
from .retry import Backoff
from .routing import ROUTE_HEADER
from .session import AsyncSession
from .sync import Client, Session

__all__ = [
    "DEFAULT_TARGET",
    "ROUTE_HEADER",
    "AsyncClient",
    "AsyncSession",
    "Backoff",
    "BatchPrediction",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "InvalidInput",
    "ModelInfo",
    "ModelList",
    "ModelNotFound",
    "ModelVersionStatus",
    "Multiplexer",
    "PermissionDenied",
    "PositionConflict",
    "Prediction",
    "RepositoryProblem",
    "SeqServeError",
    "SequencePrediction",
    "ServerBusy",
    "ServerError",
    "Session",
    "SessionExists",
    "SessionInfo",
    "SessionLost",
    "SessionNotFound",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "VersionUnavailable",
]
