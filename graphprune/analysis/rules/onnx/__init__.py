"""Rules for ONNX ops ("onnx.<OpType>"). Most translate the node's attributes into the argument layout of
the matching ATen rule and call it, so both frontends share one set of channel semantics; the rest
(Gemm's transposes, numpy-style MatMul, Slice over several axes, Einsum) are written here.

Shape computations reach these rules as folded constants (ir/from_onnx.py). A constant that was
computed from run-time widths pins those widths, except where a rule knows how the pruned graph uses
it (a Reshape target element that copies a width ties that width to its output axis).
"""

from __future__ import annotations

from . import elementwise, linear, norm, quantize, shape, tensor  # noqa: F401  (registers)
