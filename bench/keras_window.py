"""The tutorial pattern, timed: after every new frame, Keras ``model.predict`` on the sliding window
of the last ``--window`` frames. Needs TensorFlow (``seqserve[export]``); the suite runs it as a
subprocess and reads the JSON line it prints.

    python -P bench/keras_window.py [--model-dir DIR] [--steps 50] [--window 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "basicmotions")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    import keras
    import tensorflow as tf

    model = keras.models.load_model(args.model_dir / "model.keras", compile=False)
    loaded = time.perf_counter() - started
    with np.load(args.model_dir / "samples.npz") as data:
        stream = np.concatenate(list(data["x"])).astype(np.float32)  # recordings back to back
    latencies = []
    for t in range(args.warmup + args.steps):
        end = args.window + t  # the newest frame has just arrived
        window = stream[end - args.window : end][None]
        step_started = time.perf_counter()
        model.predict(window, verbose=0)
        if t >= args.warmup:
            latencies.append(time.perf_counter() - step_started)
    print(
        json.dumps(
            {
                "latencies_s": latencies,
                "window": args.window,
                "load_s": loaded,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
