"""onnxruntime sessions for a model's two graphs, fed and read by state *name*.

``step`` runs one frame for a batch of sessions, ``sequence`` runs many frames. States are lists
ordered like ``ModelSpec.states``; each array is ``[batch, size]`` float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .errors import ModelError
from .model import ModelSpec, StateSpec

__all__ = ["ModelRunner", "Runtime", "States"]

log = logging.getLogger("seqserve.runtime")

States = list[np.ndarray]


class ModelRunner(Protocol):
    """What the serving core runs a model through: ``Runtime``, or ``window.WindowRuntime``."""

    spec: ModelSpec
    device: str
    providers: list[str]
    cost: int

    @property
    def base_states(self) -> tuple[StateSpec, ...]: ...

    def zero_states(self, batch: int) -> States: ...

    def step(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]: ...

    def sequence(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]: ...


def _options(threads: int, spinning: bool, cuda: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # Relu LSTM states that decay leave denormal floats behind, and every multiply-add on one is
    # ~100x slower: measured on the bundled model, sessions replaying recordings in a loop grew
    # 11 % denormal state values and onnxruntime's step went from 5 to 25 us per session.
    # Flushing them to zero changes results by < 1.2e-38.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if cuda:
        # A node the CUDA provider cannot run becomes a load error instead of a silent CPU run.
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return opts


class Runtime:
    def __init__(
        self, spec: ModelSpec, *, device: str = "cpu", threads: int = 1, spinning: bool = False
    ) -> None:
        self.spec = spec
        self.device = device
        cuda = device == "cuda"
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError(
                "--device cuda: this onnxruntime has no CUDAExecutionProvider "
                "(install seqserve[gpu], i.e. onnxruntime-gpu)"
            )
        providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        opts = _options(threads, spinning, cuda)
        self._step = self._load(spec.step_graph, opts, providers, rank=2)
        # The CUDA provider runs the ONNX LSTM op only with default activations, so on CUDA the
        # cell graph (MatMul + elementwise) also serves multi-frame requests, frame by frame.
        self._sequence = None if cuda else self._load(spec.sequence_graph, opts, providers, rank=3)
        self._state_inputs = [s.input for s in spec.states]
        self._outputs = ["probabilities", *(s.output for s in spec.states)]
        self.providers = self._step.get_providers()
        log.info(
            "model %s v%s on %s: providers %s",
            spec.name,
            spec.version,
            device,
            ", ".join(self.providers),
        )
        if cuda and self.providers[0] != "CUDAExecutionProvider":
            raise ModelError(f"--device cuda: nodes would run on {self.providers}, refusing")

    def _load(
        self, path: Path, opts: ort.SessionOptions, providers: list[str], rank: int
    ) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{path.name}: onnxruntime cannot load it: {exc}") from None
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if len(inputs.get("frames", ())) != rank:
            raise ModelError(f"{path.name}: needs a rank-{rank} input named 'frames'")
        for state in self.spec.states:
            if state.input not in inputs:
                raise ModelError(f"{path.name}: no state input {state.input!r}")
            size = inputs[state.input][-1]
            if isinstance(size, int) and size != state.size:
                raise ModelError(f"{path.name}: {state.input!r} is not of size {state.size}")
            if state.output not in outputs:
                raise ModelError(f"{path.name}: no state output {state.output!r}")
        if "probabilities" not in outputs:
            raise ModelError(f"{path.name}: no output named 'probabilities'")
        return session

    cost = 1  # cell steps per frame (a window runtime: its window)

    @property
    def base_states(self) -> tuple[StateSpec, ...]:
        """The model's own state tensors (a window runtime holds several copies of each)."""
        return self.spec.states

    def zero_states(self, batch: int) -> States:
        return [np.zeros((batch, s.size), np.float32) for s in self.spec.states]

    def step(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]:
        """frames [B, F] -> probabilities [B, C] and the next states (``positions``, the index
        of each frame in its session, matter only to a window runtime)."""
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["frames"] = frames
        probs, *new_states = self._step.run(self._outputs, feeds)
        return probs, new_states

    def sequence(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]:
        """frames [B, T, F] -> probabilities [B, T, C] and the states after the last frame."""
        if self._sequence is None:
            out = []
            for t in range(frames.shape[1]):
                probs, states = self.step(np.ascontiguousarray(frames[:, t]), states)
                out.append(probs)
            return np.stack(out, axis=1), states
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["frames"] = frames
        probs, *new_states = self._sequence.run(self._outputs, feeds)
        return probs, new_states
