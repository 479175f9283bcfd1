"""numpy <-> ``Matrix`` (packed little-endian float32), shared by the server and the client."""

from __future__ import annotations

import numpy as np

from .seqserve_pb2 import Matrix

__all__ = ["from_matrix", "to_matrix"]


def to_matrix(values: np.ndarray) -> Matrix:
    """A 2-D array (a 1-D one is one row) as a Matrix."""
    values = np.ascontiguousarray(values, dtype="<f4")
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2:
        raise ValueError(f"expected a [rows, cols] array, got shape {values.shape}")
    return Matrix(rows=values.shape[0], cols=values.shape[1], data=values.tobytes())


def from_matrix(m: Matrix, default_cols: int = 0) -> np.ndarray:
    """A read-only ``[rows, cols]`` float32 view; ValueError says what does not fit.

    ``rows``/``cols`` may be left 0 and are then inferred from the data and ``default_cols``."""
    size = len(m.data)
    if size == 0 or size % 4:
        raise ValueError(
            f"data holds {size} bytes, need a non-empty multiple of 4 (little-endian float32)"
        )
    values = size // 4
    cols = m.cols or (values // m.rows if m.rows else default_cols)
    rows = m.rows or (values // cols if cols else 0)
    if rows * cols != values:
        raise ValueError(f"{values} floats do not fill rows={m.rows} x cols={m.cols}")
    return np.frombuffer(m.data, dtype="<f4").reshape(rows, cols)
