"""TensorFlow functions for the two served graphs, built from a `ModelSpec`.

`sequence_function` reuses the Keras recurrent layers (cloned with return_sequences and
return_state, initial states from inputs) so that tf2onnx emits ONNX LSTM/GRU/RNN ops.
`step_function` writes one cell step with explicit matmuls and elementwise ops (Keras gate order:
LSTM i, f, c, o; GRU z, r, h) so that every node runs on onnxruntime's CUDA provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from .activations import activation
from .spec import Activation, Dense, ModelSpec, Recurrent

__all__ = ["FRAMES", "PROBABILITIES", "sequence_function", "step_function"]

FRAMES = "frames"
PROBABILITIES = "probabilities"


def _signature(spec: ModelSpec, frame_shape: list[int | None]) -> list[tf.TensorSpec]:
    return [tf.TensorSpec(frame_shape, tf.float32, name=FRAMES)] + [
        tf.TensorSpec([None, state.size], tf.float32, name=state.input) for state in spec.states
    ]


def _normalize(spec: ModelSpec, frames: tf.Tensor) -> tf.Tensor:
    return (frames - tf.constant(spec.mean)) / tf.constant(spec.std)


def _head(spec: ModelSpec, x: tf.Tensor) -> tf.Tensor:
    for layer in spec.head:
        if isinstance(layer, Dense):
            x = tf.matmul(x, tf.constant(layer.kernel))
            if layer.bias is not None:
                x = x + tf.constant(layer.bias)
        assert isinstance(layer, Dense | Activation)
        x = activation(layer.activation)(x)
    return x


def _outputs(spec: ModelSpec, probabilities: tf.Tensor, states: Sequence[tf.Tensor]) -> list:
    return [tf.identity(probabilities, name=PROBABILITIES)] + [
        tf.identity(value, name=state.output)
        for value, state in zip(states, spec.states, strict=True)
    ]


def _clone(layer: Recurrent) -> keras.Layer:
    config = dict(
        layer.config,
        name=layer.name,
        return_sequences=True,
        return_state=True,
        stateful=False,
        dropout=0.0,
        recurrent_dropout=0.0,
    )
    clone = getattr(keras.layers, layer.kind).from_config(config)
    clone.build((None, None, layer.input_size))
    weights = [layer.kernel, layer.recurrent_kernel]
    if layer.bias is not None:
        weights.append(layer.bias)
    clone.set_weights(weights)
    return clone


def sequence_function(spec: ModelSpec) -> tf.types.experimental.PolymorphicFunction:
    """frames [B, T, F] + states -> per-step probabilities [B, T, C] + final states."""
    clones = [_clone(layer) for layer in spec.recurrent]

    @tf.function(input_signature=_signature(spec, [None, None, spec.features]), autograph=False)
    def sequence(frames: tf.Tensor, *states: tf.Tensor) -> list:
        x = _normalize(spec, frames)
        finals: list[tf.Tensor] = []
        offset = 0
        for layer, clone in zip(spec.recurrent, clones, strict=True):
            count = len(layer.state_kinds)
            result = clone(x, initial_state=list(states[offset : offset + count]))
            x, finals = result[0], finals + list(result[1:])
            offset += count
        return _outputs(spec, _head(spec, x), finals)

    sequence.clones = clones  # keep the Keras variables alive as long as the function
    return sequence


def _cell(layer: Recurrent, x: tf.Tensor, states: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    act = activation(layer.activation)
    kernel = tf.constant(layer.kernel)
    recurrent = tf.constant(layer.recurrent_kernel)
    if layer.kind == "SimpleRNN":
        h = tf.matmul(x, kernel)
        if layer.bias is not None:
            h = h + tf.constant(layer.bias)
        return [act(h + tf.matmul(states[0], recurrent))]
    gate = activation(layer.recurrent_activation or "sigmoid")
    if layer.kind == "LSTM":
        h_prev, c_prev = states
        z = tf.matmul(x, kernel) + tf.matmul(h_prev, recurrent)
        if layer.bias is not None:
            z = z + tf.constant(layer.bias)
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
        c = gate(z_f) * c_prev + gate(z_i) * act(z_c)
        return [gate(z_o) * act(c), c]
    return [_gru(layer, x, states[0], kernel, recurrent, act, gate)]


def _gru(
    layer: Recurrent,
    x: tf.Tensor,
    h_prev: tf.Tensor,
    kernel: tf.Tensor,
    recurrent: tf.Tensor,
    act: Callable[[tf.Tensor], tf.Tensor],
    gate: Callable[[tf.Tensor], tf.Tensor],
) -> tf.Tensor:
    units = layer.units
    matrix_x = tf.matmul(x, kernel)
    bias = layer.bias
    if bias is not None:
        matrix_x = matrix_x + tf.constant(bias[0] if layer.reset_after else bias)
    x_z, x_r, x_h = tf.split(matrix_x, 3, axis=-1)
    if layer.reset_after:
        inner = tf.matmul(h_prev, recurrent)
        if bias is not None:
            inner = inner + tf.constant(bias[1])
        r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
        z = gate(x_z + r_z)
        r = gate(x_r + r_r)
        candidate = act(x_h + r * r_h)
    else:
        inner = tf.matmul(h_prev, recurrent[:, : 2 * units])
        r_z, r_r = tf.split(inner, 2, axis=-1)
        z = gate(x_z + r_z)
        r = gate(x_r + r_r)
        candidate = act(x_h + tf.matmul(r * h_prev, recurrent[:, 2 * units :]))
    return z * h_prev + (1.0 - z) * candidate


def step_function(spec: ModelSpec) -> tf.types.experimental.PolymorphicFunction:
    """frames [B, F] + states -> probabilities [B, C] + next states, no recurrent ops."""

    @tf.function(input_signature=_signature(spec, [None, spec.features]), autograph=False)
    def step(frames: tf.Tensor, *states: tf.Tensor) -> list:
        x = _normalize(spec, frames)
        finals: list[tf.Tensor] = []
        offset = 0
        for layer in spec.recurrent:
            count = len(layer.state_kinds)
            new = _cell(layer, x, states[offset : offset + count])
            x, finals = new[0], finals + new
            offset += count
        return _outputs(spec, _head(spec, x), finals)

    return step
