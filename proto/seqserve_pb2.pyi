from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALL_FRAMES: _ClassVar[OutputMode]
    LAST_FRAME: _ClassVar[OutputMode]
ALL_FRAMES: OutputMode
LAST_FRAME: OutputMode

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "position", "frames", "start", "end", "output", "tag", "model", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    frames: Matrix
    start: bool
    end: bool
    output: OutputMode
    tag: int
    model: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., frames: _Optional[_Union[Matrix, _Mapping]] = ..., start: _Optional[bool] = ..., end: _Optional[bool] = ..., output: _Optional[_Union[OutputMode, str]] = ..., tag: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "reason", "message", "expected_position")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    expected_position: int
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., expected_position: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "position", "frames", "probabilities", "top_class", "next_position", "replayed", "ended", "tag", "error", "model", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASS_FIELD_NUMBER: _ClassVar[int]
    NEXT_POSITION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    frames: int
    probabilities: Matrix
    top_class: _containers.RepeatedScalarFieldContainer[int]
    next_position: int
    replayed: bool
    ended: bool
    tag: int
    error: Error
    model: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., frames: _Optional[int] = ..., probabilities: _Optional[_Union[Matrix, _Mapping]] = ..., top_class: _Optional[_Iterable[int]] = ..., next_position: _Optional[int] = ..., replayed: _Optional[bool] = ..., ended: _Optional[bool] = ..., tag: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: Matrix
    def __init__(self, frames: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("sequences", "per_step", "model", "version")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    per_step: bool
    model: str
    version: int
    def __init__(self, sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., per_step: _Optional[bool] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("probabilities", "top_class", "per_step")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASS_FIELD_NUMBER: _ClassVar[int]
    PER_STEP_FIELD_NUMBER: _ClassVar[int]
    probabilities: Matrix
    top_class: int
    per_step: Matrix
    def __init__(self, probabilities: _Optional[_Union[Matrix, _Mapping]] = ..., top_class: _Optional[int] = ..., per_step: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: str
    model_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "model", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id", "model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "position", "idle_seconds", "expires_in_seconds", "closed", "rolled_back", "model", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    idle_seconds: float
    expires_in_seconds: float
    closed: bool
    rolled_back: bool
    model: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., expires_in_seconds: _Optional[float] = ..., closed: _Optional[bool] = ..., rolled_back: _Optional[bool] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class StateSpec(_message.Message):
    __slots__ = ("name", "layer", "kind", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: str
    kind: str
    size: int
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[str] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class LayerSpec(_message.Message):
    __slots__ = ("name", "type", "units", "input_size", "parameters", "activation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    units: int
    input_size: int
    parameters: int
    activation: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., units: _Optional[int] = ..., input_size: _Optional[int] = ..., parameters: _Optional[int] = ..., activation: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "features", "labels", "states", "layers", "parameters", "state_bytes", "device", "max_frames_per_request", "session_idle_timeout_seconds", "replay_window", "max_message_bytes", "state", "latest", "fingerprint", "serving_mode", "window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVING_MODE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    features: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    states: _containers.RepeatedCompositeFieldContainer[StateSpec]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpec]
    parameters: int
    state_bytes: int
    device: str
    max_frames_per_request: int
    session_idle_timeout_seconds: float
    replay_window: int
    max_message_bytes: int
    state: str
    latest: bool
    fingerprint: str
    serving_mode: str
    window: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., features: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., states: _Optional[_Iterable[_Union[StateSpec, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerSpec, _Mapping]]] = ..., parameters: _Optional[int] = ..., state_bytes: _Optional[int] = ..., device: _Optional[str] = ..., max_frames_per_request: _Optional[int] = ..., session_idle_timeout_seconds: _Optional[float] = ..., replay_window: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., state: _Optional[str] = ..., latest: _Optional[bool] = ..., fingerprint: _Optional[str] = ..., serving_mode: _Optional[str] = ..., window: _Optional[int] = ...) -> None: ...

class StepBatchRequest(_message.Message):
    __slots__ = ("session_ids", "positions", "frames", "start", "tag", "model", "version")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    positions: _containers.RepeatedScalarFieldContainer[int]
    frames: Matrix
    start: bool
    tag: int
    model: str
    version: int
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., positions: _Optional[_Iterable[int]] = ..., frames: _Optional[_Union[Matrix, _Mapping]] = ..., start: _Optional[bool] = ..., tag: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class EntryError(_message.Message):
    __slots__ = ("index", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    error: Error
    def __init__(self, index: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("probabilities", "top_class", "next_positions", "replayed", "errors", "tag", "model", "model_versions")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASS_FIELD_NUMBER: _ClassVar[int]
    NEXT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    probabilities: Matrix
    top_class: _containers.RepeatedScalarFieldContainer[int]
    next_positions: _containers.RepeatedScalarFieldContainer[int]
    replayed: _containers.RepeatedScalarFieldContainer[bool]
    errors: _containers.RepeatedCompositeFieldContainer[EntryError]
    tag: int
    model: str
    model_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, probabilities: _Optional[_Union[Matrix, _Mapping]] = ..., top_class: _Optional[_Iterable[int]] = ..., next_positions: _Optional[_Iterable[int]] = ..., replayed: _Optional[_Iterable[bool]] = ..., errors: _Optional[_Iterable[_Union[EntryError, _Mapping]]] = ..., tag: _Optional[int] = ..., model: _Optional[str] = ..., model_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("model", "version", "state", "reason", "sessions", "fingerprint", "load_seconds", "default_model", "latest")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: str
    reason: str
    sessions: int
    fingerprint: str
    load_seconds: float
    default_model: bool
    latest: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., sessions: _Optional[int] = ..., fingerprint: _Optional[str] = ..., load_seconds: _Optional[float] = ..., default_model: _Optional[bool] = ..., latest: _Optional[bool] = ...) -> None: ...

class RepositoryProblem(_message.Message):
    __slots__ = ("path", "why")
    PATH_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    path: str
    why: str
    def __init__(self, path: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("versions", "default_model", "problems")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    default_model: str
    problems: _containers.RepeatedCompositeFieldContainer[RepositoryProblem]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., default_model: _Optional[str] = ..., problems: _Optional[_Iterable[_Union[RepositoryProblem, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
