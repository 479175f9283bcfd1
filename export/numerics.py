"""Is the model itself numerically stable in float32? Which layer's values explode?

A model is unstable when float32 cannot hold its answers to the 1e-5 the server otherwise
matches Keras to: Keras's own float32 answer is further than that from the float64 one
(`DRIFT_PROBABILITIES`, `DRIFT_LOGITS`), or some layer's values reach `MAGNITUDE_LIMIT`. Its
answers then differ between float32 runtimes by more than the tolerance, and where classes are
nearly tied the predicted class flips. Such a model is exported with a warning, also recorded
in model.json, or refused with `--strict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ExportError
from .float64 import Trace
from .parity import TOLERANCE, Distance, Local, keras_distance
from .reference import KerasOutputs

__all__ = [
    "DRIFT_LOGITS",
    "DRIFT_PROBABILITIES",
    "MAGNITUDE_LIMIT",
    "REFERENCE_TOLERANCE",
    "Numerics",
    "assess",
    "refuse_overflow",
]

# float32 spaces values in [8192, 16384) 2**-10 ~ 1e-3 apart: a hundred times the probability
# tolerance. A logit that large is rounded by up to 5e-4 just by being stored, enough to move a
# near-tie probability by 1e-4; states that large feed such logits. Trained models stay far
# below (the bundled ones peak below 150).
MAGNITUDE_LIMIT = 1e4
# Keras further than the parity tolerance from float64 cannot be matched to it by any other
# float32 runtime. Logits (relative to their size) show drift that saturated probabilities hide;
# 1e-4 is ten times their floor and 13 times the bundled models' 7.5e-6.
DRIFT_PROBABILITIES = TOLERANCE
DRIFT_LOGITS = 1e-4
# One step from the same states, Keras's cells must agree with the float64 reference to this,
# relative to the size of the logits and states: rounding cannot compound over one step, so a
# disagreement is a bug in the reference (an error), not an unstable model (a warning).
REFERENCE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Numerics:
    peaks: Mapping[str, float]  # largest |value| per layer, float64, over the parity samples
    keras: Distance  # Keras float32 from float64

    @property
    def exploding(self) -> list[str]:
        return [name for name, peak in self.peaks.items() if peak >= MAGNITUDE_LIMIT]

    @property
    def drifting(self) -> bool:
        return self.keras.probabilities > DRIFT_PROBABILITIES or self.keras.logits > DRIFT_LOGITS

    @property
    def stable(self) -> bool:
        return not self.exploding and not self.drifting

    def warning(self) -> str | None:
        if self.stable:
            return None
        if self.exploding:
            first = self.exploding[0]
            where = (
                f"values explode from layer {first!r} on: "
                + ", ".join(f"{name} up to {self.peaks[name]:.3g}" for name in self.exploding)
                + f" (limit {MAGNITUDE_LIMIT:.0e}, where float32 resolves only ~1e-3)"
            )
        else:
            where = (
                f"no layer reaches {MAGNITUDE_LIMIT:.0e}, but float32 rounding grows through "
                f"the model (largest values per layer: {_peaks(self.peaks)})"
            )
        p, z = self.keras.probabilities, self.keras.logits
        runtimes = "float32 runtimes (Keras, onnxruntime on CPU or CUDA, another CPU)"
        if p >= 0.5:
            serving = (
                f"the predicted class flips between {runtimes} wherever classes are nearly "
                "tied, so two correct servers can give different answers"
            )
        elif p > DRIFT_PROBABILITIES:
            serving = (
                f"answers differ between {runtimes} by up to about {2 * p:.2g}, beyond the "
                "1e-5 to which the server otherwise matches Keras, and the predicted class can "
                "flip where classes are nearly tied"
            )
        else:
            serving = (
                "float32 still holds these samples' answers, but values this large leave it no "
                "room: other inputs or longer streams can make answers differ between "
                f"{runtimes} beyond 1e-5 and flip the predicted class where classes are nearly "
                "tied"
            )
        return (
            f"numerically unstable model: {where}. float32 Keras itself differs from a float64 "
            f"computation of the same model by {p:.3g} in probabilities and {z:.3g} in logits "
            f"(relative to their size). Serving: {serving}. The graphs are as close to float64 "
            "as Keras is, so they were written (--strict refuses such models); smaller weights, "
            "tanh or clipped activations, or shorter windows keep the values bounded."
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "stable": self.stable,
            "warning": self.warning(),
            "exploding": self.exploding,
            "magnitude_limit": MAGNITUDE_LIMIT,
            "peaks": dict(self.peaks),
            "keras_float64": self.keras.as_json(),
        }


def refuse_overflow(keras: KerasOutputs, exact: Trace, lengths: np.ndarray) -> None:
    """`ExportError` when Keras answers NaN or inf: the model overflows float32 outright."""
    for i, length in enumerate(int(v) for v in lengths):
        p, z = keras.probabilities[i, :length], keras.logits[i, :length]
        if not (np.isfinite(p).all() and np.isfinite(z).all()):
            raise ExportError(
                "Keras itself answers NaN or inf on the parity samples: the model overflows "
                f"float32 (largest float64 values per layer: {_peaks(exact.peaks)})"
            )


def assess(keras: KerasOutputs, exact: Trace, lengths: np.ndarray, local: Local) -> Numerics:
    """Numerics of the model over the parity samples; `ExportError` when the float64 reference
    does not reproduce Keras's cells one step at a time."""
    refuse_overflow(keras, exact, lengths)
    one = local.keras_distance()
    if max(one.logits, one.states or 0.0) > REFERENCE_TOLERANCE:
        raise ExportError(
            f"one step from the same states, Keras and the float64 reference differ by "
            f"{one.text()} (probabilities / logits / states, relative): the exporter does not "
            "reproduce this model's arithmetic (please report it with the model)"
        )
    return Numerics(dict(exact.peaks), keras_distance(keras, exact, lengths))


def _peaks(peaks: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.3g}" for name, value in peaks.items())
