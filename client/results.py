"""What calls return: plain dataclasses over numpy arrays (no protobuf leaks out)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from seqserve.proto import seqserve_pb2 as pb

__all__ = ["BatchPrediction", "ModelInfo", "Prediction", "SequencePrediction", "SessionInfo"]


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer to one ``Session.send``: probabilities for every frame sent."""

    session_id: str
    position: int  # index, within the session, of the first frame sent
    probabilities: np.ndarray  # [frames, classes]
    labels: tuple[str, ...] = ()
    latency: float = 0.0  # seconds from submission to answer (reconnects included)
    replayed: bool = False  # answered from the server's replay store (a resent request)

    @property
    def frames(self) -> int:
        return int(self.probabilities.shape[0])

    @property
    def next_position(self) -> int:
        return self.position + self.frames

    @property
    def top_classes(self) -> np.ndarray:
        """Arg-max class index per frame."""
        return self.probabilities.argmax(axis=1)

    @property
    def top_class(self) -> int:
        """Arg-max class of the last frame: the classification so far."""
        return int(self.probabilities[-1].argmax())

    @property
    def label(self) -> str:
        return _label(self.labels, self.top_class)

    @property
    def confidence(self) -> float:
        return float(self.probabilities[-1].max())


@dataclass(frozen=True, slots=True)
class BatchPrediction:
    """The answer to one ``step_batch``: one frame for each of many sessions, entry by entry.
    A failed entry has a zero row, and its error (a ``SeqServeError``) in ``errors``."""

    session_ids: tuple[str, ...]
    probabilities: np.ndarray  # [entries, classes]
    next_positions: np.ndarray  # [entries]: each session's position after its entry
    replayed: np.ndarray  # [entries] bool
    errors: dict[int, Exception] = field(default_factory=dict)
    labels: tuple[str, ...] = ()

    @property
    def top_classes(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise the first entry's error, if any entry failed."""
        if self.errors:
            raise self.errors[min(self.errors)]


@dataclass(frozen=True, slots=True)
class SequencePrediction:
    """The answer for one whole sequence of ``predict``."""

    probabilities: np.ndarray  # [classes], after the last frame
    labels: tuple[str, ...] = ()
    per_step: np.ndarray | None = None  # [frames, classes] when asked

    @property
    def top_class(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def label(self) -> str:
        return _label(self.labels, self.top_class)

    @property
    def confidence(self) -> float:
        return float(self.probabilities.max())


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """``position`` is where to send next. ``rolled_back``: it is a checkpoint the session was
    restored from after an unclean stop, and frames sent past it before were lost (send them
    again from ``position``). ``closed`` is only ever true in ``close_session``'s answer."""

    session_id: str
    position: int
    idle_seconds: float
    expires_in_seconds: float
    closed: bool
    rolled_back: bool = False

    @classmethod
    def from_pb(cls, info: pb.SessionInfo) -> SessionInfo:
        return cls(
            info.session_id,
            info.position,
            info.idle_seconds,
            info.expires_in_seconds,
            info.closed,
            info.rolled_back,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    features: int
    labels: tuple[str, ...]
    parameters: int
    state_bytes: int
    device: str
    max_frames_per_request: int
    session_idle_timeout: float
    replay_window: int = 0
    layers: tuple[dict[str, object], ...] = field(default=())
    states: tuple[dict[str, object], ...] = field(default=())
    max_message_bytes: int = 0

    @classmethod
    def from_pb(cls, info: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=info.name,
            version=info.version,
            features=info.features,
            labels=tuple(info.labels),
            parameters=info.parameters,
            state_bytes=info.state_bytes,
            device=info.device,
            max_frames_per_request=info.max_frames_per_request,
            session_idle_timeout=info.session_idle_timeout_seconds,
            replay_window=info.replay_window,
            max_message_bytes=info.max_message_bytes,
            layers=tuple(
                {
                    "name": la.name,
                    "type": la.type,
                    "units": la.units,
                    "input_size": la.input_size,
                    "parameters": la.parameters,
                    "activation": la.activation,
                }
                for la in info.layers
            ),
            states=tuple(
                {"name": s.name, "layer": s.layer, "kind": s.kind, "size": s.size}
                for s in info.states
            ),
        )


def _label(labels: tuple[str, ...], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)
