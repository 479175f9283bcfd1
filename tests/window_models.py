"""Window-trained test models, converted once per test session, and Keras's window answers.

The issue's seed architecture, LSTM(64, relu, return_sequences) -> LSTM(128, relu,
return_sequences) -> LSTM(64, relu) -> Dense(64, relu) -> Dense(32, relu) -> Dense(3, softmax),
with input (5, 126) (`SEED_WINDOW`) and with input (30, 126) (`LONG_WINDOW`, the tutorial's 30
frames), saved as .keras and as .h5 and converted by `seqserve-export convert` (window
detected, so model.json says window: T).

The weights are seeded and untrained, chosen so that both models are numerically stable
(float64 values below 4 in windows, below 7 over 90-frame streams; Keras within 1e-6 of float64)
and remember longer than their window: recurrent kernels N(0, 0.06^2), LSTM biases 0 except the
forget gate's 1.5, Dense kernels N(0, 9 / fan_in), Dense biases N(0, 0.06^2). On Gaussian frames
their window answers and the stateful stream's answers then differ by up to 0.23 (T = 5) and
0.67 (T = 30) in probability after T frames (median over frames 0.09 and 0.13), so a test that
serves the wrong one fails. (Keras's default initialisation forgets within a few frames and
answers nearly uniform probabilities: its stream and window answers differ by only 5e-4 at
T = 30. Training on synthetic data would add tens of seconds for nothing a test needs.)

`sigma_seed_model` is the issue's unstable case: the same architecture with every weight
N(0, 0.3^2), as untrained models and badly trained relu LSTMs look.

Use from a test module (tests/ is on sys.path):

    from window_models import SEED_WINDOW, window_predict
    pytest_plugins = ["window_models"]  # registers the session fixture below

    def test_x(window_models):
        seed = window_models[SEED_WINDOW]   # .model, .keras, .h5, .directory, .h5_directory

Answers before T frames: window_predict's default, early="partial", answers the model on the
frames so far (from a zero state). Recommended for serving too: every frame gets an answer (the
wire contract has one per frame), it is exactly what Keras's predict gives on those frames, and
a client that wants the tutorial's behaviour drops the first T - 1 answers. The alternatives
are worse: waiting ("wait": NaN here) needs an answer-less reply in the protocol, and padding
the window with zero frames invents input the model never saw (zeros are not neutral after
normalization) unless the model masks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from seqserve.export.cli import main  # noqa: E402
from seqserve.export.reference import Early, window_predict  # noqa: E402

__all__ = [
    "CLASSES",
    "FEATURES",
    "LONG_WINDOW",
    "SEED_WINDOW",
    "Early",
    "WindowModel",
    "build_window_models",
    "seed_window_model",
    "sigma_seed_model",
    "window_models",
    "window_predict",
]

SEED_WINDOW = 5
LONG_WINDOW = 30
FEATURES = 126
CLASSES = 3
_RECURRENT_SIGMA = 0.06
_FORGET_BIAS = 1.5
_HEAD_GAIN = 3.0


def seed_window_model(window: int, *, features: int = FEATURES, seed: int = 0) -> keras.Model:
    """The seed architecture on windows of `window` frames, with the stable seeded weights."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((window, features), name="frames"),
            layers.LSTM(64, return_sequences=True, activation="relu", name="lstm"),
            layers.LSTM(128, return_sequences=True, activation="relu", name="lstm_1"),
            layers.LSTM(64, return_sequences=False, activation="relu", name="lstm_2"),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dense(32, activation="relu", name="dense_1"),
            layers.Dense(CLASSES, activation="softmax", name="dense_2"),
        ],
        name=f"window{window}",
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for weight in layer.get_weights():
            if isinstance(layer, keras.layers.Dense) and weight.ndim == 2:
                value = rng.normal(0.0, _HEAD_GAIN / np.sqrt(weight.shape[0]), weight.shape)
            elif isinstance(layer, keras.layers.LSTM) and weight.ndim == 1:
                units = weight.shape[0] // 4
                value = np.zeros(weight.shape)
                value[units : 2 * units] = _FORGET_BIAS  # gate order i, f, c, o
            else:
                value = rng.normal(0.0, _RECURRENT_SIGMA, weight.shape)
            values.append(value.astype(np.float32))
        layer.set_weights(values)
    return model


def sigma_seed_model(sigma: float = 0.3, window: int = SEED_WINDOW, seed: int = 0) -> keras.Model:
    """The seed architecture on (window, 126) with every weight drawn from N(0, sigma^2)."""
    model = seed_window_model(window, seed=seed)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(0.0, sigma, w.shape).astype(np.float32) for w in model.get_weights()]
    )
    return model


@dataclass(frozen=True)
class WindowModel:
    window: int
    model: keras.Model
    keras: Path  # model.keras
    h5: Path  # model.h5
    directory: Path  # converted from .keras
    h5_directory: Path  # converted from .h5


def build_window_models(
    root: Path, windows: tuple[int, ...] = (SEED_WINDOW, LONG_WINDOW)
) -> dict[int, WindowModel]:
    """Build, save (.keras, .h5) and convert (CLI, --window auto) one model per window."""
    built = {}
    for window in windows:
        folder = root / f"window{window}"
        folder.mkdir(parents=True, exist_ok=True)
        model = seed_window_model(window)
        paths = {suffix: folder / f"model.{suffix}" for suffix in ("keras", "h5")}
        for path in paths.values():
            model.save(path)
        for suffix, path in paths.items():
            out = folder / f"converted_{suffix}"
            code = main(["convert", str(path), "-o", str(out), "--labels", "a,b,c"])
            assert code == 0, f"convert {path} failed"
        built[window] = WindowModel(
            window,
            model,
            paths["keras"],
            paths["h5"],
            folder / "converted_keras",
            folder / "converted_h5",
        )
    return built


@pytest.fixture(scope="session")
def window_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, WindowModel]:
    """Both window models, converted once per session (15-35 s on 2 cores, with load)."""
    return build_window_models(tmp_path_factory.mktemp("window_models"))
