"""Activation functions the exporter can reproduce, by Keras name, as TensorFlow ops."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

__all__ = ["ACTIVATIONS", "activation"]


def _hard_sigmoid(x: tf.Tensor) -> tf.Tensor:
    # Keras 3 definition: relu6(x + 3) / 6.
    return tf.nn.relu6(x + 3.0) / 6.0


ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "linear": tf.identity,
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
    "relu": tf.nn.relu,
    "hard_sigmoid": _hard_sigmoid,
    "softsign": tf.nn.softsign,
    "softplus": tf.nn.softplus,
    "elu": tf.nn.elu,
    "softmax": lambda x: tf.nn.softmax(x, axis=-1),
}


def activation(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The TensorFlow op for a Keras activation name (validated by `spec`)."""
    return ACTIVATIONS[name]
