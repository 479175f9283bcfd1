"""Recurrent state and recent outputs of every session, in slot-indexed slabs.

Each state tensor is one ``[capacity, size]`` array; a session owns one row (its slot). A batch
gathers rows with fancy indexing and scatters the new states back. The slabs are allocated with
``np.zeros``, which the OS backs lazily, so memory grows with the slots actually used.

The replay ring keeps the last ``window`` output rows per slot: frame ``f`` lives at
``ring[slot, f % window]``, which is what answers a retried request without recomputing it.
"""

from __future__ import annotations

import numpy as np

from .model import ModelSpec

__all__ = ["StateBank"]


class StateBank:
    def __init__(self, spec: ModelSpec, capacity: int, window: int) -> None:
        self.capacity = capacity
        self.window = window
        self.slabs = [np.zeros((capacity, s.size), np.float32) for s in spec.states]
        self.ring = np.zeros((capacity, window, spec.classes), np.float32)
        self.bytes_per_slot = 4 * spec.state_floats
        self.slabs_floats = spec.state_floats
        self._free: list[int] = []
        self._high_water = 0

    @property
    def used(self) -> int:
        return self._high_water - len(self._free)

    def allocate(self) -> int:
        """A zeroed slot; callers check the session cap first."""
        if self._free:
            slot = self._free.pop()
        elif self._high_water < self.capacity:
            slot = self._high_water
            self._high_water += 1
        else:
            raise RuntimeError("state bank full")  # unreachable behind the session cap
        return slot

    def release(self, slot: int) -> None:
        self.zero(slot)
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        for slab in self.slabs:
            slab[slot] = 0.0

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        return [slab[slots] for slab in self.slabs]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        for slab, values in zip(self.slabs, states, strict=True):
            slab[slots] = values

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
