"""Calibration: statistics of what each channel-reading layer sees, from one no-grad pass over user
batches, and the importance and compensation built on them.

Forward pre-hooks on every layer that reads channels through a weight (nn.Linear, transformers' Conv1D,
convolutions without groups) accumulate, per input column: the count, sum x and sum x^2; and X^T X for
layers whose removed inputs can be compensated (the layer is the only reader of those channels), or for
every reader with importance="obs". X^T X is accumulated in float32 (each use takes it to float64, one
reader at a time) and the Compensate pass drops each matrix once its layer is rewritten. Tokens with massive
activations count less, by how much the next normalization divides an error there (TokenScale; ONNX files and
2:4 masks count tokens alike).

Criteria (higher = keep), all in units of the reading layer's output, so they compare across layers:
  wanda: mean_i |W_ij| * rms(x_j)            (Wanda, structured: summed over a channel's columns)
  flap:  Var(x_j) * ||W[:, j]||^2            (FLAP's fluctuation: the output error once the mean is
                                              compensated into the bias)
Compensation, for layers that are a channel's only reader:
  bias:  b' = b + W[:, P] E[x_P]            (FLAP)
  ls:    ridge regression of the removed inputs on the kept ones, folded into the kept weights and the
         bias: W_K' = W_K + W_P A, b' = b + W_P (E[x_P] - A E[x_K]), A = S_PK (S_KK + lambda I)^-1 with S
         the input covariance. Exact when the removed inputs are linear in the kept ones. A regression fits
         its data: every HOLDOUT-th calibration batch is held out, and each layer takes the ridge (of RIDGES,
         bias-only included) whose update, fitted on the other batches, leaves the least output error on the
         held-out ones (choose_ridge); the final update is fitted on all batches.

obs (structured Optimal Brain Surgeon: SPA / OBSPA, ZipLM, SlimGPT), the error ls leaves, as the score:
  Treat the bias as the weight of a constant input 1 that is never removed, so H = E[x~ x~^T] over
  x~ = [x; 1]. Removing columns P and updating the rest optimally costs err(P) = tr(W_P [(H^-1)_PP]^-1 W_P^T)
  with update dW_K = -W_P [(H^-1)_PP]^-1 (H^-1)_PK. Eliminating the constant row (Schur complement) makes the
  x block of H^-1 the inverse covariance S^-1, and block inversion gives [(S^-1)_PP]^-1 (S^-1)_PK =
  -S_PK S_KK^-1 = -A: dW_K = W_P A and the bias column's update W_P (E[x_P] - A E[x_K]) are exactly ls above,
  so compensate=True reuses that code. err(P) = tr(W_P [(S^-1)_PP]^-1 W_P^T) is _errors' ls branch: one
  implementation; "obs" differs from flap in collecting X^T X for every reader (multi-reader channels and
  convolutions too: one float64 C_in x C_in matrix per reader, fine for CNNs and small transformers, not for
  billion-parameter LLMs), in scoring this way whatever `compensate` is, and in taking out what the ridge
  adds: with M = (S + lam I)^-1, [M_PP]^-1 = S_PP + lam I - S_PK (S_KK + lam I)^-1 S_KP, and the error
  of ls's ridge update is that less lam (I + A A^T), A = [M_PP]^-1 M_PK (the plain dampened score
  overstates it by about lam ||W_P||^2, a magnitude term that swamps small conditional variances). Each
  component is scored with the others kept (one-shot OBS, no re-scoring as neighbours go). Its columns in
  one reader go together (a head's head_dim columns: the block form). Convolutions take each pixel's
  channel vector as a sample, kernel taps as extra output rows: spatial correlations between neighbouring
  pixels are not modelled, and zero padding sees the bias shift too. With X^T X, ls also rewrites a
  convolution that is its channels' only reader (the same A at every pixel and kernel tap).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis.channels import Analysis
from ..errors import GraphPruneError
from ..ir.from_torch import eval_mode, normalize_inputs
from .pipeline import Pass

log = logging.getLogger(__name__)

ROWS = 256  # input rows converted to float at a time while statistics accumulate
RIDGE = 1e-2  # times the mean kept-input variance: keeps A stable when inputs are nearly collinear
HOLDOUT = 4  # every 4th calibration batch is held out to choose each layer's ridge (compensate="ls")
# ridge strengths tried on the held-out batches, times the mean kept-input variance (inf: bias-only compensation)
RIDGES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf"))
# wider layers keep RIDGE: the choice takes an eigendecomposition and about five |K| x |K| float64 matrices (a 70B
# model's 28672-wide MLP: hours and 30 GB), and their calibration (hundreds of thousands of tokens) overfits less
CHOOSE_MAX = 8192


@dataclass
class Reader:
    """One layer that reads channels: its weight's name in the plan and its input statistics."""

    module: str
    weight: str  # name of the weight as the plan knows it (tied weights under their first name)
    in_axis: int  # weight axis of the input columns
    kind: str  # "linear" (x @ W.T), "conv1d_hf" (x @ W), "conv"
    n: int = 0
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    want_gram: bool = False
    gram_dtype: torch.dtype = torch.float32  # float64 where one reader's matrix is used at a time (prune-hf)
    columns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # component per column
    # (kept, removed) input columns when the plan is known before the statistics (prune-hf's second pass): then
    # X_K^T X_K and X_K^T X_P are accumulated in float64 instead of the whole X^T X, all that compensation reads
    split: tuple[torch.Tensor, torch.Tensor] | None = None
    kk: torch.Tensor | None = None
    kp: torch.Tensor | None = None
    # held-out batches (see hold_out): gathered apart as well, so least squares can choose its ridge on data it was
    # not fitted on; cpu() counts them into this reader's totals too
    holding: bool = False
    holdout: Reader | None = None

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Count the rows of `x` (each token, or each pixel of a convolution's input), each by its `weight` (one per
        row, see TokenScale; None: all alike)."""
        if self.holding and (self.want_gram or self.split is not None):
            if self.holdout is None:
                self.holdout = Reader(self.module, self.weight, self.in_axis, self.kind, want_gram=self.want_gram,
                                      gram_dtype=self.gram_dtype, columns=self.columns, split=self.split)
            self.holdout.add(x, weight)
            return
        x = x.detach()
        if self.kind == "conv":
            x = x.movedim(1, -1)
        x = x.reshape(-1, x.shape[-1])
        if self.kind == "conv":  # pixels count alike
            weight = None
        if weight is not None:  # mean 1 over the batch: sums stay on the scale of token counts
            weight = (weight / weight.mean()).to(x.device, torch.float32)
        if self.s1 is None:  # on the inputs' device (a GPU sums there); cpu() brings them back for the math
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros_like(self.s1)
            if self.want_gram:  # float32: half the memory of float64 (C_in^2 per reader adds up in an LLM)
                self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=self.gram_dtype, device=x.device)
            if self.split is not None:
                k, p = (i.to(x.device) for i in self.split)
                self.split = (k, p)
                self.kk = torch.zeros(len(k), len(k), dtype=torch.float64, device=x.device)
                self.kp = torch.zeros(len(k), len(p), dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        for i in range(0, x.shape[0], ROWS):  # a slab of rows at a time: the float copies of a wide input stay small
            part = x[i:i + ROWS].float()
            if weight is not None:  # sqrt(w) x: every sum below, first and second order, counts the row w times
                root = weight[i:i + ROWS, None].sqrt()
                part = part * root
                self.s1 += (part * root).sum(0, dtype=torch.float64)
            else:
                self.s1 += part.sum(0, dtype=torch.float64)
            self.s2 += part.square().sum(0, dtype=torch.float64)
            if self.gram is not None:  # accumulated in place; the users take it to float64 one at a time
                wide = part.to(self.gram.dtype)
                self.gram.addmm_(wide.T, wide)
            if self.split is not None:
                kept = part[:, self.split[0]].double()
                self.kk.addmm_(kept.T, kept)
                self.kp.addmm_(kept.T, part[:, self.split[1]].double())

    def cpu(self) -> Reader:
        """The statistics on the CPU, where importance and compensation use them, the held-out batches counted in
        (the holdout keeps its own copy)."""
        self.s1, self.s2, self.gram, self.kk, self.kp = (None if t is None else t.cpu() for t in (
            self.s1, self.s2, self.gram, self.kk, self.kp))
        if self.split is not None:
            self.split = tuple(i.cpu() for i in self.split)
        held = self.holdout
        if held is not None and held.n:
            held.cpu()
            for name in ("s1", "s2", "gram", "kk", "kp"):
                mine, theirs = getattr(self, name), getattr(held, name)
                if mine is None:  # no batch was fitted: the held-out ones are all there is
                    setattr(self, name, None if theirs is None else theirs.clone())
                else:
                    mine += theirs
            self.holdout = held if self.n else None
            self.n += held.n
        return self

    @property
    def bias_name(self) -> str:
        """The name of the reading layer's bias, whether it has one yet or compensation adds it."""
        return self.module + ".bias" if self.module else "bias"

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.s2 / max(self.n, 1) - self.mean ** 2).clamp_min(0)


def reader_kind(module: nn.Module) -> tuple[str, int] | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return "linear", 1
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed:
        return "conv", 1
    if w.ndim == 2 and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d_hf", 0
    return None


def collect(model: nn.Module, an: Analysis, batches: Any, tensors: dict[str, torch.Tensor],
            grams: bool = False) -> list[Reader]:
    """Run the calibration batches through the dense model once and gather every reader's statistics;
    grams=True: X^T X for every reader (importance="obs"), not only where compensation needs it."""
    return feed(model, make_readers(model.named_modules(), an, tensors, grams), batches)


def feed(model: nn.Module, readers: list[Reader], batches: Any, weigh: bool = True) -> list[Reader]:
    """One no-grad pass of the calibration batches through the model, each reader gathering its module's inputs
    (weigh: each token by TokenScale); the readers that saw data, with their statistics on the CPU."""
    if batches is None or isinstance(batches, (torch.Tensor, dict)) or not hasattr(batches, "__iter__"):
        raise GraphPruneError("calibration must be a list (or other iterable) of batches, each shaped like "
                              "example_inputs: a tensor, a tuple of inputs or a dict of keyword inputs")
    started = time.perf_counter()
    count = 0
    with hooked(model.named_modules(), readers, weigh), eval_mode(model), torch.no_grad():
        for batch in batches:
            args, kwargs = normalize_inputs(batch)
            hold_out(readers, count)
            model(*args, **kwargs)
            count += 1
            log.info("calibration batch %d done (%.1f s)", count, time.perf_counter() - started)
    if count == 0:
        raise GraphPruneError("calibration is empty: pass at least one batch")
    return [r.cpu() for r in readers if r.n]


def make_readers(modules: Any, an: Analysis, tensors: dict[str, torch.Tensor], grams: bool = False) -> list[Reader]:
    """A Reader for every (name, module) that reads prunable channels through a weight found in `tensors` and in
    the analysis; X^T X is wanted where compensation will need it (or everywhere with grams=True)."""
    name_of = {id(t): n for n, t in tensors.items()}
    readers = []
    for module_name, module in modules:
        found = reader_kind(module)
        if found is None or id(module.weight) not in name_of:
            continue
        weight = name_of[id(module.weight)]
        value = an.graph.params.get(weight)
        if value is None:
            continue
        cols = an.component[an.elements(value, found[1])]
        if an.prunable[cols].any():
            readers.append(Reader(module_name, weight, found[1], found[0], columns=cols))
    readers_of = _readers_per_component(readers, len(an.prunable))
    for r in readers:  # compensation needs X^T X only where this layer is a channel's only reader
        sole = bool((readers_of[r.columns[an.prunable[r.columns]]] == 1).any()) and r.kind != "conv"
        r.want_gram = grams or sole
    return readers


def hold_out(readers: list[Reader], index: int) -> None:
    """Before calibration batch `index` (from 0): every HOLDOUT-th batch is held out, gathered apart by the readers
    whose least squares can use it (with fewer than HOLDOUT batches none is, and the ridge stays RIDGE)."""
    for r in readers:
        r.holding = index % HOLDOUT == HOLDOUT - 1


class TokenScale:
    """Token weights for the statistics. What a layer adds to a residual stream reaches the later layers through a
    normalization (LayerNorm, RMSNorm) that divides each token by its rms: an error at a token whose stream is loud
    costs little. Counted alike, the few tokens with massive activations (an LLM's first token, its attention sink:
    99% of X^T X in SmolLM2's layer-28 down_proj) decide the fit for all the others. So a token louder than the
    batch's median one (h: the stream entering the last normalization run before the reading layer) counts
    median(mean(h^2)) / mean(h_t^2), the others alike (weighting every token so was worse; README, "calibration").
    Rows that are not that normalization's tokens (another shape: pooled, windowed, a convolution) count alike; a
    cross-attention reading as many encoder tokens as the decoder has takes the decoder's weights."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.weight: torch.Tensor | None = None

    def see(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(h, torch.Tensor) and h.is_floating_point() and h.dim() >= 2:
            self.shape = tuple(h.shape[:-1])
            loud = h.detach().float().square().mean(-1).reshape(-1).clamp_min(1e-12)
            self.weight = (loud.median() / loud).clamp(max=1.0)

    def of(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weights of x's rows: those of the last normalization's tokens if x has its token layout."""
        return self.weight if self.shape is not None and tuple(x.shape[:-1]) == self.shape else None

    @contextlib.contextmanager
    def watching(self, modules: Any):
        hooks = [m.register_forward_pre_hook(self.see, with_kwargs=True) for m in modules if normalizes_tokens(m)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            self.shape = self.weight = None


def normalizes_tokens(module: nn.Module) -> bool:
    """A normalization over each token's features (torch's and transformers' / timm's LayerNorm and RMSNorm
    classes; not BatchNorm, GroupNorm or a channels-first LayerNorm2d)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@contextlib.contextmanager
def hooked(modules: Any, readers: list[Reader], weigh: bool = True):
    """Feed each reader the inputs its module sees while the block runs (weigh: each token by TokenScale)."""
    by_name = dict(modules)
    scale = TokenScale()
    hooks = [by_name[r.module].register_forward_pre_hook(lambda _m, args, r=r: r.add(args[0], scale.of(args[0])))
             for r in readers]
    try:
        with scale.watching(by_name.values() if weigh else ()):
            yield readers
    finally:
        for h in hooks:
            h.remove()


def _readers_per_component(readers: list[Reader], n_comp: int) -> np.ndarray:
    """How many reading layers see each component (compensation applies where it is exactly one)."""
    count = np.zeros(n_comp, dtype=np.int64)
    for r in readers:
        np.add.at(count, np.unique(r.columns), 1)
    return count


def whole_family_readers(an: Analysis, readers: list[Reader]) -> list[tuple[Reader, np.ndarray]]:
    """(reader, its components) for every reader that alone reads one whole prunable family (an MLP's down_proj,
    a layer's o_proj): the families whose widths can be decided, and whose members chosen, per layer."""
    family_of = np.full(len(an.prunable), -1)
    for f, fam in enumerate(an.families):
        family_of[np.asarray(fam, dtype=np.int64)] = f
    readers_of = _readers_per_component(readers, len(an.prunable))
    out = []
    for r in readers:
        comps = np.unique(r.columns)
        family = family_of[comps[0]]
        if (family >= 0 and (family_of[comps] == family).all() and len(an.families[family]) == len(comps)
                and an.prunable[comps].all() and (readers_of[comps] == 1).all()):
            out.append((r, comps))
    return out


def _weight_columns(tensors: dict[str, torch.Tensor], r: Reader, dtype: torch.dtype | None = torch.float64
                    ) -> torch.Tensor:
    """The reader's weight as [out, in] (conv kernels flattened into the output side), in `dtype` (None: its own),
    on the CPU where the statistics are (a no-op for a CPU model; updates go back to the model's device when used)."""
    w = tensors[r.weight].detach().cpu()
    w = w if dtype is None else w.to(dtype)
    if r.kind == "conv1d_hf":
        return w.T
    return w.movedim(1, -1).reshape(-1, w.shape[1]) if r.kind == "conv" else w


def _writable(w: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """`w` from _weight_columns, safe to write: a copy where it is the model's own tensor (a float64 weight)."""
    return w.clone() if w.untyped_storage().data_ptr() == original.untyped_storage().data_ptr() else w


class CalibratedImportance:
    """Wanda, FLAP-style or OBS output error, per component; inf where no reader was seen.

    "flap" scores a component by the error its removal leaves in the reading layer's output, under the
    compensation that will follow: E||W_P x_P||^2 with none, tr(W_P Cov_PP W_P^T) once the mean goes into
    the bias (FLAP's fluctuation, with the cross terms between a head's columns), and with least squares
    the covariance of x_P given the kept inputs, (Cov^-1)_PP^-1 (an optimal-brain-surgeon score), measured on
    the held-out calibration batches (what the fitted update really leaves on data it did not see: on few
    tokens the in-sample value promises more than the update delivers) where there are any. Readers
    without X^T X (a residual-stream channel read by many layers) use the per-column diagonal. "obs" is
    that last score on every reader, whatever the compensation (see the module docstring).
    """

    absolute = True  # scores share one unit across layers: select compares them raw

    def __init__(self, criterion: str, readers: list[Reader], compensate: str | bool = False, release: bool = False):
        if criterion not in ("wanda", "flap", "obs"):
            raise ValueError(f"unknown calibrated criterion {criterion!r}")
        self.criterion, self.readers, self.compensate = criterion, readers, compensate or "none"
        self.release = release  # drop each X^T X once scored (nothing later needs it: prune-hf's first pass)

    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        n_comp = len(an.prunable)
        score = np.zeros(n_comp)
        seen = np.zeros(n_comp, dtype=bool)
        for r in self.readers:
            if self.criterion == "wanda":
                t = tensors[r.weight]
                rows = t.numel() // max(t.shape[r.in_axis], 1)
                col = (_column_sums(t, r.in_axis, square=False) / max(rows, 1) * (r.s2 / r.n).sqrt()).numpy()
            elif r.gram is None:
                if self.criterion == "obs":
                    raise ValueError(f"importance='obs' needs X^T X of {r.module or r.weight}: collect(grams=True)")
                moment = r.s2 / r.n if self.compensate == "none" else r.var
                col = (moment * _column_sums(tensors[r.weight], r.in_axis, square=True)).numpy()
            else:
                col = self._errors(r, _weight_columns(tensors, r, dtype=None), an)
            score += np.bincount(r.columns, weights=col, minlength=n_comp)
            seen[r.columns] = True
        score[~seen] = np.inf  # no calibrated reader: nothing says it is safe to remove
        return score

    def _errors(self, r: Reader, w: torch.Tensor, an: Analysis) -> np.ndarray:
        """Per column, its component's output error (put on the component's first column)."""
        moment = precision = held = None
        if self.compensate == "ls" and self.criterion == "flap" and r.holdout is not None and len(r.s1) <= CHOOSE_MAX:
            precision, held = _held_out_residuals(r)
        elif self.compensate == "ls" or self.criterion == "obs":
            precision, lam = _ridge_precision(r, release=self.release)
        else:
            moment = (_covariance(r, self.release) if self.compensate != "none" else _second_moment(r, self.release))
        out = np.zeros(len(r.columns))
        comps = r.columns
        order = np.argsort(comps, kind="stable")
        starts = np.concatenate([[0], np.nonzero(np.diff(comps[order]))[0] + 1])
        for lo, hi in zip(starts, np.concatenate([starts[1:], [len(order)]])):
            cols = torch.from_numpy(order[lo:hi])
            if not an.prunable[comps[order[lo]]]:
                continue
            if precision is None:
                block = moment[cols][:, cols]
            elif held is not None:  # held-out covariance of the residual x_P - E[x_P | x_K] fitted without it
                inv = torch.linalg.inv(precision[cols][:, cols])
                block = inv @ held[cols][:, cols] @ inv
            else:
                block = torch.linalg.inv(precision[cols][:, cols])
                if self.criterion == "obs":  # less what the ridge adds: the error of ls's ridge update
                    a = block @ precision[cols]  # [I, A] over (P, K): a @ a.T = I + A A^T
                    block = block - lam * (a @ a.T)
            m = w[:, cols].double()
            out[order[lo]] = max(float(((m @ block) * m).sum()), 0.0)
        return out


def _held_out_residuals(r: Reader) -> tuple[torch.Tensor, torch.Tensor]:
    """(Theta, Theta D Theta): Theta = (S + lam I)^-1 from the batches not held out, D the held-out second moment
    about their mean. The least-squares residual of inputs P given the rest is (Theta_PP)^-1 (Theta (x - m))_P, so
    its held-out covariance is (Theta_PP)^-1 (Theta D Theta)_PP (Theta_PP)^-1: what removing P and compensating
    really leaves on data the fit did not see."""
    n_f, n_h, m_f, m_h = _split_means(r)
    g_h = r.holdout.gram.to(torch.float64, copy=True)  # never the holdout's own (compensation reads it later)
    s = _fitted_covariance(r.gram.double(), g_h, n_f, m_f, m_f)
    s.diagonal().add_(RIDGE * float(s.diagonal().mean().clamp_min(1e-12)))
    theta = torch.linalg.inv(s)
    del s
    d = _held_about_fitted_mean(g_h, n_h, m_h, m_h, m_f, m_f)
    return theta, theta @ d @ theta


def _split_means(r: Reader) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(rows fitted, rows held out, fitted mean, held-out mean) of a reader whose totals include its holdout."""
    held = r.holdout
    n_f = r.n - held.n
    return n_f, held.n, (r.s1 - held.s1) / n_f, held.s1 / held.n


def _fitted_covariance(total: torch.Tensor, held: torch.Tensor, n_f: int, m_a: torch.Tensor, m_b: torch.Tensor
                       ) -> torch.Tensor:
    """A block of the covariance of the batches not held out, from its sums x_a x_b^T over all and held-out rows."""
    return (total - held).div_(n_f).addr_(m_a, m_b, alpha=-1)


def _held_about_fitted_mean(held: torch.Tensor, n_h: int, h_a: torch.Tensor, h_b: torch.Tensor, f_a: torch.Tensor,
                            f_b: torch.Tensor) -> torch.Tensor:
    """A block of the held-out second moment about the FITTED mean (h, f: held-out and fitted means), in place of
    its held-out sums: E_held[(x_a - f_a)(x_b - f_b)^T], what an update subtracting the fitted mean leaves."""
    return held.div_(n_h).addr_(h_a, f_b, alpha=-1).addr_(f_a, h_b, alpha=-1).addr_(f_a, f_b)


def _second_moment(r: Reader, release: bool = False) -> torch.Tensor:
    """E[x x^T] in float64: a new matrix, or with release=True a float64 gram itself (no longer the reader's)."""
    gram = r.gram
    if release:
        r.gram = None
        if gram.dtype == torch.float64:
            return gram.div_(max(r.n, 1))
    return gram.to(torch.float64, copy=True).div_(max(r.n, 1))  # a float64 gram is the reader's: never in place


def _covariance(r: Reader, release: bool = False) -> torch.Tensor:
    """The input covariance in float64, computed in place of E[x x^T]."""
    return _second_moment(r, release).addr_(r.mean, r.mean, alpha=-1)


def _ridge_precision(r: Reader, release: bool = False) -> tuple[torch.Tensor, float]:
    """((cov + lam I)^-1, lam), lam = RIDGE x the mean input variance, in float64, inverted in place through the
    Cholesky factor (LAPACK potrf + potri): one C_in x C_in float64 matrix, where torch holds two to four (an
    8192-wide LLM MLP: 0.5 GB instead of 1-2 GB). release=True drops X^T X as soon as it is read. A matrix that
    is not numerically positive definite (NaN or inf inputs) takes the general inverse, or raises once released."""
    from scipy.linalg import lapack

    m = _covariance(r, release)
    lam = RIDGE * float(m.diagonal().mean().clamp_min(1e-12))
    m.diagonal().add_(lam)
    fortran = m.numpy().T  # the same memory in column-major order: LAPACK works on it without a copy
    factor, info = lapack.dpotrf(fortran, lower=1, overwrite_a=1, clean=0)
    if info == 0:
        _, info = lapack.dpotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        if release:
            raise GraphPruneError(f"the input covariance of {r.module or r.weight} is not positive definite "
                                  "(NaN or inf activations in the calibration data?)")
        m = _covariance(r)
        m.diagonal().add_(lam)
        return torch.linalg.inv(m), lam
    del factor, fortran
    _symmetrize_from_upper(m)  # potri wrote the column-major lower triangle: the row-major upper one
    return m, lam


def _symmetrize_from_upper(m: torch.Tensor, block: int = 512) -> None:
    """Copy the upper triangle of a square matrix onto its lower one, in place, a block of rows at a time."""
    for lo in range(0, m.shape[0], block):
        hi = min(lo + block, m.shape[0])
        m[lo:hi, :lo] = m[:lo, lo:hi].T
        diag = m[lo:hi, lo:hi]
        diag.copy_(diag.triu() + diag.triu(1).T)


def _column_sums(t: torch.Tensor, in_axis: int, square: bool) -> torch.Tensor:
    """Per input column of weight `t` (input axis `in_axis`), the float64 sum of w^2 (square) or |w| over
    everything else, a slab of rows at a time: no float64 copy of a large weight (an LM head) is made."""
    t = t.detach()
    out = torch.zeros(t.shape[in_axis], dtype=torch.float64)
    if not t.numel():
        return out
    step = max(1, (1 << 22) // max(t[0].numel(), 1))  # about 4M elements per slab
    for lo in range(0, t.shape[0], step):
        c = t[lo:lo + step].to(torch.float64, copy=True)  # never the model's own memory
        c = c.mul_(c) if square else c.abs_()
        dims = [d for d in range(c.ndim) if d != in_axis]
        part = c.sum(dims) if dims else c
        if in_axis == 0:
            out[lo:lo + step] += part
        else:
            out += part
    return out


def compensate(readers: list[Reader], an: Analysis, gone: np.ndarray, tensors: dict[str, torch.Tensor],
               method: str, release: bool = False, report: list | None = None
               ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, int]]]:
    """New full-shape weights and biases for readers that lost inputs, and the biases added, each as
    (bias name, weight name, weight axis of the outputs). release=True drops each reader's X^T X once its turn
    is over (the Compensate pass, its last user), so the matrices go one by one as the updates come. `report`
    gets, per least-squares layer, the ridge it chose and the data it chose by (see choose_ridge)."""
    if method not in ("ls", "bias"):
        raise ValueError(f"compensate must be True, 'ls', 'bias' or False, got {method!r}")
    readers_of = _readers_per_component(readers, len(an.prunable))
    updates: dict[str, torch.Tensor] = {}
    added: list[tuple[str, str, int]] = []
    for r in readers:
        try:
            _compensate_one(r, readers_of, gone, tensors, method, updates, added, release,
                            report if report is not None else [])
        finally:
            if release:
                r.gram = r.holdout = None
    return updates, added


def _compensate_one(r: Reader, readers_of: np.ndarray, gone: np.ndarray, tensors: dict[str, torch.Tensor],
                    method: str, updates: dict[str, torch.Tensor], added: list[tuple[str, str, int]],
                    release: bool, report: list) -> None:
    removed = gone[r.columns]
    # only where this reader is the removed channels' sole reader: it then sees exactly the pruned tensor
    if not removed.any() or (readers_of[r.columns[removed]] != 1).any():
        return
    p_idx = torch.from_numpy(np.nonzero(removed)[0])
    k_idx = torch.from_numpy(np.nonzero(~removed)[0])
    a = None
    if method == "ls" and (r.gram is not None or r.kk is not None):
        ridge = RIDGE
        if r.holdout is not None and len(k_idx) <= CHOOSE_MAX:
            choice = choose_ridge(r, k_idx, p_idx, _weight_columns(tensors, r, dtype=None)[:, p_idx].double())
            report.append(choice)
            ridge = choice["ridge"]
        s_kk, s_kp = _covariance_blocks(r, k_idx, p_idx)
        if release:
            r.gram = r.kk = r.kp = r.holdout = None
        if ridge is not None:  # None: bias-only did best on the held-out batches
            lam = ridge * float(s_kk.diagonal().mean().clamp_min(1e-12))
            s_kk.diagonal().add_(lam)
            a = torch.from_numpy(_spd_solve(s_kk, s_kp)).T
        del s_kk, s_kp  # before the float64 weight is made
    w = _weight_columns(tensors, r)
    w_p = w[:, p_idx]
    shift = w_p @ r.mean[p_idx]
    if a is not None:
        delta = w_p @ a  # [out, |K|]
        shift = shift - delta @ r.mean[k_idx]
        original = tensors[r.weight]
        w = _writable(w, original)
        w[:, k_idx] += delta
        del delta, a
        updates[r.weight] = _back_to_layout(w, original, r)
    bias_name = r.bias_name
    old_bias = tensors.get(bias_name)
    if r.kind == "conv":
        shift = shift.reshape(tensors[r.weight].shape[0], -1).sum(1)  # kernel taps all see the mean
    if old_bias is None:
        added.append((bias_name, r.weight, 1 if r.kind == "conv1d_hf" else 0))
        base = torch.zeros(shift.shape[0], dtype=torch.float64)
    else:
        base = old_bias.detach().double()
    updates[bias_name] = (base + shift).to(tensors[r.weight].dtype)


def choose_ridge(r: Reader, k_idx: torch.Tensor, p_idx: torch.Tensor, w_p: torch.Tensor) -> dict[str, Any]:
    """The ridge (of RIDGES, None for bias-only) whose least-squares update, fitted on the batches not held out,
    leaves the least output error on the held-out ones: the removed inputs are predicted as
    x_P ~ m_P + A (x_K - m_K), A = S_PK (S_KK + lam I)^-1 (m, S: fitted mean and covariance), and the error is
    E_held ||W_P (x_P - m_P - A (x_K - m_K))||^2. With S_KK = Q diag(e) Q^T every ridge costs O(|K|^2): A's
    dependence on lam is the diagonal 1/(e + lam). Returns the ridge and, for the plan, the layer, the tokens
    fitted and held out, and the held-out error relative to bias-only's (None where the removed-removed block
    was not gathered: prune-hf's split statistics)."""
    n_f, n_h, m_f, m_h = _split_means(r)
    all_kk, all_kp, _ = _raw_blocks(r, k_idx, p_idx)
    h_kk, h_kp, h_pp = _raw_blocks(r.holdout, k_idx, p_idx, pp=True)
    mk, mp, hk, hp = m_f[k_idx], m_f[p_idx], m_h[k_idx], m_h[p_idx]
    s_kk = _fitted_covariance(all_kk, h_kk, n_f, mk, mk)
    s_kp = _fitted_covariance(all_kp, h_kp, n_f, mk, mp)
    del all_kk, all_kp
    d_kk = _held_about_fitted_mean(h_kk, n_h, hk, hk, mk, mk)
    d_kp = _held_about_fitted_mean(h_kp, n_h, hk, hp, mk, mp)
    scale = float(s_kk.diagonal().mean().clamp_min(1e-12))
    e, q = torch.linalg.eigh(s_kk)
    del s_kk
    h = w_p @ (q.T @ s_kp).T  # [out, K]: W_P A = h diag(1 / (e + lam)) Q^T
    cross = ((q.T @ d_kp @ w_p.T) * h.T).sum(1)  # tr(W_P A D_KP W_P^T) = cross . s
    quad = (q.T @ d_kk @ q).mul_(h.T @ h)  # tr(W_P A D_KK A^T W_P^T) = s . quad s
    errors = []
    for ridge in RIDGES:
        s = 1.0 / (e.clamp_min(0) + ridge * scale)
        errors.append(float(s @ quad @ s - 2 * (s @ cross)))  # less the bias-only error, common to all
    best = int(np.argmin(errors))
    base = None
    if h_pp is not None:
        d_pp = _held_about_fitted_mean(h_pp, n_h, hp, hp, mp, mp)
        base = float(((w_p @ d_pp) * w_p).sum())
    ridge = RIDGES[best]
    return {"module": r.module or r.weight, "ridge": None if np.isinf(ridge) else ridge, "fitted_tokens": n_f,
            "held_out_tokens": n_h, "error_vs_bias": None if not base else max(base + errors[best], 0.0) / base}


def _raw_blocks(r: Reader, k_idx: torch.Tensor, p_idx: torch.Tensor, pp: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sums of x_K x_K^T, x_K x_P^T (and x_P x_P^T with pp=True, where X^T X was gathered whole) as new float64
    matrices."""
    if r.kk is not None:
        return r.kk.clone(), r.kp.clone(), None
    g = r.gram
    out = (g[k_idx][:, k_idx].double(), g[k_idx][:, p_idx].double())
    return (*out, g[p_idx][:, p_idx].double() if pp else None)


def _covariance_blocks(r: Reader, k_idx: torch.Tensor, p_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept-kept and kept-removed blocks of the input covariance, float64: computed in place of the blocks
    gathered as such, or built a slab of rows at a time from X^T X (never the whole matrix in float64)."""
    n, mean = max(r.n, 1), r.mean
    if r.kk is not None:  # accumulated as such (Reader.split): used in place
        if not (torch.equal(r.split[0], k_idx) and torch.equal(r.split[1], p_idx)):
            raise ValueError(f"{r.module}: statistics were gathered for another set of removed inputs")
        return (r.kk.div_(n).addr_(mean[k_idx], mean[k_idx], alpha=-1),
                r.kp.div_(n).addr_(mean[k_idx], mean[p_idx], alpha=-1))
    s_kk = torch.empty(len(k_idx), len(k_idx), dtype=torch.float64)
    s_kp = torch.empty(len(k_idx), len(p_idx), dtype=torch.float64)
    for lo in range(0, len(k_idx), 1024):
        rows = r.gram.index_select(0, k_idx[lo:lo + 1024])
        s_kk[lo:lo + 1024] = rows.index_select(1, k_idx)
        s_kp[lo:lo + 1024] = rows.index_select(1, p_idx)
    s_kk.div_(n).addr_(mean[k_idx], mean[k_idx], alpha=-1)
    s_kp.div_(n).addr_(mean[k_idx], mean[p_idx], alpha=-1)
    return s_kk, s_kp


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """a^-1 b for symmetric positive definite `a`, factored in place (a is overwritten). A covariance built from a
    float32 X^T X less the means' outer product can come out slightly indefinite where inputs are nearly collinear
    and the ridge is small: a growing multiple of its mean diagonal is then added until it factors."""
    from scipy.linalg import cho_factor, cho_solve

    if not torch.isfinite(a).all():
        raise GraphPruneError("an input covariance holds NaN or inf (NaN or inf activations in the calibration data?)")
    diagonal = a.diagonal().clone()
    scale = float(diagonal.abs().mean().clamp_min(1e-30))
    for jitter in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        if jitter:  # the failed try overwrote the diagonal and the row-major upper triangle: rebuilt from the lower
            _symmetrize_from_upper(a.T)
            a.diagonal().copy_(diagonal + jitter * scale)
        try:
            factor = cho_factor(a.numpy().T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        return cho_solve(factor, b.numpy(), check_finite=False)
    raise GraphPruneError("an input covariance is not positive definite even with 1% of its mean variance added to "
                          "the diagonal: check the calibration data")


def _back_to_layout(w: torch.Tensor, like: torch.Tensor, r: Reader) -> torch.Tensor:
    if r.kind == "conv1d_hf":
        w = w.T
    elif r.kind == "conv":  # undo _weight_columns: [out * taps, in] -> [out, in, *kernel]
        w = w.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return w.to(like.dtype).contiguous()


class Cut:
    """Context: the model with some readers' removed input columns zeroed and their compensated weights and biases
    swapped in (cut(reader, gone, updates), any number of times); everything swapped back on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[nn.Module, torch.Tensor, Any]] = []

    def __call__(self, r: Reader, gone: np.ndarray, updates: dict[str, torch.Tensor]) -> None:
        module = self.model.get_submodule(r.module)
        self.saved.append((module, module.weight.data, module.bias))
        w = updates.get(r.weight, module.weight.data).to(module.weight.device, copy=True)
        w.index_fill_(r.in_axis, torch.from_numpy(np.nonzero(gone[r.columns])[0]).to(w.device), 0)
        module.weight.data = w
        bias = updates.get(r.bias_name)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(w.device), requires_grad=False)

    def __enter__(self) -> Cut:
        return self

    def __exit__(self, *exc) -> bool:
        for module, weight, bias in reversed(self.saved):
            module.weight.data = weight
            module.bias = bias
        self.saved.clear()
        return False


class Compensate(Pass):
    """Rewrite the layers that lost inputs from the calibration statistics, into the plan (see the module
    docstring): the plan carries the updated tensors and the biases it added."""

    requires = ("an", "tensors", "plan")
    ensures = ("plan",)

    def __init__(self, readers: list[Reader], method: str):
        self.readers, self.method = readers, method

    def __call__(self, job) -> None:
        plan = job.plan
        tokens = self.readers[0].n if self.readers else 0
        # the pass is the statistics' last user: each X^T X is dropped as soon as its layer is done
        plan.set_compensation(*compensate(self.readers, job.an, plan._gone, job.tensors, self.method, release=True,
                                          report=plan.ridges))
        plan.notes.append(f"compensation ({self.method}) updated {len(plan.updates)} tensors from {tokens} "
                          f"calibration tokens")
        fixed_ridge_note(plan, self.method)


def fixed_ridge_note(plan, method: str) -> None:
    if method == "ls" and not plan.ridges:
        plan.notes.append(f"least squares used the fixed ridge {RIDGE:g}: with {HOLDOUT} or more calibration "
                          f"batches, every {HOLDOUT}th is held out to choose each layer's ridge")
