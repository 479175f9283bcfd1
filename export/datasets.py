"""UEA datasets from aeon (bundled, offline), as zero-padded (n, time, channels) float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DATASETS", "Dataset", "Split", "load"]


@dataclass(frozen=True)
class Split:
    """x [n, T, F] float32 zero-padded, lengths [n], y [n] class indices; raw = aeon's format."""

    x: np.ndarray
    lengths: np.ndarray
    y: np.ndarray
    raw: Any


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: list[str]
    train: Split
    test: Split

    @property
    def features(self) -> int:
        return int(self.train.x.shape[-1])

    @property
    def variable_length(self) -> bool:
        return bool(len(set(self.train.lengths.tolist() + self.test.lengths.tolist())) > 1)


def _loaders() -> dict[str, tuple[str, Callable[..., Any]]]:
    from aeon.datasets import load_basic_motions, load_japanese_vowels

    return {
        "basicmotions": ("BasicMotions", load_basic_motions),
        "japanesevowels": ("JapaneseVowels", load_japanese_vowels),
    }


DATASETS = ("basicmotions", "japanesevowels")


def _split(raw: Any, labels: np.ndarray, index: dict[str, int]) -> Split:
    series = [np.asarray(item, dtype=np.float32).T for item in raw]  # (channels, T) -> (T, F)
    lengths = np.array([len(s) for s in series], np.int64)
    x = np.zeros((len(series), int(lengths.max()), series[0].shape[1]), np.float32)
    for i, s in enumerate(series):
        x[i, : len(s)] = s
    y = np.array([index[str(v)] for v in labels], np.int64)
    return Split(x, lengths, y, raw)


def _sort_key(label: str) -> tuple[int, str]:
    return (int(label), "") if label.isdigit() else (0, label)


def load(key: str) -> Dataset:
    """The official TRAIN/TEST split of `key` (one of `DATASETS`)."""
    name, loader = _loaders()[key]
    x_train, y_train = loader(split="train")
    x_test, y_test = loader(split="test")
    labels = sorted({str(v) for v in y_train}, key=_sort_key)
    index = {label: i for i, label in enumerate(labels)}
    return Dataset(name, labels, _split(x_train, y_train, index), _split(x_test, y_test, index))
