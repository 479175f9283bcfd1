"""Run the exported graphs with onnxruntime, carrying named states between calls."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .graphs import FRAMES, PROBABILITIES
from .spec import State

__all__ = ["Runner"]


class Runner:
    """One onnxruntime session of sequence.onnx or step.onnx with states paired by name."""

    def __init__(self, graph: bytes, states: Sequence[State]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.states = tuple(states)
        self.outputs = [PROBABILITIES] + [state.output for state in self.states]

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        return {state.name: np.zeros((batch, state.size), np.float32) for state in self.states}

    def __call__(
        self, frames: np.ndarray, states: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {FRAMES: np.ascontiguousarray(frames, dtype=np.float32)}
        feed.update({state.input: states[state.name] for state in self.states})
        probabilities, *finals = self.session.run(self.outputs, feed)
        return probabilities, {s.name: v for s, v in zip(self.states, finals, strict=True)}

    def chunked(self, frames: np.ndarray, cuts: Sequence[int]) -> np.ndarray:
        """Feed a sequence runner `frames` [B, T, F] in chunks split at `cuts`; per-step output."""
        states = self.zeros(frames.shape[0])
        pieces = []
        bounds = [0, *sorted(set(cuts)), frames.shape[1]]
        for start, stop in itertools.pairwise(bounds):
            if stop > start:
                probabilities, states = self(frames[:, start:stop], states)
                pieces.append(probabilities)
        return np.concatenate(pieces, axis=1)

    def stepped(self, frames: np.ndarray, *, sequence: bool = False) -> np.ndarray:
        """Feed `frames` [B, T, F] one step at a time (step graph, or sequence graph with T=1)."""
        states = self.zeros(frames.shape[0])
        pieces = []
        for t in range(frames.shape[1]):
            frame = frames[:, t : t + 1] if sequence else frames[:, t]
            probabilities, states = self(frame, states)
            pieces.append(probabilities.reshape(frames.shape[0], -1))
        return np.stack(pieces, axis=1)
