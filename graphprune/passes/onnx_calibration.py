"""Calibration for ONNX files: the readers of passes/calibration.py (per input column count, sum, sum of
squares), filled from ONNX Runtime runs that also return every reading layer's input.

Readers are the nodes that read channels through a weight initializer: Conv without groups, Gemm and
MatMul with a 2-d weight. Their scores are the same Wanda / FLAP / OBS criteria as for PyTorch models.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import UsageError
from ..ir.graph import PARAM
from .calibration import Reader

log = logging.getLogger(__name__)


def readers_of(loaded) -> list[tuple[Reader, str]]:
    """(reader, name of the ONNX value it reads) for every reading node with a prunable input."""
    an, og = loaded.an, loaded.og
    name_of = {v.id: name for name, v in og.values.items()}
    found = []
    for irn in og.graph.nodes:
        op, args = irn.op, irn.args
        if op == "onnx.Conv" and irn.kwargs.get("group", 1) == 1:
            kind, w, axis = "conv", args[1], 1
        elif op == "onnx.Gemm" and not irn.kwargs.get("transA", 0):
            w = args[1]
            kind, axis = ("linear", 1) if irn.kwargs.get("transB", 0) else ("conv1d_hf", 0)
        elif op == "onnx.MatMul" and args[1].ndim == 2:
            kind, w, axis = "conv1d_hf", args[1], 0
        else:
            continue
        if w.kind != PARAM or w.name not in og.tensors or args[0].id not in name_of:
            continue
        cols = an.component[an.elements(w, axis)]
        if an.prunable[cols].any():
            found.append((Reader(irn.scope, w.name, axis, kind, columns=cols), name_of[args[0].id]))
    return found


def collect(loaded, batches: list[dict[str, np.ndarray]], progress=None, grams: bool = False) -> list[Reader]:
    """Run the batches through the original model (not yet edited: planning comes before the backend) once
    and gather every reader's input statistics (and X^T X with grams=True, for importance="obs")."""
    from ..ir.from_onnx import check_feeds, session_returning

    if not batches:
        raise UsageError("calibration is empty: give at least one batch of inputs")
    pairs = readers_of(loaded)
    for reader, _ in pairs:
        reader.want_gram = grams
    model = loaded.og.model
    sess = session_returning(model, sorted({name for _, name in pairs}))
    started = time.perf_counter()
    for k, batch in enumerate(batches):
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, check_feeds(model, batch))))
        for reader, name in pairs:
            reader.add(torch.from_numpy(np.asarray(outs[name], dtype=np.float32)))
        log.info("calibration batch %d done (%.1f s)", k + 1, time.perf_counter() - started)
        if progress is not None:
            progress(f"calibration batch {k + 1}/{len(batches)}")
    return [r for r, _ in pairs if r.n]


def split_batches(model, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Calibration arrays (one per input, samples along the first axis) as batches the model accepts: of
    its fixed batch size, or of up to 8 samples where the batch size is free."""
    from ..ir.from_onnx import _real_inputs

    inputs = _real_inputs(model.graph)
    sizes = {len(np.asarray(arrays[v.name])) if np.ndim(arrays.get(v.name)) else 1 for v in inputs if v.name in arrays}
    if len(sizes) != 1:
        raise UsageError(f"the calibration arrays have different numbers of samples ({sorted(sizes)}); give the "
                         "same number for every input")
    n = sizes.pop()
    fixed = {v.shape.dims[0] for v in inputs if v.shape is not None and v.shape.rank() and
             isinstance(v.shape.dims[0], int)}
    if len(fixed) == 1:
        step = fixed.pop()
        if n % step:
            raise UsageError(f"{n} calibration samples do not split into batches of {step}, the model's batch size")
    else:
        step = 8  # a free batch size: up to 8 samples per run
    return [{k: np.asarray(a)[i:i + step] for k, a in arrays.items()} for i in range(0, n, step)]
