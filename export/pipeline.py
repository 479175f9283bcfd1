"""Keras model -> validated, parity-checked model directory. The one entry point for exports."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from .errors import ExportError
from .graphs import FRAMES, PROBABILITIES, sequence_function, step_function
from .loading import sha256
from .modeldir import manifest, write
from .onnxgraph import OPSET, restore_division, to_onnx
from .parity import check
from .reference import keras_per_step
from .runner import Runner
from .spec import ModelSpec, describe

__all__ = ["MAX_SAMPLES", "REFERENCE_SAMPLES", "Samples", "build_graphs", "export"]

MAX_SAMPLES = 40
REFERENCE_SAMPLES = 4
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    """Raw recordings: x [n, T, F] float32 zero-padded, lengths [n], y [n] (class index)."""

    x: np.ndarray
    lengths: np.ndarray
    y: np.ndarray
    origin: str

    def head(self, count: int) -> Samples:
        return Samples(self.x[:count], self.lengths[:count], self.y[:count], self.origin)


def _synthetic(spec: ModelSpec, count: int = 8, steps: int = 24, seed: int = 0) -> Samples:
    """Gaussian frames at the model's input scale, for models converted without data."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, steps // 2), steps + 1, size=count)
    lengths[0] = steps
    x = (rng.standard_normal((count, steps, spec.features)) * spec.std + spec.mean).astype(
        np.float32
    )
    for i, length in enumerate(lengths):
        x[i, length:] = 0.0
    return Samples(x, lengths.astype(np.int64), np.full(count, -1, np.int64), "synthetic")


def build_graphs(spec: ModelSpec, opset: int = OPSET) -> dict[str, bytes]:
    """Serialized sequence.onnx and step.onnx for `spec`."""
    inputs = [FRAMES] + [state.input for state in spec.states]
    outputs = [PROBABILITIES] + [state.output for state in spec.states]
    graphs = {}
    for key, function in (("sequence", sequence_function(spec)), ("step", step_function(spec))):
        model = to_onnx(function, inputs, outputs, opset)
        if spec.normalized and restore_division(model, spec.std) != 1:
            raise ExportError(f"{key} graph: cannot find the input normalization to restore")
        onnx.checker.check_model(model, full_check=True)
        if key == "step" and any(
            n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan") for n in model.graph.node
        ):
            raise ExportError("step graph contains a recurrent op; expected only cell arithmetic")
        graphs[key] = model.SerializeToString()
    return graphs


def export(
    model: keras.Model,
    out: Path,
    *,
    source: Path,
    name: str,
    version: str = "1",
    labels: list[str] | None = None,
    samples: Samples | None = None,
    training: dict[str, Any] | None = None,
    copy_source_as: str | None = None,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Validate, convert, check parity, then write `out`; nothing is written on any failure."""
    started = time.perf_counter()
    spec = describe(model)
    labels = labels or [f"class_{i}" for i in range(spec.classes)]
    if len(labels) != spec.classes:
        raise ExportError(f"{len(labels)} labels for {spec.classes} classes")
    graphs = build_graphs(spec, opset)
    converted = time.perf_counter()
    samples = (samples or _synthetic(spec)).head(MAX_SAMPLES)
    if samples.x.shape[-1] != spec.features:
        raise ExportError(f"samples have {samples.x.shape[-1]} features, model {spec.features}")
    expected = keras_per_step(model, samples.x, samples.lengths)
    parity = check(
        Runner(graphs["sequence"], spec.states),
        Runner(graphs["step"], spec.states),
        samples.x,
        samples.lengths,
        expected,
    )
    elapsed = time.perf_counter() - started
    count = min(REFERENCE_SAMPLES, len(samples.lengths))
    model_json = manifest(
        spec,
        name=name,
        version=version,
        labels=labels,
        opset=opset,
        graphs=graphs,
        source={"file": copy_source_as or source.name, "sha256": sha256(source)},
        parity=parity.as_json(),
        extra={
            "samples": {"count": len(samples.lengths), "origin": samples.origin},
            "export": {
                "seconds": round(elapsed, 2),
                "convert_seconds": round(converted - started, 2),
                "keras": keras.__version__,
                "tensorflow": tf.__version__,
                "tf2onnx": tf2onnx.__version__,
                "onnx": onnx.__version__,
                "ir_version": onnx.load_from_string(graphs["sequence"]).ir_version,
            },
            **({"training": training} if training is not None else {}),
        },
    )
    write(
        out,
        model_json=model_json,
        graphs=graphs,
        arrays={
            "samples": {"x": samples.x, "lengths": samples.lengths, "y": samples.y},
            "reference": {
                "x": samples.x[:count],
                "lengths": samples.lengths[:count],
                "probabilities": expected[:count],
            },
        },
        copies={copy_source_as: source} if copy_source_as else None,
    )
    _log.info("exported %s to %s in %.1f s (parity %.3g)", name, out, elapsed, parity.worst())
    return model_json
