"""2:4 masks on NVIDIA sparse tensor cores from PyTorch: the masked weights of Linear layers become semi-structured
sparse tensors (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt, or CUTLASS where PyTorch has no
cuSPARSELt), where the device, dtype and shape allow it. Every other masked layer stays masked dense and the report
says why. A converted layer must reproduce the masked dense layer on a random input, or it is left dense.

Whether it is faster depends on the shapes and the GPU (published: up to 1.7x per matmul on A100, 0.4x-1.2x on
H100): benchmarks/gpu_check.py measures it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..passes.nm import SparsityReport

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what both backends take for floating weights


def why_dense(module: nn.Module) -> str | None:
    """Why this masked layer cannot run on 2:4 kernels from PyTorch; None when it can try."""
    if not isinstance(module, nn.Linear):
        return "no PyTorch 2:4 kernel for this layer type (TensorRT runs 2:4 convolutions)"
    w = module.weight
    if w.device.type != "cuda":
        return f"on {w.device.type}: 2:4 kernels need a CUDA GPU"
    if torch.cuda.get_device_capability(w.device) < (8, 0):
        return "sparse tensor cores need compute capability 8.0 (Ampere) or newer"
    if w.dtype not in KERNEL_DTYPES:
        return f"{str(w.dtype).removeprefix('torch.')}: 2:4 kernels take float16 or bfloat16 (model.half() first)"
    from torch.sparse import SparseSemiStructuredTensor

    backend = (torch.sparse.SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
               else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    rule = backend._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    rows, cols = w.shape
    if rows % rule.sparse_min_rows or cols % rule.sparse_min_cols:
        return (f"{rows}x{cols}: {backend.BACKEND} needs multiples of {rule.sparse_min_rows}x"
                f"{rule.sparse_min_cols}")
    return None


def to_kernel(module: nn.Linear) -> str | None:
    """Put one masked layer's weight on 2:4 kernels in place, if it reproduces the masked dense layer on a random
    input; None when done, else why it stays masked dense."""
    from torch.sparse import to_sparse_semi_structured

    reason = why_dense(module)
    if reason is not None:
        return reason
    w, bias = module.weight.detach(), module.bias
    x = torch.randn(64, w.shape[1], dtype=w.dtype, device=w.device)
    try:
        sparse = to_sparse_semi_structured(w)
        with torch.no_grad():
            got, want = nn.functional.linear(x, sparse, bias), nn.functional.linear(x, w, bias)
    except RuntimeError as exc:  # a kernel or library PyTorch was built without
        return f"conversion failed ({' '.join(str(exc).split())[:160]})"
    err = float((got.float() - want.float()).abs().max())
    if not err <= 2e-2 * max(float(want.float().abs().max()), 1e-6):
        return f"the 2:4 kernel's output differs from the masked layer's by {err:.3g}"
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return None


def to_kernels(model: nn.Module, report: SparsityReport) -> None:
    """Convert what can be converted in place; each masked layer's `kernel` says what it runs on."""
    modules = dict(model.named_modules())
    for layer in report.masked:
        module = modules[layer.name]
        reason = to_kernel(module)
        layer.kernel = f"2:4 {type(module.weight).BACKEND}" if reason is None else f"masked dense: {reason}"
    converted = sum(layer.kernel.startswith("2:4") for layer in report.masked)
    report.notes.append(f"{converted} of {len(report.masked)} masked layers run on 2:4 sparse kernels"
                        + ("" if converted else " (see each layer's reason)"))
