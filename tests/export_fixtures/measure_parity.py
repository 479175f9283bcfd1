"""Measure how far correct graphs are from float64 next to Keras (the parity margin's basis),
and the figures of the issue's seed architecture with N(0, 0.3^2) weights.

Not run by the tests (about 3 minutes on 2 cores):
    .venv/bin/python -P tests/export_fixtures/measure_parity.py

For every model it builds the two graphs once, judges them on the default parity samples (whole
24-frame streams, or 5-frame windows) and prints, per way of feeding, the graph's distance from
float64 divided by Keras's (where Keras's distance is above the floor, so the ratio decides).
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from window_models import sigma_seed_model

from seqserve.export.errors import ParityError
from seqserve.export.float64 import forward, step
from seqserve.export.parity import (
    LOGIT_TOLERANCE,
    STATE_TOLERANCE,
    TOLERANCE,
    Local,
    Parity,
    check,
    local_rows,
)
from seqserve.export.pipeline import _synthetic, build_graphs
from seqserve.export.reference import keras_outputs, keras_step
from seqserve.export.spec import describe
from seqserve.export.window import cut

FLOORS = {"probabilities": TOLERANCE, "logits": LOGIT_TOLERANCE, "states": STATE_TOLERANCE}


def _stack(cell: str, activation: str, sigma: float, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((None, 6)),
            getattr(keras.layers, cell)(16, activation=activation, return_sequences=True),
            getattr(keras.layers, cell)(16, activation=activation),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(0, sigma, w.shape).astype(np.float32) for w in model.get_weights()]
    )
    return model


def judge(name: str, model: keras.Model, window: int | None, ratios: list[float]) -> None:
    spec = describe(model)
    graphs = build_graphs(spec)
    samples = _synthetic(spec, steps=24)
    x, lengths = samples.x, samples.lengths
    if window is not None:
        x, lengths = cut(x, lengths, window, 40)
    keras_out = keras_outputs(model, x, lengths)
    exact = forward(spec, x, lengths)
    rows, before = local_rows(x, lengths, exact)
    local = Local(rows, before, step(spec, rows, before), keras_step(model, spec, rows, before))
    try:
        parity = check(graphs, spec.states, x, lengths, keras_out, exact, local)
    except ParityError as exc:  # report it and its ratios all the same
        assert isinstance(exc.parity, Parity)
        parity = exc.parity
        print(f"\nREFUSED {name}: {exc}")
    print(f"\n{name}: {parity.describe()}")
    for keras_far, graphs_far in (
        (parity.keras, parity.graphs),
        (parity.keras_one, parity.graphs_one),
    ):
        for field, floor in FLOORS.items():
            reference = getattr(keras_far, field)
            if reference is None or reference <= floor:
                continue
            for mode, far in graphs_far.items():
                ratio = getattr(far, field) / reference
                ratios.append(ratio)
                print(f"  {mode:<13} {field:<13} graph / Keras = {ratio:.2f}")


def main() -> None:
    ratios: list[float] = []
    judge(
        "seed architecture, N(0, 0.3^2), windows of 5 (convert's default)",
        sigma_seed_model(),
        5,
        ratios,
    )
    judge(
        "seed architecture, N(0, 0.3^2), 24-frame streams (--window none)",
        sigma_seed_model(),
        None,
        ratios,
    )
    for cell in ("LSTM", "GRU", "SimpleRNN"):
        for activation in ("relu", "tanh"):
            for sigma in (0.3, 0.6, 1.0):
                for seed in (0, 1):
                    name = f"{cell} {activation} N(0, {sigma}^2) seed {seed}"
                    judge(name, _stack(cell, activation, sigma, seed), None, ratios)
    if ratios:
        print(
            f"\n{len(ratios)} ratios above the floors: min {min(ratios):.2f}, "
            f"median {np.median(ratios):.2f}, max {max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
