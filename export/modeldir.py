"""Write a `seqserve-model/1` directory (see models/README.md) all at once or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .spec import Activation, Dense, ModelSpec, Recurrent

__all__ = ["FORMAT", "layer_entries", "manifest", "write"]

FORMAT = "seqserve-model/1"


def layer_entries(spec: ModelSpec) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for layer in (*spec.recurrent, *spec.head):
        if isinstance(layer, Recurrent):
            entry: dict[str, Any] = {
                "name": layer.name,
                "type": layer.kind,
                "units": layer.units,
                "input_size": layer.input_size,
                "activation": layer.activation,
            }
            if layer.recurrent_activation is not None:
                entry["recurrent_activation"] = layer.recurrent_activation
            if layer.kind == "GRU":
                entry["reset_after"] = layer.reset_after
            entry["params"] = layer.params
            entry["states"] = [f"{layer.name}_{kind}" for kind in layer.state_kinds]
        elif isinstance(layer, Dense):
            entry = {
                "name": layer.name,
                "type": "Dense",
                "units": layer.units,
                "input_size": layer.input_size,
                "activation": layer.activation,
                "params": layer.params,
            }
        else:
            assert isinstance(layer, Activation)
            entry = {
                "name": layer.name,
                "type": "Activation",
                "activation": layer.activation,
                "params": 0,
            }
        entries.append(entry)
    return entries


def manifest(
    spec: ModelSpec,
    *,
    name: str,
    version: str,
    labels: list[str],
    window: int | None,
    opset: int,
    graphs: Mapping[str, bytes],
    source: Mapping[str, str],
    parity: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """model.json content; `graphs` maps 'sequence' / 'step' to the serialized ONNX bytes.

    `window`: T for a window-trained model (each answer is the model on the last T frames),
    None for a model served as a stateful stream.
    """
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "features": spec.features,
        "labels": labels,
        "window": window,
        "normalization": {
            "mean": [float(v) for v in spec.mean],
            "std": [float(v) for v in spec.std],
            "in_graph": True,
        },
        "layers": layer_entries(spec),
        "states": [
            {
                "name": s.name,
                "layer": s.layer,
                "kind": s.kind,
                "size": s.size,
                "input": s.input,
                "output": s.output,
            }
            for s in spec.states
        ],
        "parameters": spec.parameters,
        "opset": opset,
        "graphs": {
            key: {"file": f"{key}.onnx", "sha256": hashlib.sha256(data).hexdigest()}
            for key, data in graphs.items()
        },
        "source": dict(source),
        "parity": dict(parity),
        **extra,
    }


def write(
    out: Path,
    *,
    model_json: dict[str, Any],
    graphs: Mapping[str, bytes],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    copies: Mapping[str, Path] | None = None,
) -> list[Path]:
    """Stage every file in a temporary sibling folder, then move them into `out`."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for key, data in graphs.items():
            (staging / f"{key}.onnx").write_bytes(data)
        for key, values in arrays.items():
            with (staging / f"{key}.npz").open("wb") as stream:
                np.savez_compressed(stream, **dict(values))  # type: ignore[arg-type]
        for filename, path in (copies or {}).items():
            shutil.copyfile(path, staging / filename)
        text = json.dumps(model_json, indent=2) + "\n"
        (staging / "model.json").write_text(text, encoding="utf-8")
        out.mkdir(exist_ok=True)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
            written.append(out / item.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
