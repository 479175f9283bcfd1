"""seqserve.client: async and sync clients, multiplexed resumable sessions, the ``seqserve`` CLI.

Needs only grpcio, protobuf and numpy (the base install)."""

from __future__ import annotations

from .aio import DEFAULT_TARGET, AsyncClient
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    PositionConflict,
    SeqServeError,
    ServerBusy,
    ServerError,
    SessionExists,
    SessionLost,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)
from .mux import Multiplexer
from .results import BatchPrediction, ModelInfo, Prediction, SequencePrediction, SessionInfo
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
    "Multiplexer",
    "PositionConflict",
    "Prediction",
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
]
