"""N:M semi-structured sparsity: in every M consecutive weights along a layer's reduction axis (its input
channels) at most N stay non-zero. 2:4 is what NVIDIA's sparse tensor cores run (cuSPARSELt, TensorRT's
SPARSE_WEIGHTS): a Linear weight [out, in] is grouped along `in`, a convolution [K, C, R, S] along C at each
(k, r, s), transformers' Conv1D [in, out] along `in`.

Which N of every M stay (the weights are seen as columns [rows, C], C the input channels):
  magnitude: |W_ij|                       (no data)
  wanda:     |W_ij| * ||x_j||             (Wanda: the input column's norm over the calibration tokens)
  sparsegpt: the columns are visited left to right; at the start of each M-group the N with the largest
             w^2 / [U]_jj^2 stay (U the upper Cholesky factor of H^-1, H = E[x x^T] + lambda I: the OBS
             saliency), and each removed weight's error is spread over the columns not yet visited
             (SparseGPT, Frantar & Alistarh 2023), so the kept weights change too. Statistics come from the
             dense model (one pass over the calibration batches for every layer at once); a 2-d convolution
             reads its inputs as unfolded patches, columns in (tap, channel) order.

A layer is skipped, with the reason in the report, when its input channels are not a multiple of M, when
sparse tensor cores cannot run it (NVIDIA ASP's rule for 2:4: output channels % 8 and input channels % 16),
when its weight is shared with another module (tied embeddings: masking it would change both), for grouped,
depthwise and transposed convolutions, and for modules the caller ignores. Layers under 256 channels are
masked but noted: TensorRT times sparse against dense kernels and usually keeps such layers dense.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .calibration import Reader, _back_to_layout, _weight_columns, feed, reader_kind

METHODS = ("magnitude", "wanda", "sparsegpt")
SMALL = 256  # channels under which TensorRT rarely picks a sparse kernel
DAMP = 1e-2  # sparsegpt: lambda = DAMP x the mean diagonal of E[x x^T]
BLOCK = 128  # sparsegpt: columns updated together (a multiple of every M used in practice)


def parse_pattern(pattern: Any) -> tuple[int, int]:
    """'2:4' -> (2, 4): N weights kept in every M."""
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if found is None or not 0 < int(found.group(1)) < int(found.group(2)):
        raise UsageError(f"pattern must be 'N:M' with 0 < N < M (N weights kept in every M consecutive input "
                         f"channels, e.g. '2:4'), got {pattern!r}")
    return int(found.group(1)), int(found.group(2))


@dataclass
class LayerSparsity:
    """One weighted layer: masked or skipped, and why."""

    name: str
    shape: tuple[int, ...]
    masked: bool
    reason: str = ""  # why it was skipped, or a note on a masked layer
    kept_magnitude: float = 1.0  # sum |W| over the kept weights / sum |W|, before sparsegpt's updates
    kernel: str = ""  # with semi_structured=True: what the masked layer runs on (backends/sparse_kernels.py)


@dataclass
class SparsityReport:
    pattern: str
    method: str
    layers: list[LayerSparsity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def masked(self) -> list[LayerSparsity]:
        return [layer for layer in self.layers if layer.masked]

    @property
    def skipped(self) -> list[LayerSparsity]:
        return [layer for layer in self.layers if not layer.masked]

    def weights_masked(self) -> float:
        """The fraction of the weighted layers' weights that sit in masked layers."""
        total = sum(math.prod(layer.shape) for layer in self.layers)
        return sum(math.prod(layer.shape) for layer in self.masked) / max(total, 1)

    def summary(self) -> str:
        return (f"{self.pattern} sparsity ({self.method}): {len(self.masked)} of {len(self.layers)} weighted layers "
                f"masked, {self.weights_masked():.1%} of their weights in masked layers")

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  {note}" for note in self.notes]
        width = max([len(layer.name) for layer in self.layers] + [5])
        for layer in self.layers:
            state = f"masked, kept |W| {layer.kept_magnitude:.3f}" if layer.masked else "skipped"
            shape = "x".join(map(str, layer.shape))
            notes = "".join(f"; {text}" for text in (layer.reason, layer.kernel) if text)
            lines.append(f"  {layer.name:<{width}} {shape:>16}  {state}{notes}")
        return "\n".join(lines)


def _skip_reason(module: nn.Module, n: int, m: int) -> str | None:
    """Why N:M masks cannot (or should not) go on this layer; None when they can."""
    if isinstance(module, nn.modules.conv._ConvNd) and (module.groups != 1 or module.transposed):
        return ("transposed convolution" if module.transposed else
                f"grouped convolution (groups={module.groups}): no N:M kernels for it")
    kind, in_axis = reader_kind(module)
    return shape_reason(kind, tuple(module.weight.shape), in_axis, n, m)


def shape_reason(kind: str, shape: tuple[int, ...], in_axis: int, n: int, m: int) -> str | None:
    """Why a weight of this shape cannot hold N:M masks that kernels run; None when it can. `kind` and `in_axis`
    as calibration.reader_kind gives them (conv1d_hf: [in, out], the others [out, in, ...])."""
    channels = shape[in_axis]
    outputs = shape[1 - in_axis] if kind == "conv1d_hf" else shape[0]
    if channels % m:
        return f"{channels} input channels are not a multiple of {m}"
    if (n, m) == (2, 4) and (channels % 16 or outputs % 8):
        return (f"{outputs} outputs x {channels} inputs: sparse tensor cores need outputs % 8 and inputs % 16 "
                "(NVIDIA ASP's rule)")
    return None


def eligible_multiple(n: int, m: int) -> int:
    """The channel multiple that keeps a pruned layer N:M-eligible (2:4: ASP's inputs % 16, outputs % 8)."""
    return 16 if (n, m) == (2, 4) else math.lcm(8, m)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module with a weight that reduces over input channels (Linear, convolutions, transformers' Conv1D)."""
    found = []
    for name, module in model.named_modules():
        if reader_kind(module) is not None or (isinstance(module, nn.modules.conv._ConvNd)
                                              and isinstance(getattr(module, "weight", None), torch.Tensor)):
            found.append((name, module))
    return found


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (tied input and output embeddings)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            seen[id(w)] = seen.get(id(w), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask [rows, C]: in each run of m columns the n highest scores (the first on ties)."""
    rows, channels = scores.shape
    groups = scores.reshape(rows, channels // m, m)
    top = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, channels)


def sparsegpt(w: torch.Tensor, second_moment: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M pass on columns w [rows, C] (float64) with H = E[x x^T] [C, C]: the updated weights (zeros
    where masked) and the keep mask."""
    w = w.clone()
    h = second_moment.clone()
    dead = h.diagonal() == 0  # inputs that never fire: their weights go, H stays invertible
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, channels = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    for lo in range(0, channels, BLOCK):
        hi = min(lo + BLOCK, channels)
        block, errors, ub = w[:, lo:hi].clone(), torch.zeros(rows, hi - lo, dtype=w.dtype), u[lo:hi, lo:hi]
        for i in range(hi - lo):
            if i % m == 0:
                saliency = block[:, i:i + m] ** 2 / ub.diagonal()[i:i + m] ** 2
                keep[:, lo + i:lo + i + m] = nm_keep(saliency, n, m)
            column = block[:, i]
            error = (column - torch.where(keep[:, lo + i], column, 0)) / ub[i, i]
            block[:, i:] -= error[:, None] * ub[i, i:][None, :]  # column i becomes its masked value
            errors[:, i] = error
        w[:, lo:hi] = block
        w[:, hi:] -= errors @ u[lo:hi, hi:]
    w[~keep] = 0
    return w, keep


def sparsify_layers(model: nn.Module, n: int, m: int, method: str, calibration: Any, ignore: set[str],
                    before_masking: Callable[[list[tuple[str, nn.Module]], SparsityReport], None] | None = None
                    ) -> SparsityReport:
    """Mask the model's eligible layers in place (`ignore`: parameter names kept dense); the report lists every
    weighted layer. `before_masking` gets the eligible (name, module) pairs first (channel permutation)."""
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "magnitude" and calibration is None:
        raise UsageError(f"method={method!r} reads input statistics: pass calibration=[batch, ...] (a few batches "
                         "shaped like example_inputs), or use method='magnitude'")
    report = SparsityReport(f"{n}:{m}", method)
    shared = _shared_weights(model)
    todo: list[tuple[LayerSparsity, nn.Module, Reader]] = []
    for name, module in weighted_layers(model):
        layer = LayerSparsity(name, tuple(module.weight.shape), False)
        report.layers.append(layer)
        if (f"{name}.weight" if name else "weight") in ignore:
            layer.reason = "ignored"
        elif id(module.weight) in shared:
            layer.reason = "weight shared with another module (tied embeddings): masking it would change both"
        else:
            layer.reason = _skip_reason(module, n, m) or ""
        if layer.reason:
            continue
        todo.append((layer, module, _reader(name, module, method)))
    if before_masking is not None and todo:
        before_masking([(layer.name, module) for layer, module, _ in todo], report)
    if method != "magnitude" and todo:
        # tokens alike: the token weights were measured for channel pruning, not for 2:4 masks
        seen = {id(r) for r in feed(model, [r for _, _, r in todo], calibration, weigh=False)}
        for layer, _, reader in todo:
            if id(reader) not in seen:
                layer.reason = "never ran on the calibration batches: no statistics to choose its mask"
        todo = [item for item in todo if not item[0].reason]
    with torch.no_grad():
        for layer, module, reader in todo:
            _mask_layer(layer, module, reader, n, m, method)
    return report


@dataclass
class _Patches(Reader):
    """A 2-d convolution's inputs as its kernel sees them: unfolded patches, one row per output pixel, columns in
    (kernel tap, channel) order so that M consecutive columns are M consecutive channels at one tap."""

    conv: nn.Module | None = None

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:  # pixels count alike
        c = self.conv
        patches = nn.functional.unfold(x.detach(), c.kernel_size, c.dilation, c.padding, c.stride)
        batch, _, pixels = patches.shape
        patches = patches.reshape(batch, c.in_channels, -1, pixels).permute(0, 3, 2, 1)
        Reader.add(self, patches.reshape(batch * pixels, -1))


def _reader(name: str, module: nn.Module, method: str) -> Reader:
    """Statistics of the layer's inputs: per channel (wanda), or X^T X over what each output reads (sparsegpt)."""
    kind, in_axis = reader_kind(module)
    if method == "sparsegpt" and kind == "conv" and any(k > 1 for k in module.kernel_size):
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return _Patches(name, "weight", in_axis, "linear", want_gram=True, conv=module)
        return Reader(name, "weight", in_axis, kind)  # no patch statistics: Wanda's mask (noted in the report)
    return Reader(name, "weight", in_axis, kind, want_gram=method == "sparsegpt")


def _columns(weight: torch.Tensor, reader: Reader) -> torch.Tensor:
    """The weight as [rows, input columns] in float64, in the order the reader's statistics use."""
    if isinstance(reader, _Patches):  # [K, C, R, S] -> [K, (R, S, C)]
        return weight.detach().double().permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return _weight_columns({"weight": weight}, reader)


def _layout(columns: torch.Tensor, weight: torch.Tensor, reader: Reader) -> torch.Tensor:
    if isinstance(reader, _Patches):
        k, c, *kernel = weight.shape
        return columns.reshape(k, *kernel, c).permute(0, 3, 1, 2).to(weight.dtype).contiguous()
    return _back_to_layout(columns.to(weight.dtype), weight, reader)


def _mask_layer(layer: LayerSparsity, module: nn.Module, reader: Reader, n: int, m: int, method: str) -> None:
    weight = module.weight
    columns = _columns(weight, reader)
    magnitude = columns.abs()
    if method == "sparsegpt" and reader.gram is not None:
        new, keep = sparsegpt(columns, reader.gram.double() / reader.n, n, m)
    else:
        if method == "sparsegpt":
            layer.reason = "no patch statistics for this convolution: Wanda's mask, with no update"
        scores = magnitude if method == "magnitude" else magnitude * (reader.s2 / reader.n).sqrt()[None, :]
        keep = nm_keep(scores, n, m)
        new = torch.where(keep, columns, 0)
    layer.kept_magnitude = _kept_fraction(magnitude, keep)
    reader.gram = None
    weight.copy_(_layout(new, weight, reader))
    layer.masked = True
    if min(layer.shape[:2]) < SMALL and not layer.reason:
        layer.reason = f"under {SMALL} channels: TensorRT usually keeps such layers dense"


def magnitude_masked(weight: torch.Tensor, kind: str, in_axis: int, n: int, m: int) -> tuple[torch.Tensor, float]:
    """The weight with the N largest |w| of every M input channels kept, and the fraction of sum |W| kept: the
    magnitude mask on a bare tensor (an ONNX initializer)."""
    reader = Reader("", "weight", in_axis, kind)
    columns = _columns(weight, reader)
    magnitude = columns.abs()
    keep = nm_keep(magnitude, n, m)
    return _layout(torch.where(keep, columns, 0), weight, reader), _kept_fraction(magnitude, keep)


def _kept_fraction(magnitude: torch.Tensor, keep: torch.Tensor) -> float:
    return float(magnitude[keep].sum() / magnitude.sum().clamp_min(1e-30))


def holds_pattern(weight: torch.Tensor, kind: str, in_axis: int, n: int, m: int) -> bool:
    """Every run of m input channels holds at most n non-zeros."""
    reader = Reader("", "weight", in_axis, kind)
    columns = _weight_columns({"weight": weight.detach()}, reader, dtype=None)
    rows, channels = columns.shape
    return bool(((columns.reshape(rows, channels // m, m) != 0).sum(-1) <= n).all())
