"""Errors raised by the exporter; plain exceptions, no I/O."""

from __future__ import annotations

__all__ = ["ExportError", "ParityError", "UnsupportedModelError"]


class ExportError(Exception):
    """Base class: the export stopped and wrote nothing."""


class UnsupportedModelError(ExportError):
    """The Keras model contains something a stateful stream cannot reproduce exactly."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"layer {layer!r}: {reason}")
        self.layer = layer
        self.reason = reason


class ParityError(ExportError):
    """The ONNX graphs disagree with Keras beyond the tolerance."""
