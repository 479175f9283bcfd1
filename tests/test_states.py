"""The state bank's gather and scatter, on both of their paths (a batch narrower than the
bank's threshold goes through one whole-row array, a wider one tensor by tensor): what is
scattered is what a later gather returns, bit for bit, except that denormals and -0.0 become
+0.0; other slots are never touched; gathered arrays are the caller's own."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqserve.server.model import ModelSpec, StateSpec
from seqserve.server.states import _WIDE, StateBank

CAPACITY = 40

# Bit patterns that matter to the flush: zeros of both signs, the smallest and largest
# denormals of both signs, the smallest normal, ordinary values, infinities and a NaN.
SPECIAL = np.array(
    [
        *(0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x80800000),
        *(0x3F800000, 0xC2C80000, 0x7F800000, 0xFF800000, 0x7FC00000),
    ],
    np.uint32,
)


def _spec(sizes: list[int]) -> ModelSpec:
    states = tuple(
        StateSpec(f"s{i}", f"layer{i // 2}", "hc"[i % 2], size, f"in{i}", f"out{i}")
        for i, size in enumerate(sizes)
    )
    return ModelSpec(
        directory=Path("."),
        name="m",
        version="1",
        features=3,
        labels=("a", "b"),
        states=states,
        layers=(),
        parameters=0,
        sequence_graph=Path("sequence.onnx"),
        step_graph=Path("step.onnx"),
        fingerprint="0" * 64,
    )


def _flushed(bits: np.ndarray) -> np.ndarray:
    return np.where((bits & 0x7F800000) == 0, np.uint32(0), bits)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    wide=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_scatter_then_gather_round_trips_with_denormals_flushed(sizes, wide, seed, data):
    floats = sum(sizes)
    if wide:  # rows wide enough that a few sessions reach the threshold
        sizes = [s * (_WIDE // floats + 1) for s in sizes]
        floats = sum(sizes)
    bank = StateBank(_spec(sizes), CAPACITY, window=4)
    rng = np.random.default_rng(seed)
    count = data.draw(st.integers(1, CAPACITY))
    slots = rng.permutation(CAPACITY)[:count]
    assert (count * floats >= _WIDE) == wide  # the path under test
    before = rng.standard_normal((CAPACITY, floats)).astype(np.float32)
    bank.states[:] = before
    bits = rng.choice(SPECIAL, (count, floats)).astype(np.uint32)
    normal = rng.random((count, floats)) < 0.5
    bits[normal] = rng.standard_normal(int(normal.sum())).astype(np.float32).view(np.uint32)
    values = bits.view(np.float32)
    edges = np.cumsum([0, *sizes])
    states = [np.ascontiguousarray(values[:, a:b]) for a, b in itertools.pairwise(edges)]
    # The runtime may hand back read-only or non-contiguous arrays: copied, never refused.
    if data.draw(st.booleans()):
        states[0].flags.writeable = False
    if len(states) > 1 and data.draw(st.booleans()):
        states[1] = np.asfortranarray(states[1])

    bank.scatter(slots, states)

    got = np.concatenate(bank.gather(slots), axis=1)
    assert np.array_equal(got.view(np.uint32), _flushed(bits))
    others = np.setdiff1d(np.arange(CAPACITY), slots)
    assert np.array_equal(bank.states[others].view(np.uint32), before[others].view(np.uint32))


@pytest.mark.parametrize("count", [1, 30])
def test_gathered_arrays_are_the_callers_own(count):
    sizes = [8, 8, 16] if count == 1 else [_WIDE // 30, _WIDE // 30, _WIDE // 15]
    bank = StateBank(_spec(sizes), CAPACITY, window=4)
    assert (count * bank.states.shape[1] >= _WIDE) == (count == 30)
    bank.states[:] = 1.0
    slots = np.arange(count)
    gathered = bank.gather(slots)
    assert [g.shape for g in gathered] == [(count, s) for s in sizes]
    for g in gathered:
        assert g.flags.c_contiguous and g.flags.writeable and g.dtype == np.float32
        g[:] = 7.0
    assert (bank.states == 1.0).all()


def test_a_flushed_value_differs_by_less_than_the_smallest_normal():
    spec = _spec([4])
    bank = StateBank(dataclasses.replace(spec), 2, window=1)
    values = np.array([[1e-39, -1e-45, 1.1754944e-38, -2.0]], np.float32)
    bank.scatter(np.array([1]), [values.copy()])
    got = bank.gather(np.array([1]))[0]
    assert got.tolist() == [[0.0, 0.0, float(np.float32(1.1754944e-38)), -2.0]]
    assert np.abs(got - values).max() < np.finfo(np.float32).tiny
