"""Keras per-step probabilities: the model's output given the prefix up to each step."""

from __future__ import annotations

import keras
import numpy as np

from .errors import ParityError
from .spec import RECURRENT_KINDS

__all__ = ["keras_per_step", "per_step_model"]

_TOLERANCE = 1e-5


def _clone(model: keras.Model, *, per_step: bool) -> keras.Model:
    """Same layers and weights with a (None, features) input; optionally per-step outputs."""
    recurrent = [layer for layer in model.layers if type(layer).__name__ in RECURRENT_KINDS]
    last = recurrent[-1]

    def clone(layer: keras.Layer) -> keras.Layer:
        config = layer.get_config()
        if per_step and layer is last:
            config["return_sequences"] = True
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


def keras_per_step(
    model: keras.Model, x: np.ndarray, lengths: np.ndarray, probe_steps: int = 3
) -> np.ndarray:
    """Per-step probabilities [n, T, C] for raw padded `x`; zeros after each sample's length.

    Samples are run unpadded (grouped by length) so a Masking layer never changes the result.
    `probe_steps` prefixes per length group are checked against `model(x[:, :t+1])` directly.
    """
    per_step = per_step_model(model)
    fixed = model.inputs[0].shape[1]
    direct_model = model if fixed is None else _clone(model, per_step=False)
    n, steps, _ = x.shape
    out: np.ndarray | None = None
    for length in sorted(set(int(v) for v in lengths)):
        rows = np.flatnonzero(lengths == length)
        frames = x[rows, :length]
        probabilities = _predict(per_step, frames)
        if out is None:
            out = np.zeros((n, steps, probabilities.shape[-1]), np.float32)
        out[rows, :length] = probabilities
        for t in np.unique(np.linspace(0, length - 1, probe_steps).astype(int)):
            direct = _predict(direct_model, frames[:, : t + 1])
            if direct.ndim == 3:  # the model itself returns sequences
                direct = direct[:, -1]
            diff = float(np.max(np.abs(direct - probabilities[:, t])))
            if diff > _TOLERANCE:
                raise ParityError(f"per-step clone differs from the model at step {t}: {diff:.3g}")
        if length == fixed:  # a fixed-length model can only be run on whole sequences
            whole = _predict(model, frames)
            whole = whole[:, -1] if whole.ndim == 3 else whole
            diff = float(np.max(np.abs(whole - probabilities[:, -1])))
            if diff > _TOLERANCE:
                raise ParityError(f"per-step clone differs from the model: {diff:.3g}")
    assert out is not None
    return out
