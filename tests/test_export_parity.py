"""Parity judged against float64: the reference itself, the criterion, unstable models (warned,
recorded, refused with --strict) and corrupted graphs (refused, stable or not)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402
from window_models import (  # noqa: E402
    FEATURES,
    SEED_WINDOW,
    WindowModel,
    sigma_seed_model,
)

import seqserve.export.pipeline as pipeline  # noqa: E402
from seqserve.export import float64  # noqa: E402
from seqserve.export.cli import main  # noqa: E402
from seqserve.export.errors import ExportError, ParityError  # noqa: E402
from seqserve.export.float64 import Trace, forward, step  # noqa: E402
from seqserve.export.graphs import PROBABILITIES  # noqa: E402
from seqserve.export.numerics import MAGNITUDE_LIMIT, assess  # noqa: E402
from seqserve.export.onnxgraph import logits_graph  # noqa: E402
from seqserve.export.parity import Distance, Local, Parity, check, local_rows  # noqa: E402
from seqserve.export.pipeline import Samples, _synthetic, export  # noqa: E402
from seqserve.export.reference import KerasOutputs, keras_outputs, keras_step  # noqa: E402
from seqserve.export.runner import Runner  # noqa: E402
from seqserve.export.spec import ModelSpec, State, describe  # noqa: E402
from seqserve.export.window import cut  # noqa: E402

pytestmark = pytest.mark.export
pytest_plugins = ["window_models"]  # the session fixture `window_models`

L = keras.layers


def _meta(directory: Path) -> dict:
    return json.loads((directory / "model.json").read_text())


def _model(
    cell: str, activation: str, head: str = "dense", masking: bool = False, **kwargs: object
) -> keras.Model:
    keras.utils.set_random_seed(2)
    layers: list[keras.Layer] = [keras.Input((None, 3))]
    if masking:
        layers.append(L.Masking(0.0))
    layers.append(L.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0]))
    layers += [
        getattr(L, cell)(6, activation=activation, return_sequences=True, **kwargs),
        getattr(L, cell)(5, activation=activation, **kwargs),
        L.Dense(4, activation="elu"),
    ]
    if head == "dense":
        layers.append(L.Dense(3, activation="softmax"))
    elif head == "softmax_layer":
        layers += [L.Dense(3), L.Softmax()]
    else:
        layers += [L.Dense(3), L.Activation("softmax"), L.Dropout(0.2)]
    return keras.Sequential(layers)


def _frames(count: int = 5, steps: int = 9, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((count, steps, 3)) * [2.0, 0.5, 1.0] + [0.5, -1, 2]).astype(np.float32)
    lengths = rng.integers(2, steps + 1, count)
    lengths[0] = steps
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    return Samples(x, lengths.astype(np.int64), np.zeros(count, np.int64), "test")


def _local(model: keras.Model, x: np.ndarray, lengths: np.ndarray) -> tuple:
    spec = describe(model)
    keras_out = keras_outputs(model, x, lengths)
    exact = forward(spec, x, lengths)
    rows, before = local_rows(x, lengths, exact)
    local = Local(rows, before, step(spec, rows, before), keras_step(model, spec, rows, before))
    return spec, keras_out, exact, local


@pytest.mark.parametrize(
    ("cell", "activation", "head", "kwargs"),
    [
        ("LSTM", "relu", "dense", {}),
        ("LSTM", "tanh", "softmax_layer", {"recurrent_activation": "hard_sigmoid"}),
        ("GRU", "tanh", "activation", {}),
        ("GRU", "relu", "dense", {"reset_after": False}),
        ("GRU", "softsign", "dense", {"use_bias": False}),
        ("SimpleRNN", "tanh", "dense", {}),
        ("SimpleRNN", "softplus", "activation", {}),
    ],
)
def test_float64_reference_is_the_keras_model(
    cell: str, activation: str, head: str, kwargs: dict
) -> None:
    # (Keras's Softmax layer cannot take the mask a Masking layer sends along: no masking there.)
    model = _model(cell, activation, head, masking=head != "softmax_layer", **kwargs)
    samples = _frames()
    spec, keras_out, exact, local = _local(model, samples.x, samples.lengths)
    # Whole runs (variable lengths, masking honoured as padding) and one step from given states.
    assert np.max(np.abs(keras_out.probabilities - exact.probabilities)) <= 1e-6
    assert np.max(np.abs(keras_out.logits - exact.logits)) <= 1e-5
    one = local.keras_distance()
    assert one.probabilities <= 1e-6 and one.logits <= 1e-5 and (one.states or 0) <= 1e-5
    assert set(local.exact.states) == {s.name for s in spec.states}
    # The head ends in the softmax of the logits.
    z = exact.logits - exact.logits.max(-1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    for i, n in enumerate(samples.lengths):
        np.testing.assert_allclose(soft[i, :n], exact.probabilities[i, :n], atol=1e-12)


def test_a_wrong_reference_is_an_error_not_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("LSTM", "relu")
    samples = _frames()
    spec, keras_out, exact, local = _local(model, samples.x, samples.lengths)
    assess(keras_out, exact, samples.lengths, local)  # the right arithmetic passes
    cell = float64._cell

    def no_recurrence(layer, x, states):  # type: ignore[no-untyped-def]
        return cell(layer, x, [np.zeros_like(s) for s in states])

    monkeypatch.setattr(float64, "_cell", no_recurrence)
    exact = forward(spec, samples.x, samples.lengths)
    rows, before = local_rows(samples.x, samples.lengths, exact)
    local = Local(rows, before, step(spec, rows, before), local.keras)
    with pytest.raises(ExportError, match="does not reproduce"):
        assess(keras_out, exact, samples.lengths, local)


def test_criterion_margin_and_floors() -> None:
    def parity(keras: Distance, graph: Distance) -> Parity:
        return Parity(keras, {"step": graph}, Distance(1e-7, 1e-7, 1e-7), {}, {"step": 0}, 1, 0)

    unstable = Distance(1.0, 2e-4)  # whole runs: 16 x Keras's distance
    assert parity(unstable, Distance(1.0, 3.1e-3)).failures() == []
    assert parity(unstable, Distance(1.0, 3.3e-3)).failures() == ["step"]
    stable = Distance(1e-8, 1e-8)  # Keras closer than the floors: the floors apply
    assert parity(stable, Distance(9e-6, 9e-6)).failures() == []
    assert parity(stable, Distance(2e-5, 1e-8)).failures() == ["step"]
    assert parity(stable, Distance(1e-8, 2e-5)).failures() == ["step"]
    assert parity(stable, Distance(float("inf"), 0.0)).failures() == ["step"]
    keras_one = Distance(1e-7, 1e-7, 3e-6)  # one step: 4 x Keras's distance
    for states, failures in ((1.1e-5, []), (1.3e-5, ["step_one"])):
        one = Parity(stable, {}, keras_one, {"step_one": Distance(0, 0, states)}, {}, 1, 0)
        assert one.failures() == failures  # max(4 x 3e-6, 1e-5) = 1.2e-5


def test_logits_graph_is_the_served_graph_without_its_softmax(
    window_models: dict[int, WindowModel],
) -> None:
    directory = window_models[SEED_WINDOW].directory
    meta = _meta(directory)
    states = [State(s["name"], s["layer"], s["kind"], s["size"]) for s in meta["states"]]
    frames = np.random.default_rng(0).standard_normal((2, 7, FEATURES)).astype(np.float32)
    for key in ("sequence", "step"):
        graph = (directory / f"{key}.onnx").read_bytes()
        served, logits = Runner(graph, states), Runner(logits_graph(graph, PROBABILITIES), states)
        feed = frames if key == "sequence" else frames[:, 0]
        p, _ = served(feed, served.zeros(2))
        z, _ = logits(feed, logits.zeros(2))
        soft = np.exp(z - z.max(-1, keepdims=True))
        np.testing.assert_allclose(soft / soft.sum(-1, keepdims=True), p, atol=1e-6)
        assert np.max(np.abs(z - p)) > 1e-3  # it really is a different output
    with pytest.raises(ValueError, match="expected one Softmax"):
        logits_graph(graph, "lstm_h_out")


@pytest.fixture(scope="module")
def sigma_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The issue's case: seed architecture, every weight N(0, 0.3^2), .keras and .h5, converted
    with the defaults (window 5 detected)."""
    root = tmp_path_factory.mktemp("sigma")
    model = sigma_seed_model()
    out = {}
    for suffix in ("keras", "h5"):
        source = root / f"sigma.{suffix}"
        model.save(source)
        out[suffix] = source
        assert main(["convert", str(source), "-o", str(root / f"out_{suffix}")]) == 0
        out[f"out_{suffix}"] = root / f"out_{suffix}"
    return out


def test_unstable_seed_architecture_is_written_with_a_recorded_warning(
    sigma_export: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    for suffix in ("keras", "h5"):
        meta = _meta(sigma_export[f"out_{suffix}"])
        assert meta["window"] == SEED_WINDOW
        numerics = meta["numerics"]
        assert numerics["stable"] is False
        keras_far = numerics["keras_float64"]
        assert keras_far["probabilities"] > 1e-5  # Keras itself is not within the tolerance
        warning = numerics["warning"]
        assert "numerically unstable" in warning and "float32 Keras itself differs" in warning
        assert "lstm_1" in warning and "dense_2" in warning  # the layers, with their values
        assert "--strict" in warning
        parity = meta["parity"]["float64"]
        assert parity["keras"] == keras_far
        for mode in ("sequence", "step", "sequence_t1", "batched_step", "chunked"):
            assert 0 < parity[mode]["probabilities"] <= meta["parity"]["allowed"]["probabilities"]
            assert 0 < parity[mode]["logits"] <= meta["parity"]["allowed"]["logits"]
        assert main(["inspect", str(sigma_export[f"out_{suffix}"])]) == 0
        assert "numerics: UNSTABLE: no layer reaches 1e+04" in capsys.readouterr().out


def test_strict_refuses_the_unstable_model(
    sigma_export: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "strict"
    assert main(["convert", str(sigma_export["h5"]), "-o", str(out), "--strict"]) == 2
    assert "refused: --strict" in caplog.text and "numerically unstable" in caplog.text
    assert not out.exists()


def test_exploding_stream_names_the_first_exploding_layer(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            L.LSTM(8, activation="relu", return_sequences=True, name="calm"),
            L.SimpleRNN(8, activation="relu", name="wild"),
            L.Dense(3, activation="softmax", name="out"),
        ]
    )
    weights = model.get_weights()
    weights[4] = 1.6 * np.eye(8, dtype=np.float32)  # h grows ~1.6x per frame: 1.6^24 ~ 8e4
    model.set_weights(weights)
    source = tmp_path / "m.keras"
    model.save(source)
    meta = export(model, tmp_path / "out", source=source, name="m")
    numerics = meta["numerics"]
    assert numerics["peaks"]["calm"] < MAGNITUDE_LIMIT <= numerics["peaks"]["wild"]
    assert numerics["exploding"][0] == "wild"  # and "out", fed by it
    assert "values explode from layer 'wild' on" in numerics["warning"]
    assert "calm" not in numerics["exploding"]


def _corrupt(graph: bytes, features: int, delta: float, pick: int = 0) -> bytes:
    """One weight of the first layer's input kernel (the initializer with a `features`-long
    dimension) moved by `delta`; `pick` chooses among 16 evenly spaced weights."""
    model = onnx.load_from_string(graph)
    kernels = [i for i in model.graph.initializer if len(i.dims) >= 2 and features in i.dims]
    item = max(kernels, key=lambda i: int(np.prod(i.dims)))
    values = numpy_helper.to_array(item).copy()
    values.flat[np.linspace(0, values.size - 1, 16).astype(int)[pick]] += delta
    item.CopyFrom(numpy_helper.from_array(values, item.name))
    return model.SerializeToString()


@dataclass
class _Judge:
    """check() on a model's parity samples with the graphs of a directory, replaceable."""

    spec: ModelSpec
    x: np.ndarray
    lengths: np.ndarray
    keras: KerasOutputs
    exact: Trace
    local: Local
    graphs: dict[str, bytes]

    def __call__(self, **replace: bytes) -> Parity:
        graphs = {**self.graphs, **replace}
        states = self.spec.states
        return check(graphs, states, self.x, self.lengths, self.keras, self.exact, self.local)

    def material(self, key: str, delta: float) -> bytes:
        """A corruption of graph `key` that really changes what it computes: its next states
        move by more than 1e-3 of their size on some parity row (a weight of a unit that relu
        keeps at zero would change nothing, and no check could tell)."""
        graph, states = self.graphs[key], self.spec.states
        frames = self.local.frames[:, None] if key == "sequence" else self.local.frames
        good = Runner(graph, states)(frames, self.local.states)[1]
        for pick in range(16):
            bad = _corrupt(graph, self.spec.features, delta, pick)
            moved = Runner(bad, states)(frames, self.local.states)[1]
            change = max(
                float(np.max(np.abs(moved[k] - v) / np.maximum(1, np.abs(v).max(-1)[:, None])))
                for k, v in good.items()
            )
            if change > 1e-3:
                return bad
        raise AssertionError("no weight of the first kernel changes the graph materially")


def _judge(model: keras.Model, directory: Path, window: int | None) -> _Judge:
    spec = describe(model)
    samples = _synthetic(spec, steps=24)
    x, lengths = samples.x, samples.lengths
    if window is not None:
        x, lengths = cut(x, lengths, window, 40)
    _, keras_out, exact, local = _local(model, x, lengths)
    graphs = {key: (directory / f"{key}.onnx").read_bytes() for key in ("sequence", "step")}
    return _Judge(spec, x, lengths, keras_out, exact, local, graphs)


def test_corrupted_graphs_are_refused_stable_or_not(
    window_models: dict[int, WindowModel], sigma_export: dict[str, Path]
) -> None:
    stable = window_models[SEED_WINDOW]
    sigma = keras.saving.load_model(sigma_export["keras"], compile=False)
    cases = {
        "stable window model": (stable.model, stable.directory, SEED_WINDOW),
        "unstable window model": (sigma, sigma_export["out_keras"], SEED_WINDOW),
        # Whole 24-frame streams of the same model are chaotic: Keras's own logits are O(1) of
        # their size from float64, so only the one-step distances can see the wrong weight.
        "chaotic stream": (sigma, sigma_export["out_keras"], None),
    }
    for name, (model, directory, window) in cases.items():
        judge = _judge(model, directory, window)
        parity = judge()  # the written graphs pass
        if name == "chaotic stream":
            assert parity.keras.logits > 0.5
        for key in ("sequence", "step"):
            with pytest.raises(ParityError, match="materially further") as caught:
                judge(**{key: judge.material(key, 0.05)})
            assert f"{key}_one" in str(caught.value), name


def test_export_with_a_corrupted_graph_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model("LSTM", "tanh")
    source = tmp_path / "m.keras"
    model.save(source)
    build = pipeline.build_graphs

    def corrupted(spec, opset=pipeline.OPSET):  # type: ignore[no-untyped-def]
        graphs = build(spec, opset)
        return {**graphs, "step": _corrupt(graphs["step"], 3, 0.5)}

    monkeypatch.setattr(pipeline, "build_graphs", corrupted)
    with pytest.raises(ParityError, match="step"):
        export(model, tmp_path / "out", source=source, name="m")
    assert not (tmp_path / "out").exists()


def test_keras_overflowing_float32_is_refused(tmp_path: Path) -> None:
    model = _model("SimpleRNN", "relu")
    model.set_weights([w * 1e4 for w in model.get_weights()])
    source = tmp_path / "m.keras"
    model.save(source)
    with pytest.raises(ExportError, match="overflows float32"):
        export(model, tmp_path / "out", source=source, name="m", samples=_frames(steps=24))
    assert not (tmp_path / "out").exists()
