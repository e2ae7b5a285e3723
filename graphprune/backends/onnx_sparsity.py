"""N:M masks on an ONNX file's weights: passes/nm.py's rules and magnitude masks applied to the initializers of
Conv, Gemm and MatMul nodes (grouped along the reduction axis: Conv [K, C, R, S] along C, Gemm's B along its
input axis, MatMul's B [in, out] along `in`, the axes TensorRT and polygraphy's checker use), and the per-layer
reading behind ``graphprune inspect --sparsity``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BackendError
from ..passes.nm import SMALL, LayerSparsity, SparsityReport, holds_pattern, magnitude_masked, shape_reason

_FLOATS = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto data types
_SPARSE_MATH = ("float16", "bfloat16")  # TensorRT's sparse kernels: fp16/bf16 (and int8/fp8 via Q/DQ), not fp32


@dataclass
class OnnxWeight:
    """One Conv / Gemm / MatMul weight: where it is, along which axis N:M groups run, why it cannot hold them."""

    node: str
    op: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # calibration.reader_kind's names: "conv" and "linear" [out, in, ...], "conv1d_hf" [in, out]
    in_axis: int
    reason: str  # empty when N:M masks can go on it


def weights(proto, n: int, m: int) -> list[OnnxWeight]:
    """Every Conv / ConvTranspose / Gemm / MatMul with a weight operand, in graph order."""
    from onnx import helper

    inits = {t.name: t for t in proto.graph.initializer}
    uses = Counter(name for node in proto.graph.node for name in node.input)
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kind, in_axis = "conv", 1
        if node.op_type == "Gemm":
            kind, in_axis = ("linear", 1) if attrs.get("transB", 0) else ("conv1d_hf", 0)
        elif node.op_type == "MatMul":
            kind, in_axis = "conv1d_hf", 0
        name = node.input[1]
        init = inits.get(name)
        shape = tuple(init.dims) if init is not None else ()
        dtype = _FLOATS.get(init.data_type, f"type {init.data_type}") if init is not None else ""
        if init is None:
            reason = "operand computed in the graph (an activation, or a weight behind Cast / Transpose / Q-DQ)"
        elif node.op_type == "ConvTranspose":
            reason = "transposed convolution"
        elif attrs.get("group", 1) != 1:
            reason = f"grouped convolution (group={attrs['group']}): no N:M kernels for it"
        elif node.op_type == "Gemm" and attrs.get("transA", 0):
            reason = "Gemm with transA: the weight is not the reduction operand TensorRT masks"
        elif len(shape) < 2 or (node.op_type != "Conv" and len(shape) != 2):
            reason = f"a {len(shape)}-d weight: not a layer's matrix"
        elif uses[name] > 1:
            reason = "weight shared with another node: masking it would change both"
        elif dtype not in ("float32", "float16", "float64"):
            reason = f"weights stored as {dtype}: not masked here"
        else:
            reason = shape_reason(kind, shape, in_axis, n, m) or ""
        found.append(OnnxWeight(node.name, node.op_type, name, shape, dtype, kind, in_axis, reason))
    return found


def sparsify(proto, n: int, m: int, ignore: set[str] = frozenset()) -> SparsityReport:
    """Mask every eligible weight of `proto` in place (the N largest |w| of every M input channels stay);
    `ignore`: node or weight names kept dense."""
    from onnx import numpy_helper

    report = SparsityReport(f"{n}:{m}", "magnitude")
    inits = {t.name: t for t in proto.graph.initializer}
    for w in weights(proto, n, m):
        layer = LayerSparsity(w.name, w.shape, False, "ignored" if {w.node, w.name} & ignore else w.reason)
        report.layers.append(layer)
        if layer.reason:
            continue
        array = numpy_helper.to_array(inits[w.name])
        new, layer.kept_magnitude = magnitude_masked(torch.from_numpy(array.copy()), w.kind, w.in_axis, n, m)
        if not holds_pattern(new, w.kind, w.in_axis, n, m):
            raise BackendError(f"the {n}:{m} mask of {w.name} does not hold the pattern; this is a graphprune bug")
        inits[w.name].CopyFrom(numpy_helper.from_array(new.numpy().astype(array.dtype), w.name))
        layer.masked = True
        if min(_channels(w)) < SMALL:
            layer.reason = f"under {SMALL} channels: TensorRT usually keeps such layers dense"
    return report


def _channels(w: OnnxWeight) -> tuple[int, int]:
    """(outputs, inputs)."""
    inputs = w.shape[w.in_axis]
    return (w.shape[1 - w.in_axis] if w.kind == "conv1d_hf" else w.shape[0]), inputs


def _holds(init, w: OnnxWeight, n: int, m: int) -> bool:
    """Does the stored weight hold the N:M pattern along its reduction axis?"""
    from onnx import numpy_helper

    if len(w.shape) < 2 or w.shape[w.in_axis] % m or w.dtype not in ("float32", "float16", "float64"):
        return False
    array = np.array(numpy_helper.to_array(init), dtype=np.float32)
    return holds_pattern(torch.from_numpy(array), w.kind, w.in_axis, n, m)


def rows(proto, n: int, m: int) -> list[tuple[str, str, str, str, str, str]]:
    """(node, weight, shape, holds N:M, eligible or why not, TensorRT) per layer, for inspect --sparsity."""
    inits = {t.name: t for t in proto.graph.initializer}
    table = []
    for w in weights(proto, n, m):
        pattern = "yes" if w.name in inits and _holds(inits[w.name], w, n, m) else "no"
        if w.reason:
            trt = "-"
        elif w.dtype not in _SPARSE_MATH:
            trt = f"{w.dtype}: no sparse kernels (export fp16)"
        elif min(_channels(w)) < SMALL:
            trt = f"eligible; under {SMALL} channels, usually dense"
        else:
            trt = "eligible"
        table.append((w.node or w.op, w.name, "x".join(map(str, w.shape)) or "-", pattern, w.reason or "eligible",
                      trt))
    return table
