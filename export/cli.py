"""`seqserve-export`: train the seed classifier, convert Keras models, inspect either."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

_log = logging.getLogger("seqserve.export")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve-export", description="Export stacked recurrent Keras classifiers to ONNX."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the seed model on a UEA dataset and export it")
    train.add_argument(
        "--dataset", choices=("basicmotions", "japanesevowels"), default="basicmotions"
    )
    train.add_argument("-o", "--output", type=Path, help="model directory (default models/NAME)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--epochs", type=int, help="default: 200 (basicmotions), 150 (japanesevowels)"
    )
    train.add_argument("--cell", choices=("LSTM", "GRU", "SimpleRNN"), default="LSTM")
    train.add_argument("--units", default="64,128,64", help="recurrent units, comma-separated")
    train.add_argument("--dense", default="64,32", help="hidden Dense units, comma-separated")
    train.add_argument("--activation", default="relu")
    train.add_argument("--learning-rate", type=float, default=3e-3)
    train.add_argument("--version", default="1")

    convert = sub.add_parser("convert", help="convert a .keras / .h5 / SavedModel to a model dir")
    convert.add_argument("model", type=Path)
    convert.add_argument("-o", "--output", type=Path, required=True)
    convert.add_argument("--name", help="model name (default: output folder name)")
    convert.add_argument("--version", default="1")
    convert.add_argument("--labels", help="class labels, comma-separated")
    convert.add_argument(
        "--samples",
        type=Path,
        help="npz with x [n,T,F], lengths [n], y [n] raw recordings for parity "
        "and samples.npz (default: synthetic frames)",
    )

    convert.add_argument(
        "--window",
        type=_window,
        default="auto",
        metavar="auto|none|T",
        help="how the server answers each frame. auto (default): a model whose input has a "
        "fixed time dimension T and whose last recurrent layer has return_sequences=False was "
        "trained on windows; it is served on the last T frames (model.json window: T). none: "
        "serve as a stateful stream (everything since the session started). T: force a window "
        "of T frames",
    )
    convert.add_argument(
        "--strict",
        action="store_true",
        help="refuse a numerically unstable model (values beyond 1e4, or float32 Keras far "
        "from float64) instead of writing it with a warning",
    )

    inspect = sub.add_parser("inspect", help="per-layer units, states and parameter counts")
    inspect.add_argument("model", type=Path, help="Keras model file or model directory")
    return parser


def _window(text: str) -> int | str:
    if text in ("auto", "none"):
        return text
    try:
        frames = int(text)
    except ValueError:
        message = f"expected auto, none or a number of frames: {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if frames < 1:
        raise argparse.ArgumentTypeError(f"a window is at least 1 frame: {text!r}")
    return frames


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from .datasets import load
    from .errors import ExportError
    from .pipeline import MAX_SAMPLES, Samples, export
    from .training import Architecture, Recipe, train

    dataset = load(args.dataset)
    arch = Architecture(
        cell=args.cell, units=_ints(args.units), dense=_ints(args.dense), activation=args.activation
    )
    epochs = args.epochs or (200 if args.dataset == "basicmotions" else 150)
    batch = 8 if args.dataset == "basicmotions" else 16
    recipe = Recipe(epochs=epochs, batch_size=batch, learning_rate=args.learning_rate)
    model, record = train(dataset, arch, recipe, args.seed)
    out = args.output or Path("models") / args.dataset
    print(
        f"{dataset.name}: train accuracy {record['train_accuracy']:.4f}, test accuracy "
        f"{record['test_accuracy']:.4f}, 1-NN DTW baseline "
        f"{record['baseline']['test_accuracy']:.4f} ({record['train_seconds']} s)"
    )
    if not record["meets_baseline"]:
        _log.warning("test accuracy is below the 1-NN DTW baseline")
    test = dataset.test
    # Evenly spaced TEST rows (the whole split when it is small), so every class shows up.
    rows = np.unique(np.linspace(0, len(test.y) - 1, min(MAX_SAMPLES, len(test.y))).astype(int))
    samples = Samples(
        test.x[rows],
        test.lengths[rows],
        test.y[rows],
        f"{dataset.name} TEST split, rows {rows.tolist()}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.keras"
        model.save(source)
        try:
            meta = export(
                model,
                out,
                source=source,
                name=args.dataset,
                version=args.version,
                labels=dataset.labels,
                samples=samples,
                training=record,
                copy_source_as="model.keras",
            )
        except ExportError:
            kept = Path(tempfile.gettempdir()) / f"seqserve-{args.dataset}-failed.keras"
            model.save(kept)
            _log.error("export failed; the trained model is kept at %s", kept)
            raise
    print(f"wrote {out} in {meta['export']['seconds']} s; parity {meta['parity']}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import numpy as np

    from .loading import load
    from .pipeline import Samples, export

    model = load(args.model)
    samples = None
    if args.samples:
        with np.load(args.samples) as data:
            samples = Samples(
                data["x"].astype(np.float32),
                data["lengths"].astype(np.int64),
                data["y"].astype(np.int64),
                f"{args.samples.name}",
            )
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    name = args.name or args.output.resolve().name
    meta = export(
        model,
        args.output,
        source=args.model,
        name=name,
        version=args.version,
        labels=labels,
        samples=samples,
        window=args.window,
        strict=args.strict,
    )
    serving = "stateful stream" if meta["window"] is None else f"window of {meta['window']} frames"
    stability = "stable" if meta["numerics"]["stable"] else "UNSTABLE (see the warning above)"
    print(
        f"wrote {args.output} in {meta['export']['seconds']} s; serving: {serving}; "
        f"numerics: {stability}; parity {meta['parity']['float64']}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_path

    print(inspect_path(args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        for noisy in ("tf2onnx", "absl", "tensorflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from .errors import ExportError

    commands = {"train": _train, "convert": _convert, "inspect": _inspect}
    try:
        return commands[args.command](args)
    except ExportError as exc:
        _log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
