"""Regenerate keras2_savedmodel/ (a tf.keras 2 SavedModel) and its expected outputs.

Not run by the tests. Needs tf_keras matching the installed TensorFlow, e.g.
`pip install --no-deps --target /tmp/tfk tf_keras==2.21.0` then
`PYTHONPATH=/tmp/tfk python tests/export_fixtures/make_keras2_savedmodel.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tf_keras as k2

HERE = Path(__file__).resolve().parent


def main() -> None:
    k2.utils.set_random_seed(0)
    model = k2.Sequential(
        [
            k2.Input((None, 3)),
            k2.layers.Masking(0.0),
            k2.layers.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0]),
            k2.layers.LSTM(5, return_sequences=True, activation="relu"),
            k2.layers.GRU(4),
            k2.layers.Dropout(0.2),
            k2.layers.Dense(4, activation="relu"),
            k2.layers.Dense(3, activation="softmax"),
        ]
    )
    model.save(HERE / "keras2_savedmodel", save_format="tf", save_traces=False)
    x = np.random.default_rng(0).standard_normal((2, 6, 3)).astype("float32")
    np.savez(HERE / "keras2_savedmodel_expected.npz", x=x, probabilities=model(x).numpy())


if __name__ == "__main__":
    main()
