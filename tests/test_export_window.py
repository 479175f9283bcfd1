"""Window-trained models: detected by convert, recorded in model.json, served like Keras's
predict on the last T frames by the same two graphs (tests/window_models.py builds them)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")

from window_models import (  # noqa: E402
    FEATURES,
    LONG_WINDOW,
    SEED_WINDOW,
    WindowModel,
    seed_window_model,
    window_predict,
)

from seqserve.export.cli import main  # noqa: E402
from seqserve.export.errors import ExportError  # noqa: E402
from seqserve.export.reference import window_answers  # noqa: E402
from seqserve.export.runner import Runner  # noqa: E402
from seqserve.export.spec import State, describe  # noqa: E402
from seqserve.export.window import detect, resolve  # noqa: E402

pytestmark = pytest.mark.export
pytest_plugins = ["window_models"]  # the session fixture `window_models`

TOL = 1e-5
L = keras.layers


def _meta(directory: Path) -> dict:
    return json.loads((directory / "model.json").read_text())


def _runners(directory: Path) -> tuple[Runner, Runner]:
    states = [
        State(s["name"], s["layer"], s["kind"], s["size"]) for s in _meta(directory)["states"]
    ]
    return (
        Runner((directory / "sequence.onnx").read_bytes(), states),
        Runner((directory / "step.onnx").read_bytes(), states),
    )


def _tiny(steps: int | None, *, last_sequences: bool = False) -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((steps, 3)),
            L.LSTM(4, activation="relu", return_sequences=last_sequences),
            L.Dense(3, activation="softmax"),
        ]
    )


def test_detection_needs_a_fixed_time_dimension_and_a_collapsing_last_layer() -> None:
    cases = {
        "seed (5, 126)": (seed_window_model(SEED_WINDOW), SEED_WINDOW),
        "T = 30": (seed_window_model(LONG_WINDOW), LONG_WINDOW),
        "time None": (_tiny(None), None),
        "fixed time, last layer returns sequences": (_tiny(6, last_sequences=True), None),
    }
    for name, (model, expected) in cases.items():
        assert detect(model, describe(model)) == expected, name
    model = _tiny(6)
    spec = describe(model)
    assert resolve(model, spec, "auto") == 6
    assert resolve(model, spec, "none") is None
    assert resolve(model, spec, 6) == 6
    with pytest.raises(ExportError, match="takes exactly 6 frames"):
        resolve(model, spec, 4)
    free = _tiny(None)
    assert resolve(free, describe(free), 4) == 4
    with pytest.raises(ExportError, match=">= 1"):
        resolve(free, describe(free), 0)


def test_window_models_record_their_window(
    window_models: dict[int, WindowModel], capsys: pytest.CaptureFixture
) -> None:
    for window, built in window_models.items():
        for directory in (built.directory, built.h5_directory):
            meta = _meta(directory)
            assert meta["window"] == window
            assert meta["numerics"]["stable"] is True
            assert meta["numerics"]["warning"] is None
            assert max(meta["numerics"]["peaks"].values()) < 10
            assert meta["layers"][0]["input_size"] == FEATURES
            assert main(["inspect", str(directory)]) == 0
            text = capsys.readouterr().out
            assert f"serving: window of {window} frames" in text
            assert "numerics: stable" in text
        assert main(["inspect", str(built.keras)]) == 0
        text = capsys.readouterr().out
        assert f"serving: window of {window} frames" in text and "detected" in text


def test_graphs_take_any_batch_and_any_number_of_steps(
    window_models: dict[int, WindowModel],
) -> None:
    rng = np.random.default_rng(0)
    for window, built in window_models.items():
        for key, free in (("sequence", 2), ("step", 1)):
            dims = onnx.load(built.directory / f"{key}.onnx").graph.input[0].type.tensor_type
            shape = dims.shape.dim
            assert all(d.dim_param and not d.HasField("dim_value") for d in shape[:free]), key
            assert shape[free].dim_value == FEATURES
        sequence, step = _runners(built.directory)
        for batch in (1, 3):
            for steps in (1, window - 1, window, 2 * window + 3):
                frames = rng.standard_normal((batch, steps, FEATURES)).astype(np.float32)
                probabilities, states = sequence(frames, sequence.zeros(batch))
                assert probabilities.shape == (batch, steps, 3)
                assert all(v.shape[0] == batch for v in states.values())
        probabilities, _ = step(rng.standard_normal((4, FEATURES)), step.zeros(4))
        assert probabilities.shape == (4, 3)


def _serve_windows(
    sequence: Runner, frames: np.ndarray, window: int, cuts: list[int]
) -> np.ndarray:
    """Window serving with the sequence graph: frames arrive in chunks split at `cuts`; each
    chunk's answers come from one call over the windows ending at its frames (from zero)."""
    answers = []
    bounds = [0, *sorted(set(cuts)), len(frames)]
    for start, stop in itertools.pairwise(bounds):
        full = [t for t in range(start, stop) if t >= window - 1]
        for t in range(start, stop):  # fewer than `window` frames so far: the frames so far
            if t < window - 1:
                answers.append(sequence(frames[None, : t + 1], sequence.zeros(1))[0][0, -1])
        if full:
            batch = np.stack([frames[t - window + 1 : t + 1] for t in full])
            answers.extend(sequence(batch, sequence.zeros(len(full)))[0][:, -1])
    return np.stack(answers)


def _serve_staggered(step: Runner, frames: np.ndarray, window: int) -> np.ndarray:
    """Window serving with the step graph and `window` staggered states: a state starts at
    every frame, all live states advance together (one batched call per frame), and the state
    that started `window` - 1 frames ago (or at the first frame) answers, then is dropped."""
    starts: list[int] = []
    states: dict[str, np.ndarray] = step.zeros(0)
    answers = []
    for t, frame in enumerate(frames):
        starts.append(t)
        states = {k: np.concatenate([v, step.zeros(1)[k]]) for k, v in states.items()}
        probabilities, states = step(np.repeat(frame[None], len(starts), axis=0), states)
        answers.append(probabilities[starts.index(max(0, t - window + 1))])
        if t >= window - 1:  # the oldest state has answered its window
            keep = slice(1, None)
            starts = starts[keep]
            states = {k: v[keep] for k, v in states.items()}
    return np.stack(answers)


@pytest.mark.parametrize("window", [SEED_WINDOW, LONG_WINDOW])
def test_graphs_serve_every_frame_like_keras_on_the_window(
    window_models: dict[int, WindowModel], window: int
) -> None:
    built = window_models[window]
    rng = np.random.default_rng(window)
    frames = rng.standard_normal((2 * window + 7, FEATURES)).astype(np.float32)
    expected = window_predict(built.model, frames, window)
    assert not np.isnan(expected).any()
    for directory in (built.directory, built.h5_directory):
        sequence, step = _runners(directory)
        cuts = sorted(rng.integers(1, len(frames), size=4).tolist())
        by_chunks = _serve_windows(sequence, frames, window, cuts)
        one_by_one = _serve_windows(sequence, frames, window, list(range(1, len(frames))))
        staggered = _serve_staggered(step, frames, window)
        for got in (by_chunks, one_by_one, staggered):
            assert np.max(np.abs(got - expected)) <= TOL
    # The stateful stream answers something else once more than `window` frames have arrived,
    # by far more than the tolerance: a server answering the wrong one fails its tests.
    stream = step.stepped(frames[None])[0]
    assert np.max(np.abs(stream[:window] - expected[:window])) <= TOL
    assert np.max(np.abs(stream[window:] - expected[window:])) > 0.05


def test_reference_npz_holds_keras_window_answers(window_models: dict[int, WindowModel]) -> None:
    for window, built in window_models.items():
        with np.load(built.directory / "reference.npz") as ref:
            x, lengths, probabilities = ref["x"], ref["lengths"], ref["probabilities"]
        with np.load(built.directory / "samples.npz") as samples:
            assert samples["lengths"].max() > window  # recordings cross the window
        streams = [x[i, :n] for i, n in enumerate(lengths)]
        answers = window_answers(built.model, streams, window)
        for i, (n, want) in enumerate(zip(lengths, answers, strict=True)):
            assert np.max(np.abs(probabilities[i, :n] - want)) <= 1e-6
            assert np.all(probabilities[i, n:] == 0)
        # Streams of different lengths in one call answer as a stream alone does.
        np.testing.assert_array_equal(answers[-1], window_predict(built.model, streams[-1], window))


def test_window_predict_answers_before_the_window_is_full(
    window_models: dict[int, WindowModel],
) -> None:
    model = window_models[SEED_WINDOW].model
    rng = np.random.default_rng(3)
    streams = rng.standard_normal((2, 9, FEATURES)).astype(np.float32)
    partial = window_predict(model, streams, SEED_WINDOW)
    waiting = window_predict(model, streams, SEED_WINDOW, early="wait")
    assert partial.shape == waiting.shape == (2, 9, 3)
    assert np.isnan(waiting[:, : SEED_WINDOW - 1]).all()
    np.testing.assert_array_equal(waiting[:, SEED_WINDOW - 1 :], partial[:, SEED_WINDOW - 1 :])
    # "partial": the model on the frames so far, run by a copy of it that takes any length.
    free = keras.models.clone_model(model, input_tensors=keras.Input((None, FEATURES)))
    free.set_weights(model.get_weights())
    for t in range(SEED_WINDOW - 1):
        direct = free.predict(streams[:, : t + 1], verbose=0)
        assert np.max(np.abs(partial[:, t] - direct)) <= 1e-6
    # ... and after that predict on the last T frames, one stream or a batch alike.
    ends = range(SEED_WINDOW - 1, 9)
    windows = np.stack([streams[:, t - SEED_WINDOW + 1 : t + 1] for t in ends], axis=1)
    predicted = model.predict(windows.reshape(-1, SEED_WINDOW, FEATURES), verbose=0)
    assert (
        np.max(np.abs(partial[:, SEED_WINDOW - 1 :] - predicted.reshape(2, len(ends), 3))) <= 1e-6
    )
    np.testing.assert_array_equal(window_predict(model, streams[1], SEED_WINDOW), partial[1])
    short = window_predict(model, streams[0, :3], SEED_WINDOW)
    np.testing.assert_allclose(short, partial[0, :3], atol=1e-6)
    with pytest.raises(ValueError, match="takes 5 frames"):
        window_predict(model, streams, 4)


def test_window_flag_overrides_detection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    fixed = tmp_path / "fixed.keras"
    _tiny(6).save(fixed)
    free = tmp_path / "free.h5"
    _tiny(None).save(free)
    runs = {  # (--strict passes: these models are stable)
        "auto": ([str(fixed), "--strict"], 6),
        "none": ([str(fixed), "--window", "none"], None),
        "forced": ([str(free), "--window", "4"], 4),
    }
    for name, (args, expected) in runs.items():
        assert main(["convert", *args, "-o", str(tmp_path / name)]) == 0, name
        meta = _meta(tmp_path / name)
        assert meta["window"] == expected, name
        assert meta["numerics"]["stable"] is True
        serving = "stateful stream" if expected is None else f"window of {expected} frames"
        assert f"serving: {serving}" in capsys.readouterr().out
        # Parity ran where the model is served: windows of T frames, or whole recordings.
        origin = meta["samples"]["origin"]
        assert (f"windows of {expected} frames" in origin) == (expected is not None), name
    assert main(["convert", str(fixed), "-o", str(tmp_path / "bad"), "--window", "4"]) == 2
    assert "takes exactly 6 frames" in caplog.text
    assert not (tmp_path / "bad").exists()
    for bad in ("0", "five"):
        with pytest.raises(SystemExit):
            main(["convert", str(fixed), "-o", str(tmp_path / "x"), "--window", bad])
