"""Errors raised by the exporter; plain exceptions, no I/O."""

from __future__ import annotations

__all__ = ["ExportError", "NumericsError", "ParityError", "UnsupportedModelError"]


class ExportError(Exception):
    """Base class: the export stopped and wrote nothing."""


class UnsupportedModelError(ExportError):
    """The Keras model contains something a stateful stream cannot reproduce exactly."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"layer {layer!r}: {reason}")
        self.layer = layer
        self.reason = reason


class ParityError(ExportError):
    """An ONNX graph is materially further from the model's answers than Keras is.

    `parity` holds the measured distances (a `parity.Parity`) when they were measured.
    """

    def __init__(self, message: str, parity: object | None = None) -> None:
        super().__init__(message)
        self.parity = parity


class NumericsError(ExportError):
    """The model is numerically unstable in float32 and `strict` asked to refuse it."""
