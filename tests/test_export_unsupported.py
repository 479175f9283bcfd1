"""Models a stateful stream cannot reproduce are refused by name, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")

from seqserve.export.cli import main  # noqa: E402
from seqserve.export.errors import UnsupportedModelError  # noqa: E402
from seqserve.export.pipeline import export  # noqa: E402
from seqserve.export.spec import describe  # noqa: E402

pytestmark = pytest.mark.export

L = keras.layers


def _seq(*layers: keras.Layer, batch: int | None = None) -> keras.Model:
    first = keras.Input(batch_shape=(batch, None, 3)) if batch else keras.Input((None, 3))
    return keras.Sequential([first, *layers])


def _head() -> list[keras.Layer]:
    return [L.Dense(2, activation="softmax")]


def _attention() -> keras.Model:
    x = keras.Input((None, 3))
    attended = L.MultiHeadAttention(num_heads=1, key_dim=2, name="mha")(x, x)
    h = L.LSTM(4)(attended)
    return keras.Model(x, L.Dense(2, activation="softmax")(h))


CASES = {
    "bidirectional": (
        lambda: _seq(L.Bidirectional(L.LSTM(4), name="bi"), *_head()),
        "bi",
        "future frames",
    ),
    "go_backwards": (
        lambda: _seq(L.LSTM(4, go_backwards=True, name="back"), *_head()),
        "back",
        "go_backwards",
    ),
    "attention": (_attention, "mha", "attention"),
    "conv1d": (
        lambda: _seq(L.Conv1D(4, 3, name="conv"), L.LSTM(4), *_head()),
        "conv",
        "convolution",
    ),
    "collapsed_middle": (
        lambda: _seq(L.LSTM(4, name="mid"), L.RepeatVector(5), L.LSTM(4), *_head()),
        "mid",
        "return_sequences=False in the middle",
    ),
    "stateful": (
        lambda: _seq(L.LSTM(4, stateful=True, name="st"), *_head(), batch=2),
        "st",
        "stateful=True",
    ),
    "masking_in_middle": (
        lambda: _seq(
            L.LSTM(4, return_sequences=True), L.Masking(0.0, name="mask"), L.LSTM(4), *_head()
        ),
        "mask",
        "Masking in the middle",
    ),
    "pooling": (
        lambda: _seq(
            L.LSTM(4, return_sequences=True), L.GlobalAveragePooling1D(name="pool"), *_head()
        ),
        "pool",
        "pooling over time",
    ),
    "time_distributed": (
        lambda: _seq(
            L.LSTM(4, return_sequences=True), L.TimeDistributed(L.Dense(2), name="td"), *_head()
        ),
        "td",
        "TimeDistributed",
    ),
    "no_softmax": (lambda: _seq(L.LSTM(4), L.Dense(2, name="logits")), "logits", "softmax"),
    "no_recurrent": (
        lambda: _seq(L.Dense(2, activation="softmax", name="only")),
        "only",
        "before the first recurrent layer",
    ),
    "recurrent_after_head": (
        lambda: _seq(L.LSTM(4, return_sequences=True), L.Dense(3), L.GRU(2, name="late"), *_head()),
        "late",
        "after the Dense head",
    ),
    "unknown_activation": (
        lambda: _seq(L.LSTM(4, activation="gelu", name="odd"), *_head()),
        "odd",
        "activation='gelu'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_layer_name_and_reason(case: str, tmp_path: Path) -> None:
    build, layer, reason = CASES[case]
    model = build()
    with pytest.raises(UnsupportedModelError) as info:
        describe(model)
    assert info.value.layer == layer
    assert reason in str(info.value)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModelError):
        export(model, out, source=tmp_path / "none.keras", name="x")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_refusal_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "bi.keras"
    _seq(L.Bidirectional(L.LSTM(4), name="bi"), *_head()).save(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), "-o", str(out)]) == 2
    assert "layer 'bi': Bidirectional" in caplog.text
    assert not out.exists()


def test_unroll_and_dropout_are_fine() -> None:
    model = keras.Sequential(
        [
            keras.Input((7, 3)),
            L.Dropout(0.5),
            L.LSTM(4, unroll=True, dropout=0.2, recurrent_dropout=0.1),
            L.Dropout(0.5),
            *_head(),
        ]
    )
    spec = describe(model)
    assert spec.recurrent[0].units == 4
    assert np.isfinite(spec.recurrent[0].kernel).all()


def test_savedmodel_without_keras_metadata_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _seq(L.LSTM(4), *_head())
    model.export(tmp_path / "sm", verbose=False)
    assert main(["convert", str(tmp_path / "sm"), "-o", str(tmp_path / "out")]) == 2
    assert "keras_metadata.pb" in caplog.text
    assert not (tmp_path / "out").exists()
