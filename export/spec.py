"""A validated, framework-neutral description of a Keras recurrent classifier.

`describe(model)` walks the layers once, refuses anything a stateful stream cannot reproduce
exactly (with the layer's name and the reason), and returns plain numpy weights that the graph
builders consume. Nothing here writes files.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from .activations import ACTIVATIONS
from .errors import ExportError, UnsupportedModelError

__all__ = ["Activation", "Dense", "ModelSpec", "Recurrent", "State", "describe", "expected_params"]

RECURRENT_KINDS = ("LSTM", "GRU", "SimpleRNN")
_GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}
_IDENTITY_AT_INFERENCE = (
    "Dropout",
    "SpatialDropout1D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
)
_REASONS = {
    "Bidirectional": "Bidirectional runs a backward pass from the end of the sequence; "
    "a stream cannot see future frames",
    "TimeDistributed": "TimeDistributed wrappers are not supported; put a Dense layer in the head",
    "Attention": "attention looks at the whole sequence at once; it has no per-step state",
    "AdditiveAttention": "attention looks at the whole sequence at once; it has no per-step state",
    "MultiHeadAttention": "attention looks at the whole sequence at once; it has no per-step state",
    "RepeatVector": "RepeatVector turns one vector into a sequence; it has no per-step meaning",
    "Flatten": "Flatten over time needs the whole sequence",
    "RNN": "generic keras.layers.RNN with a custom cell is not supported; use LSTM, GRU "
    "or SimpleRNN",
}
_NAME_RE = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class Recurrent:
    """One LSTM / GRU / SimpleRNN layer with its weights (Keras gate order)."""

    name: str
    kind: str
    units: int
    input_size: int
    activation: str
    recurrent_activation: str | None
    use_bias: bool
    reset_after: bool
    return_sequences: bool
    kernel: np.ndarray = field(repr=False)
    recurrent_kernel: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    params: int
    config: dict[str, Any] = field(repr=False)

    @property
    def state_kinds(self) -> tuple[str, ...]:
        return ("h", "c") if self.kind == "LSTM" else ("h",)


@dataclass(frozen=True)
class Dense:
    """A Dense layer of the head, applied to every timestep."""

    name: str
    units: int
    input_size: int
    activation: str
    kernel: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    params: int


@dataclass(frozen=True)
class Activation:
    """A standalone Activation / Softmax layer of the head."""

    name: str
    activation: str


@dataclass(frozen=True)
class State:
    """One state tensor of the stream, named `<layer>_<kind>` with `_in` / `_out` graph names."""

    name: str
    layer: str
    kind: str
    size: int

    @property
    def input(self) -> str:
        return f"{self.name}_in"

    @property
    def output(self) -> str:
        return f"{self.name}_out"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the classifier outside Keras."""

    features: int
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    normalized: bool
    masking: bool
    recurrent: tuple[Recurrent, ...]
    head: tuple[Dense | Activation, ...]

    @property
    def classes(self) -> int:
        dense = [layer for layer in self.head if isinstance(layer, Dense)]
        return dense[-1].units if dense else self.recurrent[-1].units

    @property
    def states(self) -> tuple[State, ...]:
        return tuple(
            State(f"{layer.name}_{kind}", layer.name, kind, layer.units)
            for layer in self.recurrent
            for kind in layer.state_kinds
        )

    @property
    def parameters(self) -> int:
        return sum(layer.params for layer in self.recurrent) + sum(
            layer.params for layer in self.head if isinstance(layer, Dense)
        )


def expected_params(
    kind: str, units: int, input_size: int, *, use_bias: bool = True, reset_after: bool = True
) -> int:
    """Parameter count from the textbook formulas (GRU reset_after adds a second bias)."""
    if kind == "Dense":
        return units * input_size + (units if use_bias else 0)
    gates = _GATES[kind]
    count = gates * units * (units + input_size) + (gates * units if use_bias else 0)
    if kind == "GRU" and use_bias and reset_after:
        count += gates * units
    return count


def describe(model: keras.Model) -> ModelSpec:
    """Validate `model` and return its description, or raise `UnsupportedModelError`."""
    layers = _chain(model)
    features = _features(model)
    _refuse_collapsed_middle(layers)
    walk = _Walk(features)
    for layer in layers:
        walk.visit(layer)
    return walk.finish()


def _features(model: keras.Model) -> int:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 3 or shape[-1] is None:
        raise UnsupportedModelError(
            model.name, f"input must be (batch, time, features) with known features, got {shape}"
        )
    return int(shape[-1])


def _chain(model: keras.Model) -> list[keras.Layer]:
    """The layers in order, provided they form one straight line from input to output."""
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    if not hasattr(model, "_operations") or not model.inputs:
        raise UnsupportedModelError(model.name, "subclassed models have no inspectable layer graph")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(model.name, "the model must have one input and one output")
    layers = list(model.layers)
    for layer in layers:  # a known unsupported layer is a better message than "not a chain"
        if type(layer).__name__ in _REASONS:
            raise UnsupportedModelError(layer.name, _REASONS[type(layer).__name__])
    for previous, layer in itertools.pairwise(layers):
        nodes = layer._inbound_nodes
        if len(nodes) != 1:
            raise UnsupportedModelError(layer.name, "layer is used more than once (shared layer)")
        args = nodes[0].arguments.args
        source = getattr(args[0], "_keras_history", None) if args else None
        if source is None or source.operation is not previous:
            raise UnsupportedModelError(
                layer.name, "the model is not a straight chain of layers (branch or merge)"
            )
    if model.outputs[0]._keras_history.operation is not layers[-1]:
        raise UnsupportedModelError(layers[-1].name, "the last layer is not the model output")
    return layers


def _refuse_collapsed_middle(layers: list[keras.Layer]) -> None:
    recurrent = [layer for layer in layers if type(layer).__name__ in RECURRENT_KINDS]
    for layer in recurrent[:-1]:
        if not layer.return_sequences:
            raise UnsupportedModelError(
                layer.name,
                "return_sequences=False in the middle of the recurrent stack: the layers after it "
                "see one vector per sequence, which a step-by-step stream cannot reproduce",
            )


def _array(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)


def _activation_name(layer: keras.Layer, key: str, *, allow_softmax: bool) -> str:
    value = layer.get_config().get(key)
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise UnsupportedModelError(
            layer.name, f"{key}={value!r} is not one of {sorted(ACTIVATIONS)}"
        )
    if value == "softmax" and not allow_softmax:
        raise UnsupportedModelError(layer.name, f"{key}='softmax' inside a recurrent cell")
    return value


class _Walk:
    """Visits layers in order, tracking where in the stack we are."""

    def __init__(self, features: int) -> None:
        self.size = features
        self.features = features
        self.mean = np.zeros(features, np.float32)
        self.std = np.ones(features, np.float32)
        self.normalized = False
        self.masking = False
        self.recurrent: list[Recurrent] = []
        self.head: list[Dense | Activation] = []
        self.names: set[str] = set()
        self.last_layer = ""

    def _name(self, layer: keras.Layer) -> str:
        name = _NAME_RE.sub("_", layer.name)
        while name in self.names:
            name += "_"
        self.names.add(name)
        return name

    def visit(self, layer: keras.Layer) -> None:
        kind = type(layer).__name__
        self.last_layer = layer.name
        policy = getattr(layer, "dtype_policy", None)
        if kind != "InputLayer" and policy is not None and policy.name != "float32":
            raise UnsupportedModelError(layer.name, f"dtype policy {policy.name}; need float32")
        if kind == "InputLayer" or kind in _IDENTITY_AT_INFERENCE:
            return
        if kind in ("Masking", "Normalization"):
            self._preprocessing(layer, kind)
        elif kind in RECURRENT_KINDS:
            self._recurrent(layer, kind)
        elif kind in ("Dense", "Activation", "Softmax"):
            self._head(layer, kind)
        elif kind in _REASONS:
            raise UnsupportedModelError(layer.name, _REASONS[kind])
        elif "Conv" in kind:
            raise UnsupportedModelError(
                layer.name,
                f"{kind}: convolution over time mixes neighbouring frames, which the "
                "per-layer recurrent states of a stream do not carry",
            )
        elif "Pooling" in kind:
            raise UnsupportedModelError(
                layer.name, f"{kind}: pooling over time needs the whole sequence"
            )
        else:
            raise UnsupportedModelError(
                layer.name,
                f"unsupported layer type {kind}; supported: InputLayer, Masking and "
                "Normalization (before the stack), LSTM/GRU/SimpleRNN, Dense/Activation/Softmax "
                "head, Dropout",
            )

    def _preprocessing(self, layer: keras.Layer, kind: str) -> None:
        if self.recurrent or self.head:
            raise UnsupportedModelError(
                layer.name,
                f"{kind} in the middle of the model; it is supported only before the "
                "first recurrent layer",
            )
        if kind == "Masking":
            # Streams carry only real frames, so the mask never triggers at serving time.
            self.masking = True
            return
        config = layer.get_config()
        axis = config.get("axis")
        if axis not in (-1, 2, [-1], [2], (-1,), (2,)) or config.get("invert") or self.normalized:
            raise UnsupportedModelError(
                layer.name,
                "only one per-feature Normalization (axis=-1, invert=False) is supported",
            )
        mean = _array(layer.mean).reshape(-1)
        variance = _array(layer.variance).reshape(-1)
        if mean.size != self.features:
            raise UnsupportedModelError(
                layer.name, f"{mean.size} means for {self.features} features"
            )
        self.mean = mean
        # Same arithmetic as Keras: (x - mean) / maximum(sqrt(variance), epsilon).
        self.std = np.maximum(np.sqrt(variance), np.float32(keras.config.epsilon()))
        self.normalized = True

    def _recurrent(self, layer: keras.Layer, kind: str) -> None:
        if type(layer) is not getattr(keras.layers, kind):
            raise UnsupportedModelError(layer.name, f"subclass of {kind}; only the stock layer")
        if self.head:
            raise UnsupportedModelError(layer.name, "recurrent layer after the Dense head")
        config = layer.get_config()
        for flag, reason in (
            ("go_backwards", "go_backwards=True reads the sequence from its end"),
            ("stateful", "stateful=True keeps Keras-side state; the server owns the state"),
            ("return_state", "return_state=True makes the model output its states"),
        ):
            if config.get(flag):
                raise UnsupportedModelError(layer.name, reason)
        cell = layer.cell
        use_bias = bool(config.get("use_bias", True))
        reset_after = bool(config.get("reset_after", False)) if kind == "GRU" else False
        units = int(config["units"])
        expected = expected_params(
            kind, units, self.size, use_bias=use_bias, reset_after=reset_after
        )
        counted = int(layer.count_params())
        if expected != counted:
            raise ExportError(
                f"layer {layer.name!r}: Keras counts {counted} parameters, formula gives {expected}"
            )
        self.recurrent.append(
            Recurrent(
                name=self._name(layer),
                kind=kind,
                units=units,
                input_size=self.size,
                activation=_activation_name(layer, "activation", allow_softmax=False),
                recurrent_activation=(
                    None
                    if kind == "SimpleRNN"
                    else _activation_name(layer, "recurrent_activation", allow_softmax=False)
                ),
                use_bias=use_bias,
                reset_after=reset_after,
                return_sequences=bool(config["return_sequences"]),
                kernel=_array(cell.kernel),
                recurrent_kernel=_array(cell.recurrent_kernel),
                bias=_array(cell.bias) if use_bias else None,
                params=counted,
                config=config,
            )
        )
        self.size = units

    def _head(self, layer: keras.Layer, kind: str) -> None:
        if not self.recurrent:
            raise UnsupportedModelError(
                layer.name, f"{kind} before the first recurrent layer; only the head may hold it"
            )
        if kind == "Softmax":
            axis = layer.get_config().get("axis", -1)
            if axis not in (-1, [-1], (-1,)):
                raise UnsupportedModelError(layer.name, f"softmax over axis {axis}; need -1")
            self.head.append(Activation(self._name(layer), "softmax"))
            return
        activation = _activation_name(layer, "activation", allow_softmax=True)
        if kind == "Activation":
            self.head.append(Activation(self._name(layer), activation))
            return
        config = layer.get_config()
        if config.get("lora_rank"):
            raise UnsupportedModelError(layer.name, "LoRA-enabled Dense is not supported")
        use_bias = bool(config.get("use_bias", True))
        units = int(config["units"])
        expected = expected_params("Dense", units, self.size, use_bias=use_bias)
        counted = int(layer.count_params())
        if expected != counted:
            raise ExportError(
                f"layer {layer.name!r}: Keras counts {counted} parameters, formula gives {expected}"
            )
        self.head.append(
            Dense(
                name=self._name(layer),
                units=units,
                input_size=self.size,
                activation=activation,
                kernel=_array(layer.kernel),
                bias=_array(layer.bias) if use_bias else None,
                params=counted,
            )
        )
        self.size = units

    def finish(self) -> ModelSpec:
        if not self.recurrent:
            raise UnsupportedModelError(self.last_layer, "the model has no recurrent layer")
        last = self.head[-1] if self.head else None
        if last is None or last.activation != "softmax":
            raise UnsupportedModelError(
                self.last_layer, "the model must end in a softmax so that it serves probabilities"
            )
        return ModelSpec(
            features=self.features,
            mean=self.mean,
            std=self.std,
            normalized=self.normalized,
            masking=self.masking,
            recurrent=tuple(self.recurrent),
            head=tuple(self.head),
        )
