"""Parity of the ONNX graphs, judged against the model's float64 answer next to Keras's own.

Keras and both graphs are float32 computations of one model with different orders of
summation, so none of them is exact; `float64` is (to ~1e-16). A graph passes when it is as
close to the float64 answer as Keras is:

    distance(graph, float64) <= max(margin * distance(Keras, float64), floor)

for probabilities (max absolute difference, floor `TOLERANCE`), logits (max absolute difference
relative to the step's logit scale max(1, max |logit|), floor `LOGIT_TOLERANCE`) and, one step
at a time, states (the same, relative to each state's scale, floor `STATE_TOLERANCE`).

Two kinds of distance, both required:
- whole runs (`MODES`, margin `RUN_MARGIN`): every way the server feeds the graphs (whole
  sequences, step by step, a batch of sessions stepped together, the sequence graph one frame
  per call and in random chunks), from zero states, against float64 run the same way;
- one step (`ONE_STEP_MODES`, margin `ONE_STEP_MARGIN`): step.onnx and sequence.onnx (one
  frame) from the float64 states before every step of every sample (rounded to float32),
  against float64 and Keras's own cells from the same states.

Probabilities alone cannot judge an unstable model: once rounding decides near ties, Keras is 1
away and a probability moves by at most 1. Logits relative to their size can, until a chaotic
model (errors that grow exponentially with time) makes even Keras's logits unrelated to float64
after some frames. One step from the same states, rounding cannot compound: correct float32
implementations stay within a small factor of each other whatever the model, and a wrong weight
stands out by orders of magnitude, stable model or not.

The margins are measured (tests/export_fixtures/measure_parity.py, 38 models, 2 graphs, 5 ways
of feeding): over whole runs, rounding that the model amplifies puts correct graphs up to 3.3x
Keras's distance (6.6x where Keras happened to be below the floors); one step, up to 1.4x.
RUN_MARGIN 16 and ONE_STEP_MARGIN 4 leave room for that; one weight moved by 0.001 to 1 moved
the one-step distances 20x to 10^4x in our trials (tests/test_export_parity.py refuses 0.05),
except weights that multiply a state relu keeps at zero, which change nothing at all. The
floors keep a graph within 1e-5 of the exact answer from failing because Keras happened to be
closer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ParityError
from .float64 import Step, Trace
from .graphs import PROBABILITIES
from .onnxgraph import logits_graph
from .reference import KerasOutputs, KerasStep
from .runner import Runner
from .spec import State

__all__ = [
    "LOGIT_TOLERANCE",
    "MODES",
    "ONE_STEP_MARGIN",
    "ONE_STEP_MODES",
    "RUN_MARGIN",
    "STATE_TOLERANCE",
    "TOLERANCE",
    "Distance",
    "Local",
    "Parity",
    "check",
    "distance",
    "keras_distance",
    "local_rows",
]

TOLERANCE = 1e-5
LOGIT_TOLERANCE = 1e-5
STATE_TOLERANCE = 1e-5
RUN_MARGIN = 16.0
ONE_STEP_MARGIN = 4.0
MODES = ("sequence", "step", "sequence_t1", "batched_step", "chunked")
ONE_STEP_MODES = ("step_one", "sequence_one")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distance:
    """How far float32 answers are from the float64 ones (worst over all samples and steps)."""

    probabilities: float  # max |p - p64|
    logits: float  # max |z - z64| / max(1, max_c |z64|), per step
    states: float | None = None  # the same per state, measured one step at a time only

    def within(self, allowed: Distance) -> bool:
        states = self.states is None or allowed.states is None or self.states <= allowed.states
        return (
            states
            and self.probabilities <= allowed.probabilities
            and self.logits <= (allowed.logits)
        )

    def worst(self, other: Distance) -> Distance:
        states = [v for v in (self.states, other.states) if v is not None]
        return Distance(
            max(self.probabilities, other.probabilities),
            max(self.logits, other.logits),
            max(states) if states else None,
        )

    def allowance(self, margin: float) -> Distance:
        """What a graph may reach when Keras is this far: `margin` times, at least the floors."""
        return Distance(
            max(margin * self.probabilities, TOLERANCE),
            max(margin * self.logits, LOGIT_TOLERANCE),
            None if self.states is None else max(margin * self.states, STATE_TOLERANCE),
        )

    def as_json(self) -> dict[str, float]:
        out = {"probabilities": self.probabilities, "logits": self.logits}
        return out if self.states is None else {**out, "states": self.states}

    def text(self) -> str:
        states = "" if self.states is None else f" / {self.states:.3g}"
        return f"{self.probabilities:.3g} / {self.logits:.3g}{states}"


_ZERO = Distance(0.0, 0.0)


def _max(values: np.ndarray) -> float:
    """Max of non-negative values; NaN (a non-finite output) counts as infinitely far."""
    if values.size == 0:
        return 0.0
    return float("inf") if np.isnan(values).any() else float(np.max(values))


def _relative(got: np.ndarray, exact: np.ndarray) -> float:
    scale = np.maximum(1.0, np.max(np.abs(exact), axis=-1, keepdims=True))
    return _max(np.abs(got.astype(np.float64) - exact) / scale)


def distance(
    probabilities: np.ndarray,
    logits: np.ndarray,
    exact_p: np.ndarray,
    exact_z: np.ndarray,
    states: Mapping[str, np.ndarray] | None = None,
    exact_states: Mapping[str, np.ndarray] | None = None,
) -> Distance:
    """Distance of float32 outputs [..., C] (and states [..., size]) from float64 ones."""
    with np.errstate(invalid="ignore", over="ignore"):
        p = _max(np.abs(probabilities.astype(np.float64) - exact_p))
        z = _relative(logits, exact_z)
        s = None
        if states is not None and exact_states is not None:
            s = max((_relative(states[k], v) for k, v in exact_states.items()), default=0.0)
    return Distance(p, z, s)


def keras_distance(
    keras: KerasOutputs, exact: Trace, lengths: np.ndarray, first: int | None = None
) -> Distance:
    """Keras's float32 answers from the float64 ones over each sample's length (or its first
    `first` steps)."""
    far = _ZERO
    for i, length in enumerate(int(v) for v in lengths):
        n = length if first is None else min(first, length)
        far = far.worst(
            distance(
                keras.probabilities[i, :n],
                keras.logits[i, :n],
                exact.probabilities[i, :n],
                exact.logits[i, :n],
            )
        )
    return far


@dataclass(frozen=True)
class Local:
    """One step from given states for every step of every sample: the frames [B, F], the
    float32 states before the step (by name), and the answers of float64 and Keras."""

    frames: np.ndarray
    states: dict[str, np.ndarray]
    exact: Step
    keras: KerasStep

    def keras_distance(self) -> Distance:
        return distance(
            self.keras.probabilities,
            self.keras.logits,
            self.exact.probabilities,
            self.exact.logits,
            self.keras.states,
            self.exact.states,
        )


def local_rows(
    x: np.ndarray, lengths: np.ndarray, exact: Trace
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every (sample, step) as one row: its frame and the float64 states before it, in float32
    (zeros before the first step), so every implementation starts from the same numbers."""
    index = [(i, t) for i, n in enumerate(int(v) for v in lengths) for t in range(n)]
    frames = np.stack([x[i, t] for i, t in index]).astype(np.float32)
    states = {}
    for name, values in exact.states.items():
        before = np.zeros((len(index), values.shape[-1]), np.float32)
        for row, (i, t) in enumerate(index):
            if t > 0:
                before[row] = values[i, t - 1]
        states[name] = before
    return frames, states


@dataclass(frozen=True)
class Parity:
    keras: Distance  # Keras (float32) from float64 over whole runs
    graphs: Mapping[str, Distance]  # each way of feeding the graphs, from float64
    keras_one: Distance  # Keras's cells from float64, one step from the same states
    graphs_one: Mapping[str, Distance]  # each graph one step from the same states
    versus_keras: Mapping[str, float]  # max |p - p_keras| per way (the figures before float64)
    samples: int
    chunkings: int

    def failures(self) -> list[str]:
        whole = self.keras.allowance(RUN_MARGIN)
        one = self.keras_one.allowance(ONE_STEP_MARGIN)
        return [m for m, d in self.graphs.items() if not d.within(whole)] + [
            m for m, d in self.graphs_one.items() if not d.within(one)
        ]

    def worst(self) -> float:
        """Largest probability difference from Keras (kept for the log line and old readers)."""
        return max(self.versus_keras.values())

    def as_json(self) -> dict[str, object]:
        return {
            **{f"{mode}_max_abs": value for mode, value in self.versus_keras.items()},
            "samples": self.samples,
            "chunkings": self.chunkings,
            "float64": {
                "keras": self.keras.as_json(),
                **{mode: d.as_json() for mode, d in self.graphs.items()},
                "keras_one": self.keras_one.as_json(),
                **{mode: d.as_json() for mode, d in self.graphs_one.items()},
            },
            "allowed": self.keras.allowance(RUN_MARGIN).as_json(),
            "allowed_one": self.keras_one.allowance(ONE_STEP_MARGIN).as_json(),
            "margin": {"runs": RUN_MARGIN, "one_step": ONE_STEP_MARGIN},
        }

    def describe(self) -> str:
        whole = [f"Keras {self.keras.text()}"] + [f"{m} {d.text()}" for m, d in self.graphs.items()]
        one = [f"Keras {self.keras_one.text()}"] + [
            f"{m} {d.text()}" for m, d in self.graphs_one.items()
        ]
        return (
            "distance from float64 (probabilities / logits / states, relative): whole runs: "
            + ", ".join(whole)
            + "; one step: "
            + ", ".join(one)
        )


class _Graph:
    """A served graph and its logits copy (`logits_graph`), fed identically."""

    def __init__(self, graph: bytes, states: Sequence[State]) -> None:
        self.probabilities = Runner(graph, states)
        self.logits = Runner(logits_graph(graph, PROBABILITIES), states)

    def run(self, feed: Callable[..., np.ndarray], *args: object) -> tuple[np.ndarray, np.ndarray]:
        return feed(self.probabilities, *args), feed(self.logits, *args)

    def one(self, local: Local, *, sequence: bool) -> Distance:
        frames = local.frames[:, None] if sequence else local.frames
        p, states = self.probabilities(frames, local.states)
        z, _ = self.logits(frames, local.states)
        batch = len(local.frames)
        return distance(
            p.reshape(batch, -1),
            z.reshape(batch, -1),
            local.exact.probabilities,
            local.exact.logits,
            states,
            local.exact.states,
        )


def _whole(runner: Runner, frames: np.ndarray) -> np.ndarray:
    return runner(frames, runner.zeros(len(frames)))[0]


def _one_frame_calls(runner: Runner, frames: np.ndarray) -> np.ndarray:
    return runner.stepped(frames, sequence=True)


def check(
    graphs: Mapping[str, bytes],
    states: Sequence[State],
    x: np.ndarray,
    lengths: np.ndarray,
    keras: KerasOutputs,
    exact: Trace,
    local: Local,
    *,
    chunkings: int = 3,
    seed: int = 0,
) -> Parity:
    """Judge both graphs on samples x [n, T, F]; raise `ParityError` when one is materially
    further from float64 than Keras (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sequence, step = _Graph(graphs["sequence"], states), _Graph(graphs["step"], states)
    far = dict.fromkeys(MODES, _ZERO)
    off = dict.fromkeys(MODES, 0.0)

    def record(mode: str, rows: slice, steps: int, got: tuple[np.ndarray, np.ndarray]) -> None:
        p, z = got
        d = distance(p, z, exact.probabilities[rows, :steps], exact.logits[rows, :steps])
        far[mode] = far[mode].worst(d)
        with np.errstate(invalid="ignore"):
            off[mode] = max(off[mode], _max(np.abs(p - keras.probabilities[rows, :steps])))

    for i, length in enumerate(int(v) for v in lengths):
        frames = x[i : i + 1, :length]
        row = slice(i, i + 1)
        record("sequence", row, length, sequence.run(_whole, frames))
        record("step", row, length, step.run(Runner.stepped, frames))
        record("sequence_t1", row, length, sequence.run(_one_frame_calls, frames))
        for _ in range(chunkings):
            pieces = int(rng.integers(1, max(2, length // 4)))
            cuts: list[int] = rng.integers(1, length, size=pieces).tolist() if length > 1 else []
            record("chunked", row, length, sequence.run(Runner.chunked, frames, cuts))
    shortest = int(lengths.min())
    every = slice(0, len(lengths))
    record("batched_step", every, shortest, step.run(Runner.stepped, x[:, :shortest]))
    one = {
        "step_one": step.one(local, sequence=False),
        "sequence_one": sequence.one(local, sequence=True),
    }
    parity = Parity(
        keras_distance(keras, exact, lengths),
        far,
        local.keras_distance(),
        one,
        off,
        len(lengths),
        chunkings,
    )
    _log.info("parity: %s", parity.describe())
    failed = parity.failures()
    if failed:
        raise ParityError(
            f"ONNX graph ({', '.join(failed)}) is materially further from the float64 answer "
            f"than Keras is (allowed: max({RUN_MARGIN:g} x Keras's distance over whole runs, "
            f"{ONE_STEP_MARGIN:g} x one step, floor)): "
            f"{parity.describe()}",
            parity,
        )
    return parity
