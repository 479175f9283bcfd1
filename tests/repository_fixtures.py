"""Model repositories for tests, built in temporary folders: the bundled models copied in as
versions, a genuinely different version 2 of basicmotions, and broken versions of every kind the
server must refuse.

Version 2 ("v2") is basicmotions with other graphs, made without TensorFlow: both graphs get the
same two changes, so they still agree with each other, and they differ from version 1 in the
states as well as in the outputs (a session moved from one graph to the other would show):

- the input scaling (the ``1/std`` of the in-graph normalization) is multiplied by ``SCALE``:
  every state after the first frame differs from version 1's;
- the final Dense layer's bias (the ``Add`` feeding the ``Softmax``) is shifted by ``SHIFT``.

Its ``reference.npz`` is recomputed with onnxruntime (the sequence graph on the same ``x``) and
its ``model.json`` names the new graphs' checksums, so it passes every check version 1 passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
BASICMOTIONS = MODELS / "basicmotions"
JAPANESEVOWELS = MODELS / "japanesevowels"
# What a version folder needs (model.keras is the export's source, never read by the server).
FILES = ("model.json", "sequence.onnx", "step.onnx", "reference.npz", "samples.npz")
SCALE = np.float32(1.25)
SHIFT = np.array([0.8, -0.6, 0.4, -0.5], np.float32)
AGREEMENT = 1e-5  # v2's two graphs must agree with each other as closely as v1's do

__all__ = [
    "BASICMOTIONS",
    "JAPANESEVOWELS",
    "Repository",
    "batch_invariant",
    "copy_version",
    "graph_outputs",
    "make_v2",
    "sha256",
    "step_run",
    "store_key",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_version(source: Path, dest: Path) -> Path:
    """A model directory's files copied to ``dest`` (a new folder)."""
    dest.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(source / name, dest / name)
    return dest


def _runtime(directory: Path):
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    return Runtime(load_model_spec(directory))


def graph_outputs(directory: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step probabilities of one recording ``x`` [T, F] through the directory's sequence
    graph (whole) and its step graph (frame by frame)."""
    runtime = _runtime(directory)
    frames = x[None].astype(np.float32)
    whole, _ = runtime.sequence(frames, runtime.zero_states(1))
    states = runtime.zero_states(1)
    steps = []
    for t in range(len(x)):
        probs, states = runtime.step(np.ascontiguousarray(frames[:, t]), states)
        steps.append(probs[0])
    return whole[0], np.stack(steps)


_RUNTIMES: dict[Path, object] = {}


def _cached_runtime(directory: Path):
    directory = directory.resolve()
    if directory not in _RUNTIMES:
        _RUNTIMES[directory] = _runtime(directory)
    return _RUNTIMES[directory]


def step_run(directory: Path, x: np.ndarray) -> np.ndarray:
    """Per-step probabilities of one recording ``x`` [T, F] fed frame by frame (batch 1) through
    the directory's step graph, from a zero state: what a session sending one frame per request
    gets."""
    runtime = _cached_runtime(directory)
    states = runtime.zero_states(1)  # type: ignore[attr-defined]
    out = []
    for t in range(len(x)):
        probs, states = runtime.step(x[t : t + 1].astype(np.float32), states)  # type: ignore[attr-defined]
        out.append(probs[0])
    return np.stack(out)


_INVARIANT: dict[Path, bool] = {}


def batch_invariant(directory: Path, sessions: int = 24, frames: int = 20) -> bool:
    """Whether this CPU's onnxruntime answers a session's step bit for bit the same whatever
    other sessions share its batch (how many, in which rows), checked on the directory's step
    graph with random batch compositions. Where it does, a server's answers can be compared
    with a solo run bit for bit."""
    directory = directory.resolve()
    if directory in _INVARIANT:
        return _INVARIANT[directory]
    runtime = _cached_runtime(directory)
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, (sessions, frames, runtime.spec.features)).astype(np.float32)  # type: ignore[attr-defined]
    solo = [step_run(directory, x[i]) for i in range(sessions)]
    states = [runtime.zero_states(1) for _ in range(sessions)]  # type: ignore[attr-defined]
    done = [0] * sessions
    same = True
    while min(done) < frames:
        rows = [i for i in range(sessions) if done[i] < frames and rng.random() < 0.5]
        if not rows:
            continue
        rng.shuffle(rows)
        batch = [np.concatenate([states[i][k] for i in rows]) for k in range(len(states[0]))]
        probs, after = runtime.step(np.stack([x[i, done[i]] for i in rows]), batch)  # type: ignore[attr-defined]
        for j, i in enumerate(rows):
            same = same and np.array_equal(probs[j], solo[i][done[i]])
            states[i] = [s[j : j + 1] for s in after]
            done[i] += 1
    _INVARIANT[directory] = same
    return same


def _final_bias(model: object) -> str:
    """The name of the initializer added right before the Softmax (the last Dense's bias)."""
    graph = model.graph  # type: ignore[attr-defined]
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    add = producers[softmax.input[0]]
    assert add.op_type == "Add", add.op_type
    (bias,) = [name for name in add.input if name in initializers]
    return bias


def _rewrite_graph(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    bias = _final_bias(model)
    changed = set()
    for tensor in model.graph.initializer:
        if tensor.name == bias:
            value = numpy_helper.to_array(tensor) + SHIFT
        elif tensor.name.startswith("ConstantFolding/truediv_recip"):
            value = numpy_helper.to_array(tensor) * SCALE
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
        changed.add(tensor.name)
    assert len(changed) == 2, f"{path.name}: changed {changed}"
    onnx.save(model, str(path))


def make_v2(dest: Path, source: Path = BASICMOTIONS) -> Path:
    """Version 2 of basicmotions in ``dest`` (a new folder); checked: its graphs agree with each
    other within 1e-5 and differ from version 1's."""
    copy_version(source, dest)
    for name in ("sequence.onnx", "step.onnx"):
        _rewrite_graph(dest / name)
    meta = json.loads((dest / "model.json").read_text())
    meta["version"] = "2"
    for graph in meta["graphs"].values():
        graph["sha256"] = sha256(dest / graph["file"])
    (dest / "model.json").write_text(json.dumps(meta, indent=2))
    with np.load(dest / "reference.npz") as data:
        reference = {k: data[k] for k in data.files}
    runtime = _runtime(dest)
    x, lengths = reference["x"].astype(np.float32), reference["lengths"]
    probabilities = np.zeros_like(reference["probabilities"])
    for i, n in enumerate(lengths.tolist()):
        out, _ = runtime.sequence(np.ascontiguousarray(x[i : i + 1, :n]), runtime.zero_states(1))
        probabilities[i, :n] = out[0]
    np.savez(dest / "reference.npz", **{**reference, "probabilities": probabilities})
    # The two graphs still belong together, and they are not version 1's.
    n = int(lengths[0])
    whole, steps = graph_outputs(dest, x[0, :n])
    assert np.abs(whole - steps).max() <= AGREEMENT
    v1, _ = graph_outputs(source, x[0, :n])
    assert np.abs(whole - v1).max() > 0.05
    return dest


def store_key(session_id: str, directory: Path, version: int) -> str:
    """The Redis key of a session of the model in ``directory`` served as ``version`` of a
    repository (the namespace names the version and the graphs)."""
    from seqserve.server.engine import store_namespace
    from seqserve.server.model import load_model_spec

    return f"{store_namespace(load_model_spec(directory, version=str(version)))}:{session_id}"


class Repository:
    """A repository folder: ``ROOT/<model>/<version>/`` made from prepared model directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, model: str, version: int | str) -> Path:
        return self.root / model / str(version)

    def add(self, model: str, version: int | str, source: Path) -> Path:
        """``source`` (a model directory) copied in as ``model``/``version``. The copy is made
        next to the repository and renamed in, as a deployment would, so a poller never sees it
        half-written (see ``add_half_copied`` for the other case)."""
        dest = self.path(model, version)
        staging = self.root.parent / f".staging-{model}-{version}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        copy_version(source, staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
        return dest

    def remove(self, model: str, version: int | str) -> None:
        shutil.rmtree(self.path(model, version))

    def policy(self, model: str, policy: dict[str, object] | str) -> Path:
        """``model``/config.json with this version policy (a string is written as it is)."""
        path = self.root / model / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = policy if isinstance(policy, str) else json.dumps({"version_policy": policy})
        path.write_text(text)
        return path

    # -- broken versions ------------------------------------------------------------------------

    def add_half_copied(self, model: str, version: int, source: Path) -> Path:
        """A copy caught halfway: model.json is there, the step graph only in part."""
        dest = self.path(model, version)
        copy_version(source, dest)
        data = (source / "step.onnx").read_bytes()
        (dest / "step.onnx").write_bytes(data[: len(data) // 2])
        return dest

    def complete(self, model: str, version: int, source: Path) -> None:
        """Finish a half-copied version (the copy completes)."""
        shutil.copy2(source / "step.onnx", self.path(model, version) / "step.onnx")

    def add_wrong_checksum(self, model: str, version: int, source: Path) -> Path:
        """model.json names another graph's checksum for the sequence graph."""
        dest = self.add(model, version, source)
        self._edit(dest, lambda meta: meta["graphs"]["sequence"].update(sha256="0" * 64))
        return dest

    def add_lying_states(self, model: str, version: int, source: Path) -> Path:
        """model.json's first state names a graph input the graphs do not have."""
        dest = self.add(model, version, source)
        self._edit(dest, lambda meta: meta["states"][0].update(input="no_such_input"))
        return dest

    def add_wrong_reference(self, model: str, version: int, source: Path) -> Path:
        """Graphs and model.json fine, but reference.npz is another model's answer."""
        dest = self.add(model, version, source)
        with np.load(dest / "reference.npz") as data:
            arrays = {k: data[k] for k in data.files}
        arrays["probabilities"] = arrays["probabilities"][..., ::-1].copy()
        np.savez(dest / "reference.npz", **arrays)
        return dest

    def add_non_integer(self, model: str, name: str, source: Path) -> Path:
        return self.add(model, name, source)

    def add_symlink_out(self, model: str, version: int, target: Path) -> Path:
        """``model``/``version`` as a symlink to ``target``, a folder outside the repository."""
        link = self.path(model, version)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        return link

    @staticmethod
    def _edit(directory: Path, change: object) -> None:
        meta = json.loads((directory / "model.json").read_text())
        change(meta)  # type: ignore[operator]
        (directory / "model.json").write_text(json.dumps(meta, indent=2))

    def versions(self, model: str) -> Iterable[Path]:
        return sorted((self.root / model).iterdir())
