"""Keras's own answers: per-step probabilities and logits, and answers on sliding windows.

`keras_outputs` gives the model's output given the prefix up to each step (what a stateful
stream answers); `window_predict` gives, at every frame of a stream, the model on the last T
frames (what a window-trained model's author validated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np

from .errors import ParityError
from .spec import RECURRENT_KINDS, ModelSpec

__all__ = [
    "Early",
    "KerasOutputs",
    "KerasStep",
    "keras_outputs",
    "keras_per_step",
    "keras_step",
    "per_step_model",
    "window_answers",
    "window_predict",
]

_TOLERANCE = 1e-5
_SOFTMAX_LAYERS = ("Dense", "Activation", "Softmax")

Early = Literal["partial", "wait"]


@dataclass(frozen=True)
class KerasOutputs:
    """Per-step probabilities and logits (the input of the final softmax), [n, T, C] each."""

    probabilities: np.ndarray
    logits: np.ndarray


@dataclass(frozen=True)
class KerasStep:
    """One step from given states: probabilities and logits [B, C], new states by name."""

    probabilities: np.ndarray
    logits: np.ndarray
    states: dict[str, np.ndarray]


def keras_step(
    model: keras.Model, spec: ModelSpec, frames: np.ndarray, states: Mapping[str, np.ndarray]
) -> KerasStep:
    """Keras's float32 arithmetic for one step of raw `frames` [B, F] from `states` (by the
    names of `spec.states`): the model's own layers, each recurrent layer through its cell."""
    ops = keras.ops
    softmax = _final_softmax(model)
    recurrent = iter(spec.recurrent)
    x = ops.convert_to_tensor(np.asarray(frames, np.float32))
    logits = None
    new: dict[str, np.ndarray] = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in RECURRENT_KINDS:
            described = next(recurrent)
            names = [f"{described.name}_{k}" for k in described.state_kinds]
            given = [ops.convert_to_tensor(np.asarray(states[n], np.float32)) for n in names]
            x, after = layer.cell(x, given, training=False)
            after = list(after) if isinstance(after, list | tuple) else [after]
            new.update({n: np.asarray(v, np.float32) for n, v in zip(names, after, strict=True)})
        elif kind == "Normalization":  # built for [B, T, F]: give it one step as T = 1
            x = layer(x[:, None, :])[:, 0]
        elif layer is softmax:
            if kind == "Dense":  # Dense.call's own ops, with the activation kept apart
                logits = ops.matmul(x, layer.kernel)
                if layer.bias is not None:
                    logits = ops.add(logits, layer.bias)
                x = layer.activation(logits)
            else:
                logits, x = x, layer(x)
        elif kind in _SOFTMAX_LAYERS:
            x = layer(x)
        # InputLayer, Masking (streams carry real frames only) and dropouts: identity here.
    assert logits is not None
    return KerasStep(np.asarray(x, np.float32), np.asarray(logits, np.float32), new)


def _final_softmax(model: keras.Model) -> keras.Layer:
    """The layer that applies the model's final softmax (`describe` checked there is one)."""
    for layer in reversed(model.layers):
        if type(layer).__name__ in _SOFTMAX_LAYERS:
            return layer
    raise ValueError("the model has no softmax layer")


def _clone(model: keras.Model, *, per_step: bool, logits: bool = False) -> keras.Model:
    """Same layers and weights with a (None, features) input.

    per_step: the last recurrent layer returns sequences, so the head runs on every step.
    logits: the final softmax is left out (a Dense keeps its kernel, with a linear activation).
    """
    recurrent = [layer for layer in model.layers if type(layer).__name__ in RECURRENT_KINDS]
    last = recurrent[-1]
    softmax = _final_softmax(model) if logits else None

    def clone(layer: keras.Layer) -> keras.Layer:
        config = layer.get_config()
        if per_step and layer is last:
            config["return_sequences"] = True
        if softmax is not None and layer is softmax:
            if type(layer).__name__ != "Dense":
                return keras.layers.Activation("linear", name=softmax.name)
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    features = model.inputs[0].shape[-1]
    copy = keras.models.clone_model(
        model, input_tensors=keras.Input((None, features)), clone_function=clone
    )
    copy.set_weights(model.get_weights())
    return copy


def per_step_model(model: keras.Model) -> keras.Model:
    """Clone whose last recurrent layer returns sequences, so the head runs on every step."""
    return _clone(model, per_step=True)


def _predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False), dtype=np.float32)


def _last(values: np.ndarray) -> np.ndarray:
    return values[:, -1] if values.ndim == 3 else values


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(1.0, np.max(np.abs(b), axis=-1, keepdims=True))
    return float(np.max(np.abs(a - b) / scale))


class _Probe:
    """Checks that the per-step clone is the model, on a few prefixes of each length group.

    Probabilities must agree to 1e-5. Where they do not, logits decide: in a numerically unstable
    model (`numerics`) a faithful clone can flip a near-tie between classes, so its probabilities
    move by up to 1 while its logits still agree to float32 rounding relative to their size. A
    clone that computes something else disagrees in both.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        fixed = model.inputs[0].shape[1]
        self.direct = model if fixed is None else _clone(model, per_step=False)
        self.direct_logits: keras.Model | None = None

    def _logits(self) -> keras.Model:
        if self.direct_logits is None:
            self.direct_logits = _clone(self.model, per_step=False, logits=True)
        return self.direct_logits

    def check(
        self, frames: np.ndarray, probabilities: np.ndarray, logits: np.ndarray, *, whole: bool
    ) -> None:
        """`frames` [B, t, F] against the clone's answers [B, C] after its last step."""
        direct = _last(_predict(self.model if whole else self.direct, frames))
        diff = float(np.max(np.abs(direct - probabilities)))
        if diff <= _TOLERANCE:
            return
        relative = _relative(logits, _last(_predict(self._logits(), frames)))
        if relative > _TOLERANCE:
            step = frames.shape[1] - 1
            raise ParityError(
                f"per-step clone differs from the model at step {step}: probabilities by "
                f"{diff:.3g}, logits by {relative:.3g} of their size"
            )


def keras_outputs(
    model: keras.Model, x: np.ndarray, lengths: np.ndarray, probe_steps: int = 3
) -> KerasOutputs:
    """Per-step probabilities and logits [n, T, C] for raw padded `x`; zeros after each length.

    Samples are run unpadded (grouped by length) so a Masking layer never changes the result.
    `probe_steps` prefixes per length group are checked against the model itself (`_Probe`).
    """
    per_step = per_step_model(model)
    per_step_logits = _clone(model, per_step=True, logits=True)
    probe = _Probe(model)
    fixed = model.inputs[0].shape[1]
    n, steps, _ = x.shape
    probabilities: np.ndarray | None = None
    logits: np.ndarray | None = None
    for length in sorted({int(v) for v in lengths}):
        rows = np.flatnonzero(lengths == length)
        frames = x[rows, :length]
        p = _predict(per_step, frames)
        z = _predict(per_step_logits, frames)
        if probabilities is None or logits is None:
            probabilities = np.zeros((n, steps, p.shape[-1]), np.float32)
            logits = np.zeros((n, steps, p.shape[-1]), np.float32)
        probabilities[rows, :length] = p
        logits[rows, :length] = z
        for t in np.unique(np.linspace(0, length - 1, probe_steps).astype(int)):
            # A fixed-length model runs whole sequences itself: check those against it.
            whole = length == fixed and t == length - 1
            probe.check(frames[:, : t + 1], p[:, t], z[:, t], whole=whole)
    assert probabilities is not None and logits is not None
    return KerasOutputs(probabilities, logits)


def keras_per_step(
    model: keras.Model, x: np.ndarray, lengths: np.ndarray, probe_steps: int = 3
) -> np.ndarray:
    """Per-step probabilities [n, T, C] (see `keras_outputs`)."""
    return keras_outputs(model, x, lengths, probe_steps).probabilities


def window_predict(
    model: keras.Model, frames: np.ndarray, window: int, *, early: Early = "partial"
) -> np.ndarray:
    """Keras's answer at every frame of streams `frames` [B, n, F] (or one stream [n, F]).

    The answer at frame t is the model on frames[t - window + 1 : t + 1], the last `window`
    frames, as a window-trained model is run by its author (`predict` after every new frame).
    Before `window` frames have arrived (t < window - 1), `early` says what the answer is:
    "partial" (the model on the frames so far, from a zero state: what window serving answers)
    or "wait" (NaN: no answer yet, as in the tutorial loop that calls predict only once it holds
    `window` frames). Returns [B, n, C] (or [n, C]) float32.

    Two calls in all: every full window of every stream as one batch through the model (the
    computation predict runs; bit-identical to it here), and the first window - 1 frames through
    the per-step clone, whose answer at step t is the model on the frames up to t.
    """
    single = frames.ndim == 2
    x = np.asarray(frames[None] if single else frames, dtype=np.float32)
    answers = window_answers(model, list(x), window, early=early)
    return answers[0] if single else np.stack(answers)


def window_answers(
    model: keras.Model, streams: Sequence[np.ndarray], window: int, *, early: Early = "partial"
) -> list[np.ndarray]:
    """`window_predict` for streams of different lengths ([n_i, F] each), still in two calls."""
    fixed = model.inputs[0].shape[1]
    if window < 1 or (fixed is not None and fixed != window):
        raise ValueError(f"window {window} for a model whose input takes {fixed} frames")
    classes = int(model.outputs[0].shape[-1])
    streams = [np.asarray(s, np.float32) for s in streams]
    out = [np.full((len(s), classes), np.nan, np.float32) for s in streams]
    # Every full window of every stream, one batch: windows[k] = streams[i][start : start + T].
    where = [(i, start) for i, s in enumerate(streams) for start in range(len(s) - window + 1)]
    if where:
        windows = np.stack([streams[i][start : start + window] for i, start in where])
        for (i, start), answer in zip(where, _last(_predict(model, windows)), strict=True):
            out[i][start + window - 1] = answer
    if early == "partial" and window > 1:
        per_step = per_step_model(model)
        # The first window - 1 frames of each stream, grouped by how many there are.
        heads = [min(window - 1, len(s)) for s in streams]
        for count in sorted(set(heads) - {0}):
            rows = [i for i, n in enumerate(heads) if n == count]
            answers = _predict(per_step, np.stack([streams[i][:count] for i in rows]))
            for i, answer in zip(rows, answers, strict=True):
                out[i][:count] = answer
    return out
