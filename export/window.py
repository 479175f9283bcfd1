"""Window-trained models: detect them, resolve `--window`, cut parity samples into windows.

A classifier trained on fixed windows of T frames (input (T, features), last recurrent layer
without return_sequences) is run by its author on the last T frames after every new frame. A
stateful stream answers something else after T frames: the model on everything since the
session started, which it never saw in training. model.json records `window: T` so the server
answers each step with the model on the last T frames; `window: null` (or no key) is a model
trained on whole sequences, served as a stateful stream.
"""

from __future__ import annotations

from typing import Literal

import keras
import numpy as np

from .errors import ExportError
from .spec import ModelSpec

__all__ = ["WindowOption", "cut", "detect", "resolve"]

WindowOption = int | Literal["auto", "none"]


def detect(model: keras.Model, spec: ModelSpec) -> int | None:
    """T when the input has a fixed time dimension T and the last recurrent layer returns only
    its last step; None otherwise."""
    steps = model.inputs[0].shape[1]
    if steps is None or spec.recurrent[-1].return_sequences:
        return None
    return int(steps)


def resolve(model: keras.Model, spec: ModelSpec, option: WindowOption) -> int | None:
    """The window to record: detected ("auto"), none ("none"), or forced to an int."""
    if option == "auto":
        return detect(model, spec)
    if option == "none":
        return None
    if isinstance(option, bool) or not isinstance(option, int) or option < 1:
        raise ExportError(f"window must be 'auto', 'none' or a number of frames >= 1: {option!r}")
    steps = model.inputs[0].shape[1]
    if steps is not None and steps != option:
        raise ExportError(
            f"--window {option}, but the model's input takes exactly {steps} frames: Keras "
            f"cannot run it on windows of {option} (use --window {steps} or auto)"
        )
    return option


def cut(
    x: np.ndarray, lengths: np.ndarray, window: int, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of recordings x [n, T, F]: the last, first and a middle `window` frames of each
    (a recording shorter than the window stays whole), at most `limit`, last windows first.

    These are what a window model is served on, from a zero state: every per-step answer of a
    window is the model on the frames so far, so the first window also covers the answers
    before `window` frames have arrived.
    """
    picks: list[tuple[int, int, int]] = []  # (recording, start, length)
    for which in ("last", "first", "middle"):
        for i, n in enumerate(int(v) for v in lengths):
            if n <= window:
                if which == "last":
                    picks.append((i, 0, n))
                continue
            start = {"last": n - window, "first": 0, "middle": (n - window) // 2}[which]
            picks.append((i, start, window))
    unique = list(dict.fromkeys(picks))[:limit]
    out = np.zeros((len(unique), window, x.shape[-1]), np.float32)
    for row, (i, start, n) in enumerate(unique):
        out[row, :n] = x[i, start : start + n]
    return out, np.array([n for _, _, n in unique], np.int64)
