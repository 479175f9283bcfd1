"""Load a user's Keras model from `.keras`, legacy `.h5`, or a Keras-2 SavedModel directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras

from .errors import ExportError

__all__ = ["load", "sha256"]


def sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode())
            digest.update(hashlib.sha256(item.read_bytes()).digest())
    else:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load(path: Path) -> keras.Model:
    """Load without compiling; raise `ExportError` with the reason when it cannot be read."""
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_saved_model(path)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ExportError(f"{path}: expected a .keras or .h5 file or a SavedModel directory")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types; keep the message
        raise ExportError(f"{path}: cannot load Keras model: {exc}") from exc


def _load_saved_model(path: Path) -> keras.Model:
    """A Keras-2 SavedModel keeps its layer config in keras_metadata.pb; rebuild from it.

    Keras 3 cannot load SavedModels as Keras models (only as opaque TFSMLayer), so we read the
    architecture from the metadata and the weights from the variables checkpoint.
    """
    metadata = path / "keras_metadata.pb"
    if not (path / "saved_model.pb").exists():
        raise ExportError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    if not metadata.exists():
        raise ExportError(
            f"{path}: SavedModel without keras_metadata.pb (e.g. from Keras 3 model.export()) has "
            "no layer structure to convert; export the Keras model as .keras instead"
        )
    from ._savedmodel import rebuild  # heavy protobuf imports only when needed

    try:
        return rebuild(path, metadata)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        reason = str(exc)[:300]
        raise ExportError(f"{path}: cannot rebuild Keras model from SavedModel: {reason}") from exc
