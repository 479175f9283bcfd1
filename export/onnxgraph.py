"""tf.function -> ONNX with exact graph I/O names, an explicit opset and a portable IR version."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from onnx import numpy_helper

__all__ = ["IR_VERSION", "OPSET", "logits_graph", "restore_division", "to_onnx"]

OPSET = 17
# onnxruntime >= 1.20 reads IR <= 10; opset 17 needs IR 8.
IR_VERSION = 8
_log = logging.getLogger(__name__)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def restore_division(model: onnx.ModelProto, divisor: np.ndarray) -> int:
    """Turn grappler's `x * (1/d)` back into Keras's `x / d`; returns how many nodes changed.

    TensorFlow's constant folding rewrites division by a constant as multiplication by its
    reciprocal, which is one rounding away from Keras's normalization; relu LSTMs can amplify that
    into visible differences, so we keep Keras's arithmetic exactly.
    """
    reciprocal = (np.float32(1.0) / divisor.astype(np.float32)).astype(np.float32)
    graph = model.graph
    initializers = {item.name: item for item in graph.initializer}
    changed = 0
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2 or node.input[1] not in initializers:
            continue
        item = initializers[node.input[1]]
        value = numpy_helper.to_array(item)
        # TF folds 1/d with its own kernel, which may differ from numpy's by one ulp.
        if value.shape == reciprocal.shape and np.allclose(value, reciprocal, rtol=1e-6, atol=0):
            item.CopyFrom(numpy_helper.from_array(divisor.astype(np.float32), item.name))
            node.op_type = "Div"
            changed += 1
    return changed


def to_onnx(
    function: tf.types.experimental.PolymorphicFunction,
    inputs: Sequence[str],
    outputs: Sequence[str],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Convert `function` and name its graph inputs / outputs `inputs` / `outputs`, in order."""
    signature = function.input_signature
    model, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    graph = model.graph
    if len(graph.input) != len(inputs) or len(graph.output) != len(outputs):
        raise RuntimeError(
            f"converted graph has {len(graph.input)} inputs / {len(graph.output)} outputs, "
            f"expected {len(inputs)} / {len(outputs)}"
        )
    for value, name in zip(list(graph.input), inputs, strict=True):
        _rename(graph, value.name, name)
    for value, name in zip(list(graph.output), outputs, strict=True):
        _rename(graph, value.name, name)
    model.ir_version = IR_VERSION
    model.producer_name = "seqserve-export"
    onnx.checker.check_model(model, full_check=True)
    _log.debug("converted %s: %d nodes", function.__name__, len(graph.node))
    return model


def logits_graph(graph: bytes, output: str) -> bytes:
    """`graph` with the Softmax making `output` replaced by Identity: same nodes, logits out.

    Parity judges logits as well as probabilities (a flipped near-tie moves a probability by up to
    1, a wrong weight may move none); this copy shows the logits the served graph computes.
    """
    model = onnx.load_from_string(graph)
    producers = [node for node in model.graph.node if output in node.output]
    if len(producers) != 1 or producers[0].op_type != "Softmax":
        found = [node.op_type for node in producers]
        raise ValueError(f"{output!r} is made by {found}, expected one Softmax")
    node = producers[0]
    node.op_type = "Identity"
    del node.attribute[:]
    return model.SerializeToString()
