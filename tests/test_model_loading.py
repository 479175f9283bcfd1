"""Model loading stays inside the configured model directory."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from seqserve.server.errors import ModelError
from seqserve.server.model import load_model_spec
from seqserve.server.runtime import Runtime


def _with_external_data(model_dir: Path, target: Path, location: str) -> Path:
    """A copy of the model whose step graph keeps its weights in the file ``location``."""
    shutil.copytree(model_dir, target)
    graph = onnx.load(str(target / "step.onnx"))
    external_data_helper.convert_model_to_external_data(
        graph, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    onnx.save(graph, str(target / "step.onnx"))  # writes weights.bin beside it
    if location != "weights.bin":
        (target / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(target / "weights.bin", target / location)
        graph = onnx.load(str(target / "step.onnx"), load_external_data=False)
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(graph, str(target / "step.onnx"))
    meta = json.loads((target / "model.json").read_text())
    meta["graphs"]["step"]["sha256"] = hashlib.sha256(
        (target / "step.onnx").read_bytes()
    ).hexdigest()
    (target / "model.json").write_text(json.dumps(meta))
    return target


def test_external_data_inside_the_model_directory_loads(model_dir, tmp_path):
    target = _with_external_data(model_dir, tmp_path / "m", "weights.bin")
    runtime = Runtime(load_model_spec(target))
    reference = Runtime(load_model_spec(model_dir))
    frames = np.ones((2, 6), np.float32)
    got, _ = runtime.step(frames, runtime.zero_states(2))
    want, _ = reference.step(frames, reference.zero_states(2))
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/seqserve-outside.bin"])
def test_external_data_outside_the_model_directory_is_refused(model_dir, tmp_path, location):
    if location.startswith("/"):
        location = str(tmp_path / "elsewhere" / "outside.bin")
    target = _with_external_data(model_dir, tmp_path / "m", location)
    with pytest.raises(ModelError, match="outside the model directory"):
        load_model_spec(target)


def test_a_graph_that_is_not_onnx_is_refused(model_dir, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    (target / "step.onnx").write_bytes(b"\x08\x07garbage that is not a model")
    meta = json.loads((target / "model.json").read_text())
    del meta["graphs"]["step"]["sha256"]
    (target / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"step\.onnx"):
        Runtime(load_model_spec(target))
