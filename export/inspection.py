"""Human-readable per-layer report of a Keras model or a model directory, formula-checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ExportError
from .spec import ModelSpec, expected_params

__all__ = ["check_entries", "format_entries", "inspect_path"]


def check_entries(entries: list[dict[str, Any]]) -> None:
    """Raise `ExportError` if any layer's parameter count disagrees with its formula."""
    for entry in entries:
        if entry["type"] == "Activation":
            continue
        expected = expected_params(
            entry["type"],
            entry["units"],
            entry["input_size"],
            reset_after=entry.get("reset_after", True),
        )
        if entry["params"] != expected:
            raise ExportError(
                f"layer {entry['name']!r}: {entry['params']} parameters, formula gives {expected}"
            )


def format_entries(entries: list[dict[str, Any]], features: int) -> str:
    lines = [
        f"input features: {features}",
        f"{'layer':<16} {'type':<10} {'units':>6} {'input':>6} {'activation':<14} "
        f"{'states':<30} {'params':>9}",
    ]
    total = 0
    for e in entries:
        states = ",".join(f"{s}[{e['units']}]" for s in e.get("states", [])) or "-"
        activation = e["activation"]
        if e.get("recurrent_activation"):
            activation += "/" + e["recurrent_activation"]
        lines.append(
            f"{e['name']:<16} {e['type']:<10} {e.get('units', '-')!s:>6} "
            f"{e.get('input_size', '-')!s:>6} {activation:<14} {states:<30} {e['params']:>9,}"
        )
        total += e["params"]
    lines.append(f"total parameters: {total:,} (formulas checked)")
    return "\n".join(lines)


def inspect_path(path: Path) -> str:
    """Report for a model directory (reads model.json) or a Keras model file / SavedModel."""
    if path.is_dir() and (path / "model.json").exists():
        meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
        entries, features = meta["layers"], int(meta["features"])
        header = f"{meta['name']} v{meta['version']} ({meta['format']}), opset {meta['opset']}"
    else:
        from .loading import load
        from .modeldir import layer_entries
        from .spec import describe

        spec: ModelSpec = describe(load(path))
        entries, features = layer_entries(spec), spec.features
        header = f"{path.name}: Keras model"
    check_entries(entries)
    return header + "\n" + format_entries(entries, features)
