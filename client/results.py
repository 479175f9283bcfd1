"""What calls return: plain dataclasses over numpy arrays (no protobuf leaks out)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from seqserve.proto import seqserve_pb2 as pb

__all__ = [
    "BatchPrediction",
    "ModelInfo",
    "ModelList",
    "ModelVersionStatus",
    "Prediction",
    "RepositoryProblem",
    "SequencePrediction",
    "SessionInfo",
]


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer to one ``Session.send``: probabilities for every frame sent."""

    session_id: str
    position: int  # index, within the session, of the first frame sent
    probabilities: np.ndarray  # [frames, classes]
    labels: tuple[str, ...] = ()
    latency: float = 0.0  # seconds from submission to answer (reconnects included)
    replayed: bool = False  # answered from the server's replay store (a resent request)
    model: str = ""  # the model that answered
    model_version: int = 0  # its version: the one the session is pinned to

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
    model: str = ""
    # [entries]: the version that answered each entry (its session's; 0 for a failed entry).
    # One batch may span sessions pinned to different versions.
    model_versions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

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
    model: str = ""
    model_version: int = 0

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
    again from ``position``). ``closed`` is only ever true in ``close_session``'s answer.
    ``model`` and ``model_version``: what the session is pinned to (for its whole life)."""

    session_id: str
    position: int
    idle_seconds: float
    expires_in_seconds: float
    closed: bool
    rolled_back: bool = False
    model: str = ""
    model_version: int = 0

    @classmethod
    def from_pb(cls, info: pb.SessionInfo) -> SessionInfo:
        return cls(
            info.session_id,
            info.position,
            info.idle_seconds,
            info.expires_in_seconds,
            info.closed,
            info.rolled_back,
            info.model,
            info.model_version,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model version's metadata (``GetModel``). ``state``: ``ready`` or ``draining`` (see
    ``ModelVersionStatus``); ``latest``: new sessions of the model start on it; ``fingerprint``
    identifies its exact graphs. ``serving_mode``: ``stateful`` (each answer covers everything
    since the session started) or ``window`` (the last ``window`` frames, as the model was
    trained)."""

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
    state: str = ""
    latest: bool = False
    fingerprint: str = ""
    serving_mode: str = ""
    window: int = 0

    @property
    def version_number(self) -> int:
        """``version`` as a number (0 if it is not one)."""
        return int(self.version) if self.version.isdigit() else 0

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
            state=info.state,
            latest=info.latest,
            fingerprint=info.fingerprint,
            serving_mode=info.serving_mode,
            window=info.window,
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


@dataclass(frozen=True, slots=True)
class ModelVersionStatus:
    """One version of one model as the server holds it (a line of ``client.models()``).

    ``state``: ``loading`` (being read and checked), ``ready`` (serves new and pinned
    sessions), ``draining`` (out of the version policy or unloaded: serves only the sessions
    pinned to it) or ``unavailable`` (its load failed, or it was released; see ``reason``)."""

    model: str
    version: int
    state: str
    reason: str = ""
    sessions: int = 0  # live sessions pinned to it
    fingerprint: str = ""
    load_seconds: float = 0.0
    default: bool = False  # the model requests get when they name none
    latest: bool = False  # new sessions of the model start on this version

    @classmethod
    def from_pb(cls, status: pb.ModelVersionStatus) -> ModelVersionStatus:
        return cls(
            model=status.model,
            version=status.version,
            state=status.state,
            reason=status.reason,
            sessions=status.sessions,
            fingerprint=status.fingerprint,
            load_seconds=status.load_seconds,
            default=status.default_model,
            latest=status.latest,
        )


@dataclass(frozen=True, slots=True)
class RepositoryProblem:
    """Something in the server's model repository that cannot be served, and why."""

    path: str
    why: str


@dataclass(frozen=True, slots=True)
class ModelList:
    """``client.models()``: every model and version the server holds, its default model, and
    what in its repository it cannot serve."""

    versions: tuple[ModelVersionStatus, ...]
    default_model: str = ""
    problems: tuple[RepositoryProblem, ...] = ()

    @classmethod
    def from_pb(cls, listed: pb.ModelList) -> ModelList:
        return cls(
            versions=tuple(ModelVersionStatus.from_pb(v) for v in listed.versions),
            default_model=listed.default_model,
            problems=tuple(RepositoryProblem(p.path, p.why) for p in listed.problems),
        )

    @property
    def models(self) -> tuple[str, ...]:
        """The model names, in the server's order."""
        return tuple(dict.fromkeys(v.model for v in self.versions))

    def of(self, model: str) -> tuple[ModelVersionStatus, ...]:
        """One model's versions (``""``: the default model's)."""
        name = model or self.default_model
        return tuple(v for v in self.versions if v.model == name)

    def latest(self, model: str = "") -> ModelVersionStatus | None:
        """The version new sessions of ``model`` start on (None: no ready version)."""
        return next((v for v in self.of(model) if v.latest), None)

    def version(self, model: str, version: int) -> ModelVersionStatus | None:
        return next((v for v in self.of(model) if v.version == version), None)


def _label(labels: tuple[str, ...], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)
