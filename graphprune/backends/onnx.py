"""ONNX backend: slice the initializers and rewrite every width the file holds as a constant (Reshape
targets, Expand shapes, Resize sizes, Split sizes, Slice bounds, Gather indices, Conv groups), then
re-infer shapes strictly and run the full checker. Widths the graph computes at run time (Shape ->
Gather -> Concat chains) follow by themselves; the analysis pinned the ones it could not follow.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendError
from ..ir.from_onnx import OnnxGraph, opset_of
from ..ir.graph import CONST, Value

log = logging.getLogger(__name__)


class _Editor:
    """Edits one onnx_ir model in place, knowing the kept positions of every recorded axis."""

    def __init__(self, og: OnnxGraph, an, gone: np.ndarray):
        import onnx_ir as ir

        self.ir = ir
        self.og, self.an, self.gone = og, an, gone
        self.model = og.model
        self.graph = og.model.graph
        self.names: set[str] = {v.name for n in self.graph for v in list(n.inputs) + list(n.outputs) if v is not None}
        self.names |= set(self.graph.initializers)
        self.opset = opset_of(self.model)

    def kept(self, v: Value, axis: int) -> np.ndarray:
        ids = self.an.elements(v, axis)
        if ids is None:
            return np.arange(v.shape[axis])
        return np.nonzero(~self.gone[self.an.component[ids]])[0]

    def width(self, v: Value, axis: int) -> int:
        return len(self.kept(v, axis))

    def fresh_name(self, base: str) -> str:
        name, k = f"{base}_pruned", 1
        while name in self.names:
            k += 1
            name = f"{base}_pruned{k}"
        self.names.add(name)
        return name

    def constant(self, base: str, data: np.ndarray):
        """A new initializer holding `data`."""
        ir = self.ir
        value = ir.Value(name=self.fresh_name(base), shape=ir.Shape(data.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(data.dtype)), const_value=ir.tensor(data))
        self.graph.register_initializer(value)
        return value

    def node(self, op_type: str, inputs: list, before, **attributes):
        ir = self.ir
        n = ir.Node("", op_type, inputs, attributes=[_attr(ir, k, v) for k, v in attributes.items()],
                    name=self.fresh_name(f"{before.name or op_type}_{op_type}"))
        n.outputs[0].name = self.fresh_name(n.name)
        self.graph.insert_before(before, n)
        return n.outputs[0]

    # ----- edits -----------------------------------------------------------------------------------
    def slice_initializers(self) -> None:
        for name, v in self.og.graph.params.items():
            keep = [self.kept(v, a) for a in range(v.ndim)]
            if all(len(k) == n for k, n in zip(keep, v.shape)):
                continue
            data = _take(self.og.tensors[name], keep)
            init = self.graph.initializers[name]
            init.const_value = self.ir.tensor(data, name=name)
            init.shape = self.ir.Shape(data.shape)

    def slice_constants(self, irn) -> None:
        """Constants tied to pruned axes (Constant-node tensors, folded values, integer initializers) are
        inputs of this node only in their sliced form; values computed from widths in a model with fixed
        input shapes become constants."""
        for pos, v in enumerate(irn.args):
            if not isinstance(v, Value) or v.kind != CONST or v.data is None:
                continue
            keep = [self.kept(v, a) for a in range(v.ndim)]
            if all(len(k) == n for k, n in zip(keep, v.shape)) and v.id not in self.og.frozen:
                continue
            if v.reads:
                raise BackendError(f"{irn.where()}: input {pos} is computed at run time from widths that change")
            name = irn.target.inputs[pos].name or "constant"
            irn.target.replace_input_with(pos, self.constant(name, _take(np.asarray(v.data), keep)))

    def set_vector(self, node, pos: int, old: Value, new: list[int]) -> None:
        """Make input `pos` of `node` hold `new` where it held a literal (its run-time elements stay)."""
        values = np.asarray(old.data).reshape(-1)
        if list(values) == list(new):
            return
        dtype = values.dtype
        sources = old.sources or (None,) * len(values)
        src_input = node.inputs[pos]
        if all(s is None for s in sources):
            node.replace_input_with(pos, self.constant(src_input.name or "shape", np.asarray(new, dtype=dtype)))
            return
        pieces, i = [], 0
        while i < len(new):  # runs of kept elements come from the original tensor, changed ones are literals
            j = i
            changed = new[i] != values[i]
            while j < len(new) and (new[j] != values[j]) == changed:
                j += 1
            if changed:
                pieces.append(self.constant(src_input.name or "shape", np.asarray(new[i:j], dtype=dtype)))
            else:
                starts, ends = (self.constant("start", np.array([i], np.int64)),
                                self.constant("end", np.array([j], np.int64)))
                vec = src_input if old.ndim == 1 else self.node("Reshape", [src_input, self.constant(
                    "flat", np.array([-1], np.int64))], node)
                pieces.append(self.node("Slice", [vec, starts, ends], node))
            i = j
        node.replace_input_with(pos, self.node("Concat", pieces, node, axis=0) if len(pieces) > 1 else pieces[0])

    def rewrite(self, irn) -> None:
        node, op = irn.target, irn.op.split(".", 1)[1]
        args = irn.args
        if op in ("Conv", "ConvTranspose") and node.attributes.get("group") is not None:
            groups, w = node.attributes["group"].value, args[1]
            axis = 0
            if groups > 1 and self.width(w, axis) != w.shape[axis]:
                node.attributes["group"] = _attr(self.ir, "group", groups * self.width(w, axis) // w.shape[axis])
        elif op == "Reshape":
            self._shape_input(irn, 1, right=False, keep={0, -1})
        elif op == "Expand":
            self._shape_input(irn, 1, right=True, keep={1})
        elif op in ("Resize", "Upsample") and len(args) > 3 and isinstance(args[3], Value) and \
                "axes" not in node.attributes:
            self._shape_input(irn, 3, right=False, keep=set())
        elif op == "Split":
            self._split(irn)
        elif op == "Slice":
            self._slice(irn)
        elif op == "Gather" and isinstance(args[1], Value) and args[1].kind == CONST:
            self._gather(irn)
        elif op == "GatherND" and isinstance(args[1], Value) and args[1].kind == CONST and args[1].shape[-1:] == (1,):
            self._gather(irn, nd=True)  # the rule pinned every other GatherND
        elif op == "Squeeze" and "axes" not in node.attributes and len(node.inputs) < 2:
            # without axes, every width-1 axis goes, and a channel axis pruned to one would go too
            axes = [a for a, n in enumerate(args[0].shape) if n == 1]
            if self.opset < 13:
                node.attributes["axes"] = _attr(self.ir, "axes", axes)
            else:
                node.resize_inputs(2)
                node.replace_input_with(1, self.constant("axes", np.asarray(axes, dtype=np.int64)))
        elif op == "GroupNormalization":
            x = args[0]
            if node.attributes["num_groups"].value == x.shape[1] and self.width(x, 1) != x.shape[1]:
                node.attributes["num_groups"] = _attr(self.ir, "num_groups", self.width(x, 1))

    def _shape_input(self, irn, pos: int, right: bool, keep: set[int]) -> None:
        old, out = irn.args[pos], irn.outputs[0]
        if not isinstance(old, Value) or old.kind != CONST:
            return
        values = np.asarray(old.data).reshape(-1).tolist()
        lead = out.ndim - len(values) if right else 0
        sources = old.sources or (None,) * len(values)
        new = list(values)
        for i, v in enumerate(values):
            j = i + lead
            if sources[i] is None and v not in keep and 0 <= j < out.ndim:
                new[i] = self.width(out, j)
        if new != values and old.sources is None:
            raise BackendError(f"{irn.where()}: cannot rewrite a shape input computed at run time")
        self.set_vector(irn.target, pos, old, new)

    def _split(self, irn) -> None:
        node, src = irn.target, irn.args[0]
        axis = node.attributes["axis"].value % src.ndim if "axis" in node.attributes else 0
        sizes = [self.width(o, axis) for o in irn.outputs]
        if sizes == [o.shape[axis] for o in irn.outputs]:
            return
        if self.opset < 13:
            node.attributes["split"] = _attr(self.ir, "split", sizes)
            return
        node.attributes.pop("num_outputs", None)
        data = np.asarray(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            node.replace_input_with(1, self.constant(node.inputs[1].name or "split", data))
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, self.constant("split", data))

    def _slice(self, irn) -> None:
        from ..analysis.rules.onnx.tensor import slice_indices

        node, src, out = irn.target, irn.args[0], irn.outputs[0]
        bounds = slice_indices(irn, src)
        changed = {a: b for a, b in bounds.items() if self.width(src, a) != src.shape[a]}
        if not changed:
            return
        axes = list(bounds)
        starts, ends = [], []
        for a in axes:
            start, end, _ = bounds[a]
            if a in changed:
                n = src.shape[a]
                start = min(max(start + n if start < 0 else start, 0), n)
                start = int(np.searchsorted(self.kept(src, a), start))
                end = start + self.width(out, a)
            starts.append(start)
            ends.append(end)
        if "starts" in node.attributes:
            node.attributes["starts"] = _attr(self.ir, "starts", starts)
            node.attributes["ends"] = _attr(self.ir, "ends", ends)
            return
        order = [int(a) % src.ndim for a in (np.asarray(irn.args[3].data).reshape(-1) if len(irn.args) > 3 and
                                             irn.args[3] is not None else range(len(axes)))]
        by_axis = dict(zip(axes, zip(starts, ends)))
        for pos, vec in ((1, [by_axis[a][0] for a in order]), (2, [by_axis[a][1] for a in order])):
            self.set_vector(node, pos, irn.args[pos], vec)

    def _gather(self, irn, nd: bool = False) -> None:
        """Constant indices renumbered; GatherND (nd) indices hold one coordinate each, on axis 0."""
        node, data, index = irn.target, irn.args[0], irn.args[1]
        axis = 0 if nd or "axis" not in node.attributes else node.attributes["axis"].value % data.ndim
        kept = self.kept(data, axis)
        if len(kept) == data.shape[axis]:
            return
        held = np.asarray(index.data)
        idx = (held[..., 0] if nd else held).reshape(-1) % data.shape[axis]
        rank = {int(k): r for r, k in enumerate(kept)}
        new = np.asarray([rank[int(i)] for i in idx if int(i) in rank], dtype=held.dtype)
        # a 1-d selection drops the removed channels it picked; other indices were pinned whole and keep their shape
        shape = ((-1, 1) if nd else (-1,)) if held.ndim == 1 + nd else held.shape
        node.replace_input_with(1, self.constant(node.inputs[1].name or "indices", new.reshape(shape)))


def _take(data: np.ndarray, keep: list[np.ndarray]) -> np.ndarray:
    """`data` with only the kept positions of every axis."""
    for a, k in enumerate(keep):
        if len(k) != data.shape[a]:
            data = np.take(data, k, axis=a)
    return np.ascontiguousarray(data)


def _attr(ir, name: str, value):
    if isinstance(value, (bool, int, np.integer)):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, (list, tuple)) and all(isinstance(x, (int, np.integer)) for x in value):
        return ir.AttrInt64s(name, [int(x) for x in value])
    raise BackendError(f"cannot write attribute {name}={value!r}")


def apply(og: OnnxGraph, an, gone: np.ndarray):
    """Prune og.model in place (the in-memory copy read from the file) and return it as a checked proto."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    editor = _Editor(og, an, gone)
    editor.slice_initializers()
    for irn in og.graph.nodes:
        if irn.target is not None:
            editor.slice_constants(irn)
            if irn.op.startswith("onnx."):
                editor.rewrite(irn)
    outputs = {v.name for v in og.model.graph.outputs}
    for node in og.model.graph:
        for v in node.outputs:
            if v.name not in outputs:
                v.shape = None  # stale; inferred again below
    RemoveUnusedNodesPass()(og.model)
    return check(ir.to_proto(og.model))


def check(proto):
    """Strict shape inference and the full checker; the inferred shapes are kept in the file."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred, full_check=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError
        raise BackendError(f"the pruned model does not pass the ONNX checker: {' '.join(str(exc).split())[:400]}; "
                           "this is a graphprune bug: please report it with the model") from exc
    return inferred


def to_float16(proto, float16_io: bool = False):
    """`proto` with float16 weights and compute (ONNX Runtime's converter, which keeps the ops that need float32
    in float32 behind Casts); inputs and outputs stay float32 unless float16_io. Checked like apply's output."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        half = ir.from_proto(convert_float_to_float16(proto, keep_io_types=not float16_io))
    except Exception as exc:  # noqa: BLE001 - the converter raises plain Exceptions and asserts
        raise BackendError(f"the model could not be converted to float16 ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}); write it in float32 (without --fp16)") from exc
    half.graph.sort()  # the converter appends the Casts of the inputs at the end
    return check(ir.to_proto(half))


def masked(og: OnnxGraph, model, zeroed: dict[str, dict[int, list[int]]]):
    """`model` (a fresh copy of the original) with every removed channel's producer rows zeroed; its shared
    constant initializers untied as the analysed copy's were."""
    import onnx_ir as ir

    from ..ir.from_onnx import untie_constants

    untie_constants(model)
    for name, axes in zeroed.items():
        data = og.tensors[name].copy()
        for axis, idx in axes.items():
            index = [slice(None)] * data.ndim
            index[axis] = idx
            data[tuple(index)] = 0
        model.graph.initializers[name].const_value = ir.tensor(data, name=name)
    return ir.to_proto(model)
