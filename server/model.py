"""The model directory (``seqserve-model/1``, see models/README.md) as a typed, checked spec."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import ExternalDataInfo

from .errors import ModelError

__all__ = [
    "FORMAT",
    "LayerSpec",
    "ModelSpec",
    "StateSpec",
    "bundled_models_dir",
    "default_model_dir",
    "load_model_spec",
]

FORMAT = "seqserve-model/1"


@dataclass(frozen=True, slots=True)
class StateSpec:
    name: str
    layer: str
    kind: str
    size: int
    input: str
    output: str


@dataclass(frozen=True, slots=True)
class LayerSpec:
    name: str
    type: str
    units: int
    input_size: int
    params: int
    activation: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    directory: Path
    name: str
    version: str
    features: int
    labels: tuple[str, ...]
    states: tuple[StateSpec, ...]
    layers: tuple[LayerSpec, ...]
    parameters: int
    sequence_graph: Path
    step_graph: Path
    fingerprint: str  # identifies the exact graphs; snapshots are bound to it
    # What the model answers: "stateful" (everything since the session started) or "window"
    # (the last ``window`` frames, as a window-trained model was trained; server/window.py).
    mode: str = "stateful"
    # Frames per window the model was trained on (model.json ``window``; 0: whole sequences).
    window: int = 0

    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def state_floats(self) -> int:
        return sum(s.size for s in self.states)


def bundled_models_dir() -> Path:
    """The bundled models (the default repository): basicmotions, japanesevowels."""
    import seqserve.models

    return Path(seqserve.models.__file__).resolve().parent


def default_model_dir() -> Path:
    """The bundled default model (BasicMotions activity classifier)."""
    import seqserve.models

    return Path(seqserve.models.__file__).resolve().parent / "basicmotions"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores, subgraphs (If/Loop/Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external_data(path: Path, directory: Path) -> None:
    """onnxruntime reads external-data files wherever a graph says: allow only files inside the
    model directory."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{path.name}: not a readable ONNX graph ({exc})") from None
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = ExternalDataInfo(tensor).location
        target = (path.parent / location).resolve()
        if not location or not target.is_relative_to(directory):
            raise ModelError(
                f"{path.name}: tensor {tensor.name!r} keeps its data in "
                f"{location!r}, outside the model directory {directory}"
            )


def _graph_path(
    directory: Path, graphs: dict[str, Any], key: str, require_checksum: bool
) -> tuple[Path, str]:
    """The graph's path and its sha256 (checked against model.json's)."""
    entry = graphs.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise ModelError(f"model.json: graphs.{key}.file is missing")
    path = (directory / entry["file"]).resolve()
    if not path.is_relative_to(directory):
        raise ModelError(f"model.json: graphs.{key}.file {entry['file']!r} is outside {directory}")
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    expected = entry.get("sha256")
    if require_checksum and not expected:
        raise ModelError(
            f"model.json: graphs.{key}.sha256 is missing: a repository version must name its "
            "graphs' checksums (a half-copied graph is told from a whole one by them)"
        )
    digest = _sha256(path)
    if expected and digest != expected:
        raise ModelError(f"{path.name}: checksum does not match model.json (file changed?)")
    _check_external_data(path, directory)
    return path, digest


def load_model_spec(
    directory: str | Path | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    require_checksums: bool = False,
) -> ModelSpec:
    """The model directory as a checked spec. ``name`` / ``version`` override model.json's (a
    repository names models and versions by folder); ``require_checksums`` refuses graphs
    whose checksums model.json does not give."""
    directory = Path(directory).resolve() if directory else default_model_dir()
    meta_path = directory / "model.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{meta_path} not found: not a seqserve model directory") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        states = tuple(
            StateSpec(s["name"], s["layer"], s["kind"], int(s["size"]), s["input"], s["output"])
            for s in meta["states"]
        )
        layers = tuple(
            LayerSpec(
                layer["name"],
                layer["type"],
                int(layer.get("units", 0)),
                int(layer.get("input_size", 0)),
                int(layer.get("params", 0)),
                str(layer.get("activation", "")),
            )
            for layer in meta.get("layers", [])
        )
        graphs = meta["graphs"]
        if not isinstance(graphs, dict):
            raise TypeError("graphs")
        sequence, sequence_digest = _graph_path(directory, graphs, "sequence", require_checksums)
        step, step_digest = _graph_path(directory, graphs, "step", require_checksums)
        # The fingerprint names the exact graphs: model.json's checksums (the actual digests
        # where it gives none), so two versions with the same name and different graphs never
        # pass for one another.
        digests = {"sequence": sequence_digest, "step": step_digest}
        pinned = {
            key: {**entry, "sha256": entry.get("sha256") or digests.get(key)}
            if isinstance(entry, dict)
            else entry
            for key, entry in graphs.items()
        }
        spec = ModelSpec(
            directory=directory,
            name=name or str(meta["name"]),
            version=version or str(meta.get("version", "1")),
            features=int(meta["features"]),
            labels=tuple(str(label) for label in meta["labels"]),
            states=states,
            layers=layers,
            parameters=int(meta.get("parameters", 0)),
            sequence_graph=sequence,
            step_graph=step,
            window=int(meta.get("window") or 0),
            fingerprint=hashlib.sha256(
                json.dumps([pinned, meta["states"]], sort_keys=True).encode()
            ).hexdigest(),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: missing or malformed field {exc}") from None
    if spec.features < 1 or spec.classes < 1 or not spec.states:
        raise ModelError(f"{meta_path}: needs features >= 1, labels and states")
    return spec
