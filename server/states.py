"""Recurrent state and recent outputs of every session, in slot-indexed slabs.

Every state tensor of a session sits in one row (its slot) of one ``[capacity, state floats]``
array; a batch gathers its rows with one fancy index and scatters the new states back with one.
The arrays are allocated with ``np.zeros``, which the OS backs lazily, so memory grows with the
slots actually used.

The replay ring keeps the last ``window`` output rows per slot: frame ``f`` lives at
``ring[slot, f % window]``, which is what answers a retried request without recomputing it.
"""

from __future__ import annotations

import itertools

import numpy as np

from .model import ModelSpec

__all__ = ["StateBank"]


class StateBank:
    def __init__(self, spec: ModelSpec, capacity: int, window: int) -> None:
        self.capacity = capacity
        self.window = window
        # One [capacity, all state floats] array; ``slabs`` are its column views, one per state
        # tensor, so a batch gathers and scatters every tensor with one fancy index.
        self.states = np.zeros((capacity, spec.state_floats), np.float32)
        bounds = itertools.accumulate((s.size for s in spec.states), initial=0)
        self._columns = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        self.slabs = [self.states[:, columns] for columns in self._columns]
        self.ring = np.zeros((capacity, window, spec.classes), np.float32)
        self.bytes_per_slot = 4 * spec.state_floats
        self._free: list[int] = []
        self.high_water = 0

    @property
    def used(self) -> int:
        return self.high_water - len(self._free)

    def allocate(self) -> int:
        """A zeroed slot; callers check the session cap first."""
        if self._free:
            slot = self._free.pop()
        elif self.high_water < self.capacity:
            slot = self.high_water
            self.high_water += 1
        else:
            raise RuntimeError("state bank full")  # unreachable behind the session cap
        return slot

    def release(self, slot: int) -> None:
        self.zero(slot)
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        self.states[slot] = 0.0

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        rows = self.states[slots]
        return [np.ascontiguousarray(rows[:, slab_columns]) for slab_columns in self._columns]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        """Write back new states, denormal values flushed to zero: relu LSTM states that decay
        leave denormals behind, and every multiply-add on one is ~100x slower (measured on the
        bundled model: sessions replaying recordings in a loop grew 11 % denormal state values
        and a step went from 5 to 25 us per session; flushed, it stays at 5-6 us). A flushed
        value differs from the computed one by less than 1.2e-38."""
        rows = np.concatenate(states, axis=1) if len(states) > 1 else np.array(states[0])
        rows[(rows.view(np.uint32) & 0x7F800000) == 0] = 0.0  # zero exponent: 0 or denormal
        self.states[slots] = rows

    def record_steps(self, slots: np.ndarray, positions: np.ndarray, probs: np.ndarray) -> None:
        """One output row per slot: ``probs[i]`` is frame ``positions[i]`` of ``slots[i]``."""
        self.ring[slots, positions % self.window] = probs

    def record(self, slot: int, position: int, probs: np.ndarray) -> None:
        """Output rows of frames ``position ..`` of one slot (only the last ``window`` are kept)."""
        keep = probs[-self.window :]
        first = position + len(probs) - len(keep)
        self.ring[slot, np.arange(first, first + len(keep)) % self.window] = keep

    def replay(self, slot: int, start: int, stop: int) -> np.ndarray:
        """Recorded outputs of frames ``[start, stop)`` (the caller checks the window)."""
        return self.ring[slot, np.arange(start, stop) % self.window]
