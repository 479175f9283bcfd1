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

# Batches of at least this many state floats gather and scatter tensor by tensor; smaller ones
# through one whole-row array (fewer numpy calls for a lone session).
_WIDE = 16_384


def _flush(values: np.ndarray) -> None:
    """Denormal float32 values (and -0.0) become +0.0, in place: every value whose exponent bits
    are zero is multiplied by 0 as an integer. Branch-free, so as fast with the many exact zeros
    of relu states as without (a boolean-mask assignment was 5x slower on them)."""
    bits = values.view(np.uint32)
    np.multiply(bits, (bits & 0x7F800000) != 0, out=bits)


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
        """Each state tensor's rows of ``slots``, as fresh contiguous arrays."""
        if len(slots) * self.states.shape[1] < _WIDE:
            rows = self.states[slots]
            return [np.ascontiguousarray(rows[:, columns]) for columns in self._columns]
        # Wide (many sessions, or window copies): one fancy index per tensor, no whole-row
        # temporary (measured 10x faster for 48 window sessions at T = 30).
        return [self.states[slots, columns] for columns in self._columns]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        """Write back new states, denormal values flushed to zero: relu LSTM states that decay
        leave denormals behind, and every multiply-add on one is ~100x slower (measured on the
        bundled model: sessions replaying recordings in a loop grew 11 % denormal state values
        and a step went from 5 to 25 us per session; flushed, it stays at 5-6 us). A flushed
        value differs from the computed one by less than 1.2e-38."""
        if len(slots) * self.states.shape[1] < _WIDE:
            rows = (
                np.concatenate(states, axis=1, dtype=np.float32)
                if len(states) > 1
                else np.array(states[0], np.float32)
            )
            _flush(rows)
            self.states[slots] = rows
            return
        # Wide: each tensor flushed where it lies (the runtime's own fresh output) and written
        # into its columns, with no whole-row temporary.
        for columns, state in zip(self._columns, states, strict=True):
            if not (
                state.dtype == np.float32 and state.flags.writeable and state.flags.c_contiguous
            ):
                state = np.array(state, np.float32)
            _flush(state)
            self.states[slots, columns] = state

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
