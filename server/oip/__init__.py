"""The Open Inference Protocol (KServe v2, with Triton's extensions):
``inference.GRPCInferenceService`` on the gRPC port and the ``/v2`` REST API on ``--http-port``,
over the same engine."""

from __future__ import annotations

from .front import OipFront
from .grpc_front import InferenceService
from .http_front import HttpFront, bind_socket
from .models import ModelIndex

__all__ = ["HttpFront", "InferenceService", "ModelIndex", "OipFront", "bind_socket"]
