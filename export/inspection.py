"""Human-readable per-layer report of a Keras model or a model directory, formula-checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ExportError
from .spec import ModelSpec, expected_params

__all__ = ["check_entries", "format_entries", "inspect_path", "serving_line"]


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


def serving_line(window: int | None, detected: bool | None = None) -> str:
    """How the server answers each frame, for a model dir or a Keras file."""
    if window is None:
        text = "serving: stateful stream (each answer: the model on every frame since the start)"
    else:
        text = (
            f"serving: window of {window} frames (each answer: the model on the last {window} "
            "frames)"
        )
    if detected is not None:
        text += "; detected by convert --window auto" if detected else ""
    return text


def _numerics_line(numerics: dict[str, Any] | None) -> str:
    if numerics is None:
        return "numerics: not recorded (exported before seqserve-export checked them)"
    peaks = numerics.get("peaks", {})
    largest = max(peaks, key=peaks.get) if peaks else None
    peak = f"largest values {peaks[largest]:.3g} in {largest}" if largest else ""
    if numerics.get("stable"):
        return f"numerics: stable ({peak})"
    warning = str(numerics.get("warning"))
    return f"numerics: UNSTABLE: {warning.removeprefix('numerically unstable model: ')}"


def inspect_path(path: Path) -> str:
    """Report for a model directory (reads model.json) or a Keras model file / SavedModel."""
    extra: list[str] = []
    if path.is_dir() and (path / "model.json").exists():
        meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
        entries, features = meta["layers"], int(meta["features"])
        header = f"{meta['name']} v{meta['version']} ({meta['format']}), opset {meta['opset']}"
        serving = serving_line(meta.get("window"))
        extra.append(_numerics_line(meta.get("numerics")))
    else:
        from .loading import load
        from .modeldir import layer_entries
        from .spec import describe
        from .window import detect

        model = load(path)
        spec: ModelSpec = describe(model)
        entries, features = layer_entries(spec), spec.features
        header = f"{path.name}: Keras model"
        window = detect(model, spec)
        serving = serving_line(window, detected=window is not None)
    check_entries(entries)
    return "\n".join([header, format_entries(entries, features), serving, *extra])
