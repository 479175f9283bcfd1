"""The model's maths in float64 numpy, from a `ModelSpec`: the exact answer parity is judged by.

Keras, sequence.onnx and step.onnx are all float32 computations of one model, each with its own
order of summation. None of them is exact, so none can be the yardstick for the others; this
forward pass, with the same float32 weights but float64 arithmetic, is (to ~1e-16 relative, far
below any float32 rounding). It follows the Keras cell equations (gate order LSTM i, f, c, o;
GRU z, r, h, both GRU bias layouts), the in-graph normalization and the Dense head.

Samples are run unpadded, one length at a time, so Masking never triggers (as in `reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .spec import Activation, Dense, ModelSpec, Recurrent

__all__ = ["ACTIVATIONS64", "Step", "Trace", "forward", "step", "trace"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only, so large |x| neither overflows nor warns.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


ACTIVATIONS64: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "hard_sigmoid": lambda x: np.clip((x + 3.0) / 6.0, 0.0, 1.0),  # relu6(x + 3) / 6
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "elu": _elu,
    "softmax": _softmax,
}


@dataclass(frozen=True)
class Trace:
    """Float64 outputs of a batch of samples, every step kept ([B, T, ...]).

    probabilities and logits are [B, T, C] (logits: the input of the final softmax); states maps
    each state name (`ModelSpec.states`) to its value after every step [B, T, size]; peaks maps
    each layer to the largest |value| it produced (states h and c of a recurrent layer, the
    pre-activation of a Dense layer), the figure that says where a model's numbers explode.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    states: dict[str, np.ndarray]
    peaks: dict[str, float]


@dataclass(frozen=True)
class Step:
    """One step of a batch from given states: outputs [B, C], new states [B, size] by name."""

    probabilities: np.ndarray
    logits: np.ndarray
    states: dict[str, np.ndarray]
    peaks: dict[str, float]


def _f64(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, dtype=np.float64)


def _peak(*values: np.ndarray) -> float:
    return max(float(np.max(np.abs(v), initial=0.0)) for v in values)


def _cell(layer: Recurrent, x: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
    """One step of `layer` for x [B, I]; returns the new states (h first)."""
    act = ACTIVATIONS64[layer.activation]
    gate = ACTIVATIONS64[layer.recurrent_activation or "sigmoid"]
    kernel, recurrent, bias = _f64(layer.kernel), _f64(layer.recurrent_kernel), _f64(layer.bias)
    assert kernel is not None and recurrent is not None
    if layer.kind == "SimpleRNN":
        z = x @ kernel + states[0] @ recurrent
        return [act(z if bias is None else z + bias)]
    if layer.kind == "LSTM":
        h, c = states
        z = x @ kernel + h @ recurrent
        if bias is not None:
            z = z + bias
        z_i, z_f, z_c, z_o = np.split(z, 4, axis=-1)
        c = gate(z_f) * c + gate(z_i) * act(z_c)
        return [gate(z_o) * act(c), c]
    h = states[0]
    units = layer.units
    matrix_x = x @ kernel
    if bias is not None:
        matrix_x = matrix_x + (bias[0] if layer.reset_after else bias)
    x_z, x_r, x_h = np.split(matrix_x, 3, axis=-1)
    if layer.reset_after:
        inner = h @ recurrent
        if bias is not None:
            inner = inner + bias[1]
        r_z, r_r, r_h = np.split(inner, 3, axis=-1)
        z, r = gate(x_z + r_z), gate(x_r + r_r)
        candidate = act(x_h + r * r_h)
    else:
        r_z, r_r = np.split(h @ recurrent[:, : 2 * units], 2, axis=-1)
        z, r = gate(x_z + r_z), gate(x_r + r_r)
        candidate = act(x_h + (r * h) @ recurrent[:, 2 * units :])
    return [z * h + (1.0 - z) * candidate]


def step(spec: ModelSpec, frames: np.ndarray, states: Mapping[str, np.ndarray]) -> Step:
    """One float64 step of raw `frames` [B, F] from `states` (by name, [B, size] each)."""
    mean, std = np.asarray(spec.mean, np.float64), np.asarray(spec.std, np.float64)
    x = (np.asarray(frames, np.float64) - mean) / std
    new: dict[str, np.ndarray] = {}
    peaks: dict[str, float] = {}
    for layer in spec.recurrent:
        names = [f"{layer.name}_{kind}" for kind in layer.state_kinds]
        values = _cell(layer, x, [np.asarray(states[name], np.float64) for name in names])
        new.update(zip(names, values, strict=True))
        peaks[layer.name] = _peak(*values)
        x = values[0]
    logits = x
    last = len(spec.head) - 1
    for index, item in enumerate(spec.head):
        if isinstance(item, Dense):
            kernel, bias = _f64(item.kernel), _f64(item.bias)
            assert kernel is not None
            x = x @ kernel if bias is None else x @ kernel + bias
            peaks[item.name] = _peak(x)
        assert isinstance(item, Dense | Activation)
        if index == last:  # `describe` guarantees the head ends in a softmax
            logits = x
        x = ACTIVATIONS64[item.activation](x)
    return Step(probabilities=x, logits=logits, states=new, peaks=peaks)


def trace(spec: ModelSpec, frames: np.ndarray) -> Trace:
    """Float64 forward pass of raw `frames` [B, T, F] from zero states, every step kept."""
    batch, steps, _ = frames.shape
    states = {s.name: np.zeros((batch, s.size)) for s in spec.states}
    kept: list[Step] = []
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            kept.append(step(spec, frames[:, t], states))
            states = kept[-1].states
    peaks: dict[str, float] = {}
    for item in kept:
        for name, value in item.peaks.items():
            peaks[name] = max(peaks.get(name, 0.0), value)
    return Trace(
        probabilities=np.stack([k.probabilities for k in kept], axis=1),
        logits=np.stack([k.logits for k in kept], axis=1),
        states={s.name: np.stack([k.states[s.name] for k in kept], axis=1) for s in spec.states},
        peaks=peaks,
    )


def forward(spec: ModelSpec, x: np.ndarray, lengths: np.ndarray) -> Trace:
    """`trace` of padded samples x [n, T, F] run unpadded, grouped by length; zeros after."""
    n, steps, _ = x.shape
    probabilities = np.zeros((n, steps, spec.classes))
    logits = np.zeros((n, steps, spec.classes))
    states = {s.name: np.zeros((n, steps, s.size)) for s in spec.states}
    peaks: dict[str, float] = {}
    for length in sorted({int(v) for v in lengths}):
        rows = np.flatnonzero(lengths == length)
        part = trace(spec, x[rows, :length])
        probabilities[rows, :length] = part.probabilities
        logits[rows, :length] = part.logits
        for name, array in part.states.items():
            states[name][rows, :length] = array
        for name, peak in part.peaks.items():
            peaks[name] = max(peaks.get(name, 0.0), peak)
    return Trace(probabilities=probabilities, logits=logits, states=states, peaks=peaks)
