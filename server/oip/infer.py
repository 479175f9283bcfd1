"""One inference request of the Open Inference Protocol, whatever carried it (gRPC or REST):
checked, turned into an engine call, and its outputs built. No grpc, no HTTP here.

Per model: input ``frames``, FP32 ``[batch, time, features]``; output ``probabilities``, FP32
``[batch, time, classes]``, or with the classification extension BYTES ``[batch, time, k]``
holding ``"score:index:label"``. A request with a ``sequence_id`` is one step of one session
(batch 1, any number of frames); without one, each batch row is an independent sequence from
zero state (what the native ``Predict`` does).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import Engine, StepResult
from ..errors import BadRequest, SessionNotFound
from ..model import ModelSpec
from ..models import Models
from .models import ModelIndex, version_number
from .sequences import ParamValue, SequenceStep, read_sequence

__all__ = [
    "INPUT",
    "OUTPUT",
    "InferCall",
    "InputTensor",
    "OutputTensor",
    "RequestedOutput",
    "SequenceNotStarted",
    "bytes_tensor",
    "explain",
    "prepare",
    "start",
]

INPUT, OUTPUT = "frames", "probabilities"


class SequenceNotStarted(BadRequest):
    """A step for a sequence that does not exist and does not say start (Triton's wording)."""


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: Sequence[int]
    data: bytes | None = None  # little-endian, row-major (raw contents, binary extension)
    values: Sequence[Any] | None = None  # typed contents or JSON data, flattened


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    classification: int = 0  # k > 0: the top k classes as "score:index:label"
    binary: bool | None = None  # REST only: binary tensor data (None: the request's default)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: tuple[int, ...]
    array: np.ndarray  # float32 values, or the strings (dtype object) of a BYTES tensor

    def raw(self) -> bytes:
        """The tensor's bytes as ``raw_output_contents`` / the binary extension carry them."""
        if self.datatype == "BYTES":
            return bytes_tensor(self.array.ravel().tolist())
        return self.array.astype("<f4", copy=False).tobytes()


@dataclass(slots=True)
class InferCall:
    engine: Engine  # the version a stateless request runs on (a sequence: its own version)
    spec: ModelSpec
    models: Models
    version: int  # asked for (0: none)
    request_id: str
    sequence: SequenceStep | None
    frames: np.ndarray  # [batch, time, features]
    outputs: list[RequestedOutput] = field(default_factory=list)


def prepare(
    models: ModelIndex,
    model_name: str,
    model_version: str,
    request_id: str,
    params: Mapping[str, ParamValue],
    inputs: Sequence[InputTensor],
    outputs: Sequence[RequestedOutput],
) -> InferCall:
    """Check a request and decode its frames; BadRequest / ModelNotFound say what is wrong."""
    sequence = read_sequence(params)
    number = version_number(model_version)
    if sequence is None:
        engine, spec = models.resolve(model_name, model_version)
    else:  # the version the sequence is pinned to (a new one: the version asked for, or latest)
        if not model_name:
            models.resolve(model_name, model_version)  # raises: no model named
        engine = models.models.model(model_name).route(
            sequence.session_id, number, creating=sequence.start and not sequence.position
        )
        spec = engine.spec
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = ", ".join(repr(t.name) for t in inputs) or "none"
        raise BadRequest(
            f"model {spec.name!r} takes one input, {INPUT!r} (FP32 [batch, time, "
            f"{spec.features}]); got {names}",
            reason="bad_input",
        )
    frames = _frames(inputs[0], spec.features)
    if sequence is not None and frames.shape[0] != 1:
        raise BadRequest(
            f"batch size {frames.shape[0]} with a sequence_id: a sequence request is one step "
            "of one sequence, batch 1 (any number of frames)",
            reason="bad_batch",
        )
    seen: set[str] = set()
    for out in outputs:
        if out.name != OUTPUT:
            raise BadRequest(
                f"unknown output {out.name!r}: model {spec.name!r} has one output, {OUTPUT!r}",
                reason="bad_output",
            )
        if out.name in seen:
            raise BadRequest(f"output {out.name!r} requested twice", reason="bad_output")
        seen.add(out.name)
        if out.classification < 0:
            raise BadRequest(
                f"output {out.name!r}: classification must be >= 0", reason="bad_parameter"
            )
    return InferCall(
        engine, spec, models.models, number, request_id, sequence, frames, list(outputs)
    )


def _frames(tensor: InputTensor, features: int) -> np.ndarray:
    what = f"input {tensor.name!r}"
    if tensor.datatype != "FP32":
        raise BadRequest(f"{what} must be FP32, not {tensor.datatype!r}", reason="bad_datatype")
    shape = list(tensor.shape)
    if len(shape) != 3:
        raise BadRequest(
            f"{what} must have shape [batch, time, {features}], not {shape}", reason="bad_shape"
        )
    batch, time, width = shape
    if batch < 1 or time < 1:
        raise BadRequest(
            f"{what}: shape {shape} holds no frame (batch and time must be >= 1)",
            reason="bad_shape",
        )
    if width != features:
        raise BadRequest(
            f"{what}: {width} features per frame, the model expects {features}",
            reason="feature_count",
        )
    count = batch * time * width
    if tensor.data is not None:
        if tensor.values is not None:
            raise BadRequest(f"{what}: data given twice (raw and typed)", reason="bad_frames")
        if len(tensor.data) != 4 * count:
            raise BadRequest(
                f"{what}: {len(tensor.data)} bytes of data, shape {shape} of FP32 needs "
                f"{4 * count}",
                reason="bad_frames",
            )
        flat = np.frombuffer(tensor.data, "<f4")
    elif tensor.values is not None:
        if len(tensor.values) != count:
            raise BadRequest(
                f"{what}: {len(tensor.values)} values, shape {shape} needs {count}",
                reason="bad_frames",
            )
        try:
            flat = np.asarray(tensor.values)
        except (TypeError, ValueError):
            flat = np.asarray([], object)
        if flat.dtype.kind not in "fiu" or flat.shape != (count,):
            raise BadRequest(f"{what}: FP32 data must be numbers", reason="bad_frames")
        with np.errstate(over="ignore"):  # too large for float32: Inf, refused as non-finite
            flat = flat.astype(np.float32)
    else:
        raise BadRequest(f"{what}: no data", reason="bad_frames")
    return flat.reshape(batch, time, width)


def start(call: InferCall, principal: str) -> asyncio.Future[Any]:
    """Hand the call to the engine: a future of a ``StepResult`` (a sequence step) or of the
    per-row outputs (stateless). Raises what the engine refuses at once."""
    seq = call.sequence
    if seq is None:
        rows = list(call.frames)
        return asyncio.ensure_future(call.engine.predict(rows))
    return call.models.submit(
        call.spec.name,
        call.version,
        seq.session_id,
        seq.position,
        call.frames[0],
        start=seq.start,
        end=seq.end,
        principal=principal,
    )


def explain(call: InferCall | None, exc: BaseException) -> BaseException:
    """Engine errors in the protocol's terms: an unknown sequence without start gets Triton's
    message (and INVALID_ARGUMENT, as there), the session's fate kept in the reason."""
    if call is not None and call.sequence is not None and isinstance(exc, SessionNotFound):
        fate = {"expired": "it expired", "closed": "it was closed"}.get(exc.reason)
        detail = f" ({fate} at position {exc.position})" if fate else ""
        return SequenceNotStarted(
            f"inference request for sequence {call.sequence.shown} to model "
            f"{call.spec.name!r} must specify the START flag on the first request of the "
            f"sequence{detail}",
            reason=exc.reason,
        )
    return exc


def probabilities(result: StepResult | list[np.ndarray]) -> np.ndarray:
    """``[batch, time, classes]`` from either kind of engine result."""
    if isinstance(result, StepResult):
        return result.probabilities[None]
    return np.stack(result)


_ALL_OUTPUTS = (RequestedOutput(OUTPUT),)  # what a request that names no output gets


def outputs(call: InferCall, probs: np.ndarray) -> list[OutputTensor]:
    wanted = call.outputs or _ALL_OUTPUTS
    built = []
    for out in wanted:
        if out.classification:
            built.append(_classes(probs, out.classification, call.spec.labels))
        else:
            built.append(OutputTensor(OUTPUT, "FP32", probs.shape, probs))
    return built


def _classes(probs: np.ndarray, k: int, labels: Sequence[str]) -> OutputTensor:
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    scores = np.take_along_axis(probs, order, axis=-1)
    text = np.empty(order.shape, dtype=object)
    for at in np.ndindex(order.shape):
        index = int(order[at])
        text[at] = f"{float(scores[at]):f}:{index}:{labels[index]}"
    return OutputTensor(OUTPUT, "BYTES", order.shape, text)


def bytes_tensor(items: Sequence[str | bytes]) -> bytes:
    """Triton's serialization of a BYTES tensor: each element's 4-byte little-endian length,
    then its bytes."""
    parts = []
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)
