"""Recordings for the CLI: CSV / ``.npy`` files and the bundled models' test samples."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInput
from .results import ModelInfo

__all__ = [
    "InputError",
    "Recording",
    "bundled_samples",
    "check_features",
    "load_recordings",
    "truth_label",
]


_SLICE = re.compile(r"samples(?::(\d+)|\[(\d*):(\d*)\])?")
DEFAULT_SAMPLES = "basicmotions"  # the bundled default model


class InputError(Exception):
    """A recording cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Recording:
    name: str
    frames: np.ndarray  # [T, F] float32
    truth: str | int | None = None  # the true label (or class index) when known


def bundled_samples(model: str = "") -> Path:
    """The test recordings bundled with ``model`` (``models/<model>/samples.npz``; ``""``:
    the default model, basicmotions). ``SEQSERVE_SAMPLES`` overrides the path."""
    override = os.environ.get("SEQSERVE_SAMPLES")
    if override:
        return Path(override)
    import seqserve.models

    folder = Path(seqserve.models.__file__).parent
    if model and (Path(model).name != model or model.startswith(".")):
        return folder / "-" / "samples.npz"  # not a bundled model's name: no such file
    return folder / (model or DEFAULT_SAMPLES) / "samples.npz"


def load_recordings(source: str, model: str = "") -> list[Recording]:
    """``FILE.csv`` (rows = frames, optional header), ``FILE.npy`` ([T, F] or [n, T, F]),
    ``sample:N`` (test recording N bundled with ``model``, default basicmotions), ``samples``
    (all of them), ``samples:K`` (the first K) or a slice ``samples[A:B]``."""
    if source == "samples" or source.startswith(("samples:", "samples[")):
        return _samples(source, _selection(source), model)
    if source.startswith("sample:"):
        try:
            number = int(source[len("sample:") :])
        except ValueError:
            raise InputError(f"{source}: expected sample:N with a number N") from None
        return _samples(source, [number], model)
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"{source}: no such file (expected a .csv or .npy file, sample:N, "
            "samples, samples:K or samples[A:B])"
        )
    if path.suffix.lower() == ".npy":
        return _npy(path)
    return [Recording(path.name, _csv(path))]


def _selection(source: str) -> slice:
    match = _SLICE.fullmatch(source)
    if match is None:
        raise InputError(f"{source}: expected samples, samples:K or samples[A:B]")
    count, start, stop = match.groups()
    if count is not None:
        return slice(0, int(count))
    return slice(int(start) if start else None, int(stop) if stop else None)


def _samples(source: str, chosen: slice | list[int], model: str) -> list[Recording]:
    path = bundled_samples(model)
    if not path.is_file():
        if model and not os.environ.get("SEQSERVE_SAMPLES"):
            bundled = sorted(p.parent.name for p in path.parent.parent.glob("*/samples.npz"))
            raise InputError(
                f"{source}: no samples are bundled with model {model!r} (bundled: "
                f"{', '.join(bundled) or 'none'}); set SEQSERVE_SAMPLES to a samples.npz"
            )
        raise InputError(f"{source}: the bundled samples are missing ({path})")
    with np.load(path) as data:
        x, lengths = data["x"], data["lengths"]
        y = data["y"] if "y" in data.files else None
    if isinstance(chosen, slice):
        indices = list(range(len(x)))[chosen]
    else:
        indices = chosen
        if not all(0 <= i < len(x) for i in indices):
            raise InputError(f"{source}: there are {len(x)} samples (0..{len(x) - 1})")
    if not indices:
        raise InputError(f"{source}: selects no sample (there are {len(x)})")
    return [
        Recording(
            f"sample:{i}",
            np.ascontiguousarray(x[i, : int(lengths[i])], np.float32),
            _truth(y[i]) if y is not None else None,
        )
        for i in indices
    ]


def _truth(value: np.generic) -> str | int:
    item = value.item()
    if isinstance(item, bytes):
        return item.decode()
    return item if isinstance(item, (str, int)) else str(item)


def _npy(path: Path) -> list[Recording]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None
    if array.ndim == 2:
        return [Recording(path.name, array.astype(np.float32))]
    if array.ndim == 3:
        return [Recording(f"{path.name}[{i}]", a.astype(np.float32)) for i, a in enumerate(array)]
    raise InputError(f"{path}: expected a [time, features] array, got shape {array.shape}")


def _csv(path: Path) -> np.ndarray:
    rows: list[list[float]] = []
    try:
        with path.open(newline="") as fh:
            for number, row in enumerate(csv.reader(fh), start=1):
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                try:
                    values = [float(c) for c in cells]
                except ValueError:
                    if not rows and number == 1:
                        continue  # a header
                    raise InputError(f"{path}:{number}: not a number in {row!r}") from None
                if rows and len(values) != len(rows[0]):
                    raise InputError(
                        f"{path}:{number}: {len(values)} columns, the rows before "
                        f"have {len(rows[0])}"
                    )
                rows.append(values)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no frames (expected one row of numbers per frame)")
    return np.asarray(rows, dtype=np.float32)


def truth_label(value: str | int, model: ModelInfo) -> str:
    if isinstance(value, int) and 0 <= value < len(model.labels):
        return model.labels[value]
    return str(value)


def check_features(recordings: list[Recording], model: ModelInfo) -> None:
    for rec in recordings:
        if rec.frames.shape[1] != model.features:
            raise InvalidInput(
                f"{rec.name}: {rec.frames.shape[1]} features per frame, model "
                f"{model.name!r} expects {model.features}",
                reason="feature_count",
            )
