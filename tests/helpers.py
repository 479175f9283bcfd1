"""Small helpers for tests: request builders and an in-process reference run."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto.codec import from_matrix, to_matrix


def step_request(
    session_id: str, position: int, frames: np.ndarray, **kw: object
) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, position=position, frames=to_matrix(frames), **kw)  # type: ignore[arg-type]


def probs(response: pb.StepResponse) -> np.ndarray:
    return np.array(from_matrix(response.probabilities))


def solo_run(model_dir: Path, frames: np.ndarray) -> np.ndarray:
    """Per-step probabilities of one whole sequence, by in-process onnxruntime."""
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    runtime = Runtime(load_model_spec(model_dir))
    out, _ = runtime.sequence(frames[None].astype(np.float32), runtime.zero_states(1))
    return out[0]


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers that need a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(registry, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sum of a metric's samples whose labels include ``labels`` (None: no such sample):
    reads a metric whatever other labels (model, version, protocol) it carries."""
    labels = labels or {}
    total, found = 0.0, False
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    return total if found else None


def store_key(session_id: str, model_dir: Path | None = None) -> str:
    """The Redis key a session of the model in ``model_dir`` (default: basicmotions) lives at."""
    from seqserve.server.engine import store_namespace
    from seqserve.server.model import load_model_spec

    return f"{store_namespace(load_model_spec(model_dir))}:{session_id}"
