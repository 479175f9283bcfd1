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

from .errors import ExportError, NumericsError
from .float64 import forward, step
from .graphs import FRAMES, PROBABILITIES, sequence_function, step_function
from .loading import sha256
from .modeldir import manifest, write
from .numerics import Numerics, assess, refuse_overflow
from .onnxgraph import OPSET, restore_division, to_onnx
from .parity import Local, Parity, check, local_rows
from .reference import KerasOutputs, keras_outputs, keras_step, window_answers
from .spec import ModelSpec, describe
from .window import WindowOption, cut, resolve

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


def _dynamic(model: onnx.ModelProto, key: str) -> None:
    """The frames input takes any batch (and, for the sequence graph, any number of steps),
    whatever the Keras input said: window serving runs T frames, streams run any chunk."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    free = dims[:2] if key == "sequence" else dims[:1]
    if any(dim.HasField("dim_value") for dim in free):
        shape = [dim.dim_param or dim.dim_value for dim in dims]
        raise ExportError(f"{key} graph: frames input has fixed dimensions {shape}")


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
        _dynamic(model, key)
        if key == "step" and any(
            n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan") for n in model.graph.node
        ):
            raise ExportError("step graph contains a recurrent op; expected only cell arithmetic")
        graphs[key] = model.SerializeToString()
    return graphs


def _judge(
    model: keras.Model,
    spec: ModelSpec,
    graphs: dict[str, bytes],
    x: np.ndarray,
    lengths: np.ndarray,
) -> tuple[KerasOutputs, Numerics, Parity]:
    """Keras, the float64 reference and both graphs on the parity samples: the model's numerics
    and the graphs' parity (`ParityError` when a graph is materially worse than Keras)."""
    expected = keras_outputs(model, x, lengths)
    exact = forward(spec, x, lengths)
    refuse_overflow(expected, exact, lengths)
    rows, before = local_rows(x, lengths, exact)
    local = Local(rows, before, step(spec, rows, before), keras_step(model, spec, rows, before))
    numerics = assess(expected, exact, lengths, local)
    return expected, numerics, check(graphs, spec.states, x, lengths, expected, exact, local)


def _reference(
    model: keras.Model, samples: Samples, count: int, window: int | None, per_step: np.ndarray
) -> np.ndarray:
    """What a server must answer when each of the first `count` recordings is streamed from
    the start of a session: Keras per step (stream) or on the last `window` frames."""
    if window is None:
        return per_step[:count]
    out = np.zeros((count, samples.x.shape[1], per_step.shape[-1]), np.float32)
    streams = [samples.x[i, : int(samples.lengths[i])] for i in range(count)]
    for i, answers in enumerate(window_answers(model, streams, window)):
        out[i, : len(answers)] = answers
    return out


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
    window: WindowOption = "auto",
    strict: bool = False,
) -> dict[str, Any]:
    """Validate, convert, check parity, then write `out`; nothing is written on any failure.

    window: "auto" detects a window-trained model (`window.detect`), "none" serves any model as
    a stateful stream, an int forces that window. strict: refuse a numerically unstable model
    instead of writing it with a warning.
    """
    started = time.perf_counter()
    spec = describe(model)
    labels = labels or [f"class_{i}" for i in range(spec.classes)]
    if len(labels) != spec.classes:
        raise ExportError(f"{len(labels)} labels for {spec.classes} classes")
    frames = resolve(model, spec, window)
    graphs = build_graphs(spec, opset)
    converted = time.perf_counter()
    steps = 24 if frames is None else max(24, 2 * frames)
    samples = (samples or _synthetic(spec, steps=steps)).head(MAX_SAMPLES)
    if samples.x.shape[-1] != spec.features:
        raise ExportError(f"samples have {samples.x.shape[-1]} features, model {spec.features}")
    # A window model is only ever run on its last `frames` frames: judge it on such windows.
    if frames is None:
        x, lengths, origin = samples.x, samples.lengths, samples.origin
    else:
        x, lengths = cut(samples.x, samples.lengths, frames, MAX_SAMPLES)
        origin = f"{samples.origin}; parity on {len(lengths)} windows of {frames} frames"
    expected, numerics, parity = _judge(model, spec, graphs, x, lengths)
    warning = numerics.warning()
    if warning is not None:
        if strict:
            raise NumericsError(f"{warning} (refused: --strict)")
        _log.warning("%s", warning)
    count = min(REFERENCE_SAMPLES, len(samples.lengths))
    reference = _reference(model, samples, count, frames, expected.probabilities)
    elapsed = time.perf_counter() - started
    model_json = manifest(
        spec,
        name=name,
        version=version,
        labels=labels,
        window=frames,
        opset=opset,
        graphs=graphs,
        source={"file": copy_source_as or source.name, "sha256": sha256(source)},
        parity=parity.as_json(),
        extra={
            "numerics": numerics.as_json(),
            "samples": {"count": len(samples.lengths), "origin": origin},
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
                "probabilities": reference,
            },
        },
        copies={copy_source_as: source} if copy_source_as else None,
    )
    _log.info("exported %s to %s in %.1f s (%s)", name, out, elapsed, parity.describe())
    return model_json
