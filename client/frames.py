"""Checking and shaping frames on the client, so a bad array fails before it is sent."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInput

__all__ = ["as_frames", "as_sequences"]


def as_frames(frames: Any, features: int = 0, what: str = "frames") -> np.ndarray:
    """One frame ``[F]`` or many ``[T, F]`` as a C-contiguous float32 ``[T, F]`` array."""
    try:
        array = np.asarray(frames, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what}: not a numeric array ({exc})", reason="bad_frames") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInput(
            f"{what}: expected one frame [features] or frames [time, features], "
            f"got shape {array.shape}",
            reason="bad_frames",
        )
    if features and array.shape[1] != features:
        raise InvalidInput(
            f"{what}: {array.shape[1]} features per frame, the model expects {features}",
            reason="feature_count",
        )
    if not np.isfinite(array).all():
        bad = int(np.argwhere(~np.isfinite(array))[0][0])
        raise InvalidInput(f"{what}: frame {bad} holds NaN or Inf", reason="non_finite")
    return np.ascontiguousarray(array)


def as_sequences(sequences: Any, lengths: Any = None, features: int = 0) -> list[np.ndarray]:
    """Sequences of different lengths: a list of ``[T_i, F]`` arrays, one ``[T, F]`` array, or a
    padded ``[n, T, F]`` array with optional ``lengths`` (default: all ``T``)."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 3:
        n, steps = sequences.shape[:2]
        counts = [steps] * n if lengths is None else [int(v) for v in np.asarray(lengths)]
        if len(counts) != n:
            raise InvalidInput(f"{len(counts)} lengths for {n} sequences", reason="bad_frames")
        for i, count in enumerate(counts):
            if not 1 <= count <= steps:
                raise InvalidInput(
                    f"sequence {i}: length {count} outside 1..{steps}", reason="bad_frames"
                )
        return [
            as_frames(sequences[i, :count], features, f"sequence {i}")
            for i, count in enumerate(counts)
        ]
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences = [sequences]
    if lengths is not None:
        raise InvalidInput(
            "lengths apply only to a padded [n, time, features] array", reason="bad_frames"
        )
    items = list(sequences)
    if not items:
        raise InvalidInput("no sequences given", reason="bad_frames")
    return [as_frames(s, features, f"sequence {i}") for i, s in enumerate(items)]
