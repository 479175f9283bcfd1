"""The committed model directories: consistent, reproducible by `convert`, and by `train`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("aeon")
keras = pytest.importorskip("keras")

from seqserve.export.cli import main  # noqa: E402
from seqserve.export.datasets import load  # noqa: E402
from seqserve.export.fingerprint import same_machine  # noqa: E402
from seqserve.export.runner import Runner  # noqa: E402
from seqserve.export.spec import State  # noqa: E402
from seqserve.export.training import Architecture, Recipe, accuracy, fit, train  # noqa: E402

pytestmark = pytest.mark.export

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLED = ["basicmotions", "japanesevowels"]
TOL = 1e-5


def _bundled(name: str) -> Path:
    path = MODELS / name
    if not (path / "model.json").exists():
        pytest.skip(f"{path} not exported yet")
    return path


def _meta(path: Path) -> dict:
    return json.loads((path / "model.json").read_text())


def _runners(path: Path) -> tuple[Runner, Runner]:
    states = [State(s["name"], s["layer"], s["kind"], s["size"]) for s in _meta(path)["states"]]
    return (
        Runner((path / "sequence.onnx").read_bytes(), states),
        Runner((path / "step.onnx").read_bytes(), states),
    )


@pytest.mark.parametrize("name", BUNDLED)
def test_committed_directory_is_consistent(name: str) -> None:
    path = _bundled(name)
    meta = _meta(path)
    for graph in meta["graphs"].values():
        data = (path / graph["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == graph["sha256"]
    assert meta["source"]["file"] == "model.keras"
    source = (path / "model.keras").read_bytes()
    assert hashlib.sha256(source).hexdigest() == meta["source"]["sha256"]
    assert max(v for k, v in meta["parity"].items() if k.endswith("_max_abs")) <= TOL
    training = meta["training"]
    assert training["test_accuracy"] >= training["baseline"]["test_accuracy"]
    sequence, step = _runners(path)
    with np.load(path / "reference.npz") as ref:
        x, lengths, expected = ref["x"], ref["lengths"], ref["probabilities"]
    with np.load(path / "samples.npz") as samples:
        assert samples["x"].shape[-1] == meta["features"]
        assert len(samples["y"]) == len(samples["lengths"]) <= 40
        assert samples["y"].max() < len(meta["labels"])
    for i, n in enumerate(lengths):
        streamed = step.stepped(x[i : i + 1, :n])
        whole, _ = sequence(x[i : i + 1, :n], sequence.zeros(1))
        assert np.max(np.abs(streamed - expected[i : i + 1, :n])) <= TOL
        assert np.max(np.abs(whole - expected[i : i + 1, :n])) <= TOL


@pytest.mark.parametrize("name", BUNDLED)
def test_convert_of_committed_keras_model_reproduces_graphs(name: str, tmp_path: Path) -> None:
    path = _bundled(name)
    meta = _meta(path)
    out = tmp_path / name
    assert (
        main(
            [
                "convert",
                str(path / "model.keras"),
                "-o",
                str(out),
                "--name",
                name,
                "--labels",
                ",".join(meta["labels"]),
                "--samples",
                str(path / "samples.npz"),
            ]
        )
        == 0
    )
    again = _meta(out)
    for key in ("features", "labels", "normalization", "layers", "states", "parameters", "opset"):
        assert again[key] == meta[key], key
    assert again["source"]["sha256"] == meta["source"]["sha256"]
    committed, fresh = _runners(path), _runners(out)
    with np.load(path / "samples.npz") as samples:
        x, lengths = samples["x"], samples["lengths"]
    for i, n in enumerate(lengths[:8]):
        frames = x[i : i + 1, :n]
        for old, new in zip(committed, fresh, strict=True):
            a = old.stepped(frames) if old is committed[1] else old(frames, old.zeros(1))[0]
            b = new.stepped(frames) if new is fresh[1] else new(frames, new.zeros(1))[0]
            assert np.max(np.abs(a - b)) <= 1e-6


def test_training_is_deterministic_for_a_seed() -> None:
    dataset = load("basicmotions")
    arch = Architecture(units=(8,), dense=(8,))
    recipe = Recipe(epochs=3)
    first = fit(dataset, arch, recipe, seed=3).get_weights()
    second = fit(dataset, arch, recipe, seed=3).get_weights()
    other = fit(dataset, arch, recipe, seed=4).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


# BasicMotions retrains in ~2 min on 2 cores; JapaneseVowels takes ~4 min more, so it runs
# only with SEQSERVE_EXPORT_RETRAIN_ALL=1.
_RETRAIN_ALL = os.environ.get("SEQSERVE_EXPORT_RETRAIN_ALL") == "1"

# What a retraining on another CPU kind must reproduce (measured: BasicMotions retrained with
# oneDNN capped at AVX2, at AVX-512, with AMX, and with oneDNN off all reached test accuracy 1.0
# and the committed model's 40 test predictions, weights up to 0.11 apart, test probabilities
# 0.0076-0.0085 apart in total variation on average and at most 0.23 on one recording):
_AGREEMENT = 0.95  # the committed model's predicted class on at least 95 % of the test split
_MEAN_TV = 0.05  # mean total-variation distance of test probabilities (6x the largest measured)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "epochs", "batch"),
    [
        ("basicmotions", 200, 8),
        pytest.param(
            "japanesevowels",
            150,
            16,
            marks=pytest.mark.skipif(not _RETRAIN_ALL, reason="SEQSERVE_EXPORT_RETRAIN_ALL=1"),
        ),
    ],
)
def test_training_reproduces_committed_model_and_beats_baseline(
    name: str, epochs: int, batch: int
) -> None:
    """Retraining with the recorded recipe and seed reproduces the committed model: bit for bit
    on a machine with the fingerprint recorded at training time (CPU kind, threads, library
    versions), and elsewhere as far as it carries across CPUs (TensorFlow's kernels sum in an
    order chosen by instruction set, and 200 epochs amplify the last bits): at least the
    recorded accuracy and the 1-NN DTW baseline, and the committed model's test predictions."""
    path = _bundled(name)
    meta = _meta(path)
    dataset = load(name)
    model, record = train(dataset, Architecture(), Recipe(epochs=epochs, batch_size=batch), seed=0)
    committed = keras.saving.load_model(path / "model.keras", compile=False)
    assert accuracy(committed, dataset.test) == meta["training"]["test_accuracy"]
    assert record["test_accuracy"] >= record["baseline"]["test_accuracy"]
    if same_machine(meta["training"].get("machine")):
        assert record["test_accuracy"] == meta["training"]["test_accuracy"]
        for a, b in zip(model.get_weights(), committed.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        return
    assert record["test_accuracy"] >= meta["training"]["test_accuracy"]
    ours = np.asarray(model.predict(dataset.test.x, verbose=0, batch_size=64))
    theirs = np.asarray(committed.predict(dataset.test.x, verbose=0, batch_size=64))
    agreement = float(np.mean(ours.argmax(axis=-1) == theirs.argmax(axis=-1)))
    assert agreement >= _AGREEMENT, agreement
    mean_tv = float(np.mean(0.5 * np.abs(ours - theirs).sum(axis=-1)))
    assert mean_tv <= _MEAN_TV, mean_tv
