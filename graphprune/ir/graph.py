"""The graph IR: tensors (Values) produced and consumed by ops (Nodes), in execution order.

The IR is frontend-neutral: an op is named by a canonical string ("aten.convolution.default" for
torch, "onnx.Conv" for ONNX) and rules are looked up by that name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INPUT, PARAM, BUFFER, CONST, ACT = "input", "param", "buffer", "const", "act"


@dataclass(eq=False)
class Value:
    """One tensor. `kind` says where it comes from; `name` is the parameter/buffer name if any."""

    id: int
    shape: tuple[int, ...]
    dtype: str
    kind: str = ACT
    name: str | None = None
    producer: Node | None = None
    depends_on_input: bool = False
    # For tensors that are pure views of a parameter (t(), transpose, split, ...):
    # (param value, per-axis param axis or None, per-axis offset into that param axis).
    param_view: tuple[Value, tuple[int | None, ...], tuple[int, ...]] | None = None
    data: Any = None  # the tensor itself, for constants the graph cannot recompute
    zero: bool = False  # a buffer that is all zeros by construction (non-persistent, so no load changes it)
    # For constants a frontend folded out of shape computations (ONNX Shape -> Gather -> Concat chains):
    # `reads` holds the (value id, axis) widths the content was computed from at run time, and `sources`,
    # per element of a small 1-d value, None (a literal), (value id, axis) (exactly that width) or a
    # frozenset of widths (an expression of them). Rules use them to tell rewritable literals from widths
    # the pruned graph recomputes.
    reads: frozenset = frozenset()
    sources: tuple | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:  # short, for error messages
        label = self.name or f"%{self.id}"
        return f"{label}{list(self.shape)}"


@dataclass(eq=False)
class Node:
    """One op call. `args`/`kwargs` mirror the call with every tensor replaced by its Value."""

    id: int
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Value]
    scope: str = ""  # qualified name of the innermost module running when the op was called
    target: Any = None  # the callable that ran (an ATen OpOverload for torch), for regenerating code

    def where(self) -> str:
        return f"{self.op} (node {self.id}" + (f", in module '{self.scope}')" if self.scope else ")")

    def tensor_inputs(self) -> list[Value]:
        found: list[Value] = []
        _collect(self.args, found)
        _collect(tuple(self.kwargs.values()), found)
        return found


def _collect(obj: Any, found: list[Value]) -> None:
    if isinstance(obj, Value):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, found)


@dataclass(eq=False)
class Graph:
    """Values and nodes of one recorded run, plus which values are inputs, outputs and parameters."""

    nodes: list[Node] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    params: dict[str, Value] = field(default_factory=dict)  # parameters and buffers by name
    output_is_tensor: bool = True  # the model returned one tensor (not a tuple, dict or model output)

    def new_value(self, shape, dtype, kind=ACT, name=None, producer=None, depends_on_input=False) -> Value:
        value = Value(len(self.values), tuple(int(s) for s in shape), str(dtype), kind, name, producer,
                      depends_on_input)
        self.values.append(value)
        return value
