"""Op rules, one module per op family, in a registry keyed by canonical op name.

A rule receives the analysis Context and one Node. It ties elements that go together, pins what may not
be removed (with a reason), sets the masked state of each output axis and registers FLOP terms. An op
with no rule pins every axis it touches: graphprune never guesses an op's semantics.
"""

from __future__ import annotations

from collections.abc import Callable

RULES: dict[str, Callable] = {}


def rule(*names: str):
    """Register a rule under ATen op names: 'aten.add' matches every overload, 'aten.add.Tensor' one."""

    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn

    return register


def lookup(op: str):
    fn = RULES.get(op)
    if fn is None and op.count(".") >= 2:
        fn = RULES.get(op.rsplit(".", 1)[0])
    return fn


from . import attention, elementwise, indexing, linear, norm, onnx, pool, shape  # noqa: F401  (registers)
