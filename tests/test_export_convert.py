"""Conversion of Keras recurrent stacks to the seqserve model directory (models/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqserve.export.cli import main  # noqa: E402
from seqserve.export.pipeline import Samples, export  # noqa: E402
from seqserve.export.reference import keras_per_step  # noqa: E402
from seqserve.export.runner import Runner  # noqa: E402
from seqserve.export.spec import State, describe  # noqa: E402

pytestmark = pytest.mark.export

TOL = 1e-5
FEATURES = 3


def _stack(
    cell: str,
    activation: str,
    *,
    units: tuple[int, ...] = (6, 5),
    classes: int = 3,
    masking: bool = False,
    seed: int = 0,
    **kwargs: object,
) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers: list[keras.Layer] = [keras.Input((None, FEATURES))]
    if masking:
        layers.append(keras.layers.Masking(0.0))
    layers.append(keras.layers.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0]))
    layer = getattr(keras.layers, cell)
    for i, n in enumerate(units):
        layers.append(
            layer(n, activation=activation, return_sequences=i < len(units) - 1, **kwargs)
        )
    layers += [
        keras.layers.Dropout(0.3),
        keras.layers.Dense(4, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ]
    return keras.Sequential(layers)


def _samples(count: int = 4, steps: int = 12, *, variable: bool = False, seed: int = 1) -> Samples:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((count, steps, FEATURES)) * [2.0, 0.5, 1.0] + [0.5, -1, 2]).astype(
        np.float32
    )
    lengths = rng.integers(2, steps + 1, count) if variable else np.full(count, steps)
    lengths[0] = steps
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    return Samples(x, lengths.astype(np.int64), np.zeros(count, np.int64), "test")


def _export(model: keras.Model, out: Path, samples: Samples | None = None) -> dict:
    source = out.parent / f"{out.name}.keras"
    model.save(source)
    return export(model, out, source=source, name=out.name, samples=samples or _samples())


def _runners(out: Path) -> tuple[Runner, Runner, list[State]]:
    meta = json.loads((out / "model.json").read_text())
    states = [State(s["name"], s["layer"], s["kind"], s["size"]) for s in meta["states"]]
    for state, entry in zip(states, meta["states"], strict=True):
        assert (state.input, state.output) == (entry["input"], entry["output"])
    return (
        Runner((out / "sequence.onnx").read_bytes(), states),
        Runner((out / "step.onnx").read_bytes(), states),
        states,
    )


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(path).graph.node}


def _check_directory(out: Path, meta: dict) -> None:
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "reference.npz",
        "samples.npz",
        "sequence.onnx",
        "step.onnx",
    ]
    for key in ("sequence", "step"):
        model = onnx.load(out / f"{key}.onnx")
        assert model.ir_version <= 10
        assert {o.domain: o.version for o in model.opset_import}[""] == meta["opset"] == 17
        names_in = [i.name for i in model.graph.input]
        names_out = [o.name for o in model.graph.output]
        assert names_in == ["frames"] + [s["input"] for s in meta["states"]]
        assert names_out == ["probabilities"] + [s["output"] for s in meta["states"]]
    parity = meta["parity"]
    for key in ("sequence_max_abs", "step_max_abs", "chunked_max_abs", "sequence_t1_max_abs"):
        assert parity[key] <= TOL
    with np.load(out / "reference.npz") as ref:
        assert ref["probabilities"].shape[:2] == ref["x"].shape[:2]


def test_seed_architecture_counts_and_exports(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5, 126)),
            keras.layers.LSTM(64, return_sequences=True, activation="relu", name="lstm"),
            keras.layers.LSTM(128, return_sequences=True, activation="relu", name="lstm_1"),
            keras.layers.LSTM(64, activation="relu", name="lstm_2"),
            keras.layers.Dense(64, activation="relu", name="dense"),
            keras.layers.Dense(32, activation="relu", name="dense_1"),
            keras.layers.Dense(10, activation="softmax", name="dense_2"),
        ]
    )
    spec = describe(model)
    assert [layer.params for layer in spec.recurrent] == [48_896, 98_816, 49_408]
    assert [layer.params for layer in spec.head] == [4_160, 2_080, 330]
    assert spec.parameters == model.count_params() == 203_690
    assert [s.name for s in spec.states] == [
        "lstm_h",
        "lstm_c",
        "lstm_1_h",
        "lstm_1_c",
        "lstm_2_h",
        "lstm_2_c",
    ]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 126)).astype(np.float32)
    samples = Samples(x, np.full(3, 5, np.int64), np.zeros(3, np.int64), "random")
    meta = _export(model, tmp_path / "seed", samples)
    _check_directory(tmp_path / "seed", meta)
    assert meta["layers"][0] == {
        "name": "lstm",
        "type": "LSTM",
        "units": 64,
        "input_size": 126,
        "activation": "relu",
        "recurrent_activation": "sigmoid",
        "params": 48_896,
        "states": ["lstm_h", "lstm_c"],
    }
    assert meta["layers"][3]["params"] == 4_160
    assert meta["parameters"] == 203_690
    assert "LSTM" in _ops(tmp_path / "seed" / "sequence.onnx")
    step_ops = _ops(tmp_path / "seed" / "step.onnx")
    assert not step_ops & {"LSTM", "GRU", "RNN", "Loop", "Scan"}
    assert {"MatMul", "Sigmoid", "Relu", "Softmax"} <= step_ops
    # The fixed time dimension of the Keras input does not leak into the graphs.
    sequence, _, _ = _runners(tmp_path / "seed")
    probabilities, _ = sequence(rng.standard_normal((2, 9, 126)), sequence.zeros(2))
    assert probabilities.shape == (2, 9, 10)


@pytest.mark.parametrize(
    ("cell", "activation", "kwargs"),
    [
        ("LSTM", "tanh", {}),
        ("LSTM", "relu", {}),
        ("GRU", "tanh", {}),
        ("GRU", "relu", {"reset_after": False}),
        ("SimpleRNN", "tanh", {}),
        ("SimpleRNN", "relu", {}),
    ],
)
def test_recurrent_kinds_have_parity(
    tmp_path: Path, cell: str, activation: str, kwargs: dict
) -> None:
    model = _stack(cell, activation, **kwargs)
    out = tmp_path / "m"
    meta = _export(model, out)
    _check_directory(out, meta)
    assert [layer["type"] for layer in meta["layers"][:2]] == [cell, cell]
    assert all(layer["activation"] == activation for layer in meta["layers"][:2])
    kinds = ["h", "c"] if cell == "LSTM" else ["h"]
    assert [s["kind"] for s in meta["states"]] == kinds * 2
    if cell == "LSTM":
        assert "LSTM" in _ops(out / "sequence.onnx")
    assert not _ops(out / "step.onnx") & {"LSTM", "GRU", "RNN", "Loop", "Scan"}
    # Independent check: a batch of sessions stepped together matches Keras per step.
    samples = _samples(count=5, steps=9, seed=7)
    expected = keras_per_step(model, samples.x, samples.lengths)
    _, step, _ = _runners(out)
    assert np.max(np.abs(step.stepped(samples.x) - expected)) <= TOL


def test_keras_and_h5_files_convert_through_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = _stack("LSTM", "relu")
    results = {}
    for suffix in ("keras", "h5"):
        source = tmp_path / f"model.{suffix}"
        model.save(source)
        out = tmp_path / f"out_{suffix}"
        assert (
            main(
                [
                    "convert",
                    str(source),
                    "-o",
                    str(out),
                    "--name",
                    "demo",
                    "--version",
                    "7",
                    "--labels",
                    "a,b,c",
                ]
            )
            == 0
        )
        meta = json.loads((out / "model.json").read_text())
        _check_directory(out, meta)
        assert (meta["name"], meta["version"], meta["labels"]) == ("demo", "7", ["a", "b", "c"])
        assert meta["source"]["file"] == source.name
        assert meta["format"] == "seqserve-model/1"
        assert meta["normalization"]["in_graph"] is True
        assert meta["normalization"]["std"] == pytest.approx([2.0, 0.5, 1.0])
        import hashlib

        for key in ("sequence", "step"):
            data = (out / f"{key}.onnx").read_bytes()
            assert meta["graphs"][key]["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        sequence, _, _ = _runners(out)
        with np.load(out / "samples.npz") as data:
            x = data["x"][:1, : int(data["lengths"][0])]
        results[suffix] = sequence(x, sequence.zeros(1))[0]
    np.testing.assert_allclose(results["keras"], results["h5"], atol=1e-6)
    assert "wrote" in capsys.readouterr().out


def test_variable_length_with_masking(tmp_path: Path) -> None:
    model = _stack("LSTM", "relu", masking=True)
    samples = _samples(count=6, steps=15, variable=True)
    out = tmp_path / "vl"
    meta = _export(model, out, samples)
    _check_directory(out, meta)
    with np.load(out / "reference.npz") as ref:
        probabilities, lengths, x = ref["probabilities"], ref["lengths"], ref["x"]
    assert len(set(lengths.tolist())) > 1
    _, step, _ = _runners(out)
    # Each recording, unpadded, streamed; Keras on the padded batch (masked) agrees at the end.
    padded = np.asarray(model(x))
    for i, n in enumerate(lengths):
        assert np.all(probabilities[i, n:] == 0)
        streamed = step.stepped(x[i : i + 1, :n])[0]
        assert np.max(np.abs(streamed - probabilities[i, :n])) <= TOL
        assert np.max(np.abs(streamed[-1] - padded[i])) <= TOL


@pytest.fixture(scope="module")
def chunk_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    model = _stack("LSTM", "relu", units=(5, 4, 3), seed=3)
    samples = _samples(count=2, steps=30, seed=5)
    out = tmp_path_factory.mktemp("chunks") / "m"
    _export(model, out, samples)
    expected = keras_per_step(model, samples.x, samples.lengths)
    return out, samples.x, expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, 29), max_size=10), batch=st.sampled_from([1, 2]))
def test_random_chunkings_carry_state(
    chunk_model: tuple[Path, np.ndarray, np.ndarray], cuts: list[int], batch: int
) -> None:
    out, x, expected = chunk_model
    sequence, _, _ = _runners(out)
    got = sequence.chunked(x[:batch], cuts)
    assert got.shape == expected[:batch].shape
    assert np.max(np.abs(got - expected[:batch])) <= TOL


def test_states_pair_by_name_not_position(chunk_model: tuple[Path, np.ndarray, np.ndarray]) -> None:
    out, x, expected = chunk_model
    _, step, states = _runners(out)
    # Feed inputs in reversed dict order: onnxruntime binds by name, so results do not change.
    state = {s.name: np.zeros((1, s.size), np.float32) for s in reversed(states)}
    for t in range(x.shape[1]):
        probabilities, state = step(x[:1, t], state)
        assert np.max(np.abs(probabilities - expected[0, t])) <= TOL
    # Swapping two same-sized states gives a different (wrong) answer, so names matter.
    lstm = [s for s in states if s.layer == states[0].layer]
    h, c = lstm[0].name, lstm[1].name
    state = step.zeros(1)
    for t in range(5):
        _, state = step(x[:1, t], state)
    _, good = step(x[:1, 5], state)
    _, bad = step(x[:1, 5], {**state, h: state[c], c: state[h]})
    assert np.max(np.abs(good[h] - bad[h])) > 1e-3


def test_inspect_keras_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _stack("GRU", "tanh")
    meta = _export(model, tmp_path / "g")
    assert main(["inspect", str(tmp_path / "g.keras")]) == 0
    from_file = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "g")]) == 0
    from_dir = capsys.readouterr().out
    # GRU(6) on 3 features, reset_after: 3*6*(6+3+1) + 3*6 = 198.
    for text in (from_file, from_dir):
        assert "GRU" in text and "198" in text and "_h[6]" in text
        assert f"total parameters: {meta['parameters']:,}" in text
    # The same table and serving line; a directory adds what its export measured.
    file_lines, dir_lines = from_file.splitlines(), from_dir.splitlines()
    assert file_lines[1:] == dir_lines[1 : len(file_lines)]
    assert file_lines[-1].startswith("serving: stateful stream")
    assert dir_lines[len(file_lines) :] == [dir_lines[-1]]
    assert dir_lines[-1].startswith("numerics: stable (largest values")


def test_inspect_rejects_wrong_parameter_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _export(_stack("LSTM", "tanh"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["layers"][0]["params"] += 1
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert "formula gives" in caplog.text


def test_keras2_savedmodel_directory_converts(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parent / "export_fixtures"
    source = fixtures / "keras2_savedmodel"
    out = tmp_path / "sm"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    _check_directory(out, meta)
    assert [layer["type"] for layer in meta["layers"]] == ["LSTM", "GRU", "Dense", "Dense"]
    assert meta["source"]["file"] == "keras2_savedmodel"
    with np.load(fixtures / "keras2_savedmodel_expected.npz") as data:
        x, expected = data["x"], data["probabilities"]
    sequence, step, _ = _runners(out)
    # The tf.keras 2 model's own outputs (saved when the fixture was made) are reproduced.
    assert np.max(np.abs(sequence(x, sequence.zeros(2))[0][:, -1] - expected)) <= TOL
    assert np.max(np.abs(step.stepped(x)[:, -1] - expected)) <= TOL
