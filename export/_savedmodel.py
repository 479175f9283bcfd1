"""Rebuild a Keras-2 (tf.keras / tf_keras) SavedModel as a Keras 3 model.

Keras 3 loads SavedModels only as opaque TFSMLayers. A Keras-2 SavedModel, though, stores the
model config as JSON in keras_metadata.pb and the weights in the variables checkpoint under
`layer_with_weights-N/...`; that is all a stack of layers needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["rebuild"]

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message, wire types 0 and 2 only."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            size, pos = _varint(data, pos)
            out.append((number, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return out


def _tuples(obj: dict[str, Any]) -> Any:
    """Keras 2's JSON encoder writes tuples as {"class_name": "__tuple__", "items": [...]}."""
    if obj.get("class_name") == "__tuple__" and "items" in obj:
        return tuple(obj["items"])
    return obj


def _root_config(metadata: Path) -> dict[str, Any]:
    """SavedMetadata.nodes (field 1) -> the node whose node_path (3) is 'root' -> metadata (5)."""
    for number, node in _fields(metadata.read_bytes()):
        if number != 1 or not isinstance(node, bytes):
            continue
        fields = dict(_fields(node))
        if fields.get(3) == b"root":
            raw = fields.get(5)
            if not isinstance(raw, bytes):
                break
            meta = json.loads(raw, object_hook=_tuples)
            return {"class_name": meta["class_name"], "config": meta["config"]}
    raise ValueError("keras_metadata.pb has no root model metadata")


def rebuild(path: Path, metadata: Path) -> keras.Model:
    config = _root_config(metadata)
    for layer in config["config"].get("layers", []):
        options = layer.get("config", {})
        # Keras-2-only RNN option; time-major inputs are a different layout altogether.
        if options.pop("time_major", False):
            raise ValueError(f"layer {options.get('name')!r}: time_major=True is not supported")
    # The legacy-config reader that Keras 3 uses for .h5 files also reads Keras-2 configs here.
    from keras.src.legacy.saving.saving_utils import model_from_config

    model = model_from_config(config)
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    names = [key for key in reader.get_variable_to_shape_map() if key.endswith(_SUFFIX)]
    weighted = [layer for layer in model.layers if layer.weights]
    for index, layer in enumerate(weighted):
        prefix = f"layer_with_weights-{index}/"
        stored = {
            key[len(prefix) : -len(_SUFFIX)].rsplit("/", 1)[-1]: key
            for key in names
            if key.startswith(prefix)
        }
        values = []
        for weight in layer.weights:
            if weight.name not in stored:
                raise KeyError(f"layer {layer.name!r}: no stored value for {weight.name!r}")
            value = np.asarray(reader.get_tensor(stored[weight.name]))
            values.append(value.reshape(weight.shape))
        layer.set_weights(values)
    return model
