"""Window serving: a model trained on fixed windows of T frames, answered as it was trained.

A window-trained classifier is run by its author by keeping the last T frames and calling
``predict`` on them after every new frame: the answer at frame t is the model on frames
t - T + 1 .. t from a zero state (before the T-th frame: on the frames so far). Carrying h and c
from the start of a session answers another question, which the model never saw in training.

Served here with **T staggered states** per session: copy k of the model's state restarts from
zero at every frame t with t mod T = k, and every frame advances all T copies; the copy that
restarted T - 1 frames ago has then seen exactly the last T frames, and its output is the answer
(before frame T - 1, the copy that started at frame 0: the frames so far). Every frame costs T
cell steps, as re-running the window would, but as one step-graph call of batch sessions x T
with no frames kept, so it batches across sessions like the stateful path, and exactly-once
positions, replay, snapshots and store checkpoints work unchanged: the copies are simply a wider
state row. (bench/window_bench.py measures this against re-running a ring of the last T frames
through the sequence graph.)

The bank holds, per state tensor, its T copies side by side (``[T * size]`` per row), so a
gathered ``[batch, T * size]`` array is the ``[batch * T, size]`` the step graph takes, with no
copy.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from .model import ModelSpec, StateSpec
from .runtime import Runtime, States

__all__ = ["WindowRuntime", "window_spec"]


def window_spec(spec: ModelSpec, window: int) -> ModelSpec:
    """The spec of a model served on windows of ``window`` frames: every state tensor ``window``
    times as wide (its staggered copies), and a fingerprint of its own (the same graphs serving
    another question: a session of one mode is never restored into the other)."""
    states = tuple(dataclasses.replace(s, size=s.size * window) for s in spec.states)
    fingerprint = hashlib.sha256(f"{spec.fingerprint}:window:{window}".encode()).hexdigest()
    return dataclasses.replace(
        spec, states=states, fingerprint=fingerprint, mode="window", window=window
    )


class WindowRuntime:
    """A ``Runtime``'s interface over T staggered copies of the model's state."""

    def __init__(self, runtime: Runtime, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.base = runtime
        self.window = window
        self.spec = window_spec(runtime.spec, window)
        self.device = runtime.device
        self.providers = runtime.providers
        self.cost = window  # cell steps per frame, against 1 for the stateful path
        self._sizes = [s.size for s in runtime.spec.states]

    @property
    def base_states(self) -> tuple[StateSpec, ...]:
        return self.base.spec.states

    def zero_states(self, batch: int) -> States:
        return [np.zeros((batch, self.window * size), np.float32) for size in self._sizes]

    def step(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]:
        """Frame ``positions[b]`` of each session b ([B, F]) -> its window answer [B, C]."""
        batch, window = len(frames), self.window
        at = np.zeros(batch, np.int64) if positions is None else np.asarray(positions, np.int64)
        rows = np.arange(batch)
        copies = []
        for state, size in zip(states, self._sizes, strict=True):
            stacked = np.array(state, np.float32).reshape(batch, window, size)  # a fresh copy
            stacked[rows, at % window] = 0.0  # this copy restarts at this frame
            copies.append(stacked.reshape(batch * window, size))
        probs, new = self.base.step(np.repeat(frames, window, axis=0), copies)
        answers = probs.reshape(batch, window, -1)[rows, (at + 1) % window]
        return answers, [
            s.reshape(batch, window * size) for s, size in zip(new, self._sizes, strict=True)
        ]

    def sequence(
        self, frames: np.ndarray, states: States, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, States]:
        """Frames ``[B, L, F]`` from ``positions`` on: the window answer at every one."""
        batch, length = frames.shape[0], frames.shape[1]
        at = np.zeros(batch, np.int64) if positions is None else np.asarray(positions, np.int64)
        out = []
        for t in range(length):
            probs, states = self.step(np.ascontiguousarray(frames[:, t]), states, at + t)
            out.append(probs)
        return np.stack(out, axis=1), states
