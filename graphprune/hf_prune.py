"""Prune a Hugging Face causal-LM checkpoint larger than memory, one decoder layer at a time (`graphprune prune-hf`).

The model is never whole in memory. Its skeleton is built with parameters on the meta device; the inputs of the
first decoder layer are captured for every calibration batch (the embedding is the only weight loaded for it);
then each layer is read from the safetensors shards, run on those inputs while its readers' statistics are
gathered (X^T X only where compensation or the criterion needs it, float32, freed with the layer), and its
outputs become the next layer's inputs.

Two passes. The first scores every layer's channels and heads and keeps only the score table (L x C floats);
the selection then runs on the whole model's channel analysis, traced on the meta device, exactly as
graphprune.plan would run it on the loaded model (uniform or global allocation, the same budget arithmetic),
so both give the same plan. The second pass runs the layers again, compensates those that lost inputs, and
writes each slimmed layer to the output shards as soon as it is done.

`propagate` says what the next layer sees: "dense" (the default) the unpruned layer's outputs, so every layer's
statistics are those of the original model and the result equals in-memory graphprune.prune; "pruned" the
pruned and compensated layer's outputs (SparseGPT-style), so each layer's compensation is fitted to the inputs
it will see in the pruned model.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import analyse
from .backends import deci
from .backends.torch import masked_in_place, sliced
from .errors import GraphPruneError, UsageError
from .files import atomic_directory
from .hf_inspect import _build, _layer_count, _meta_ids, _stack, _truncated, load_config
from .ir.from_torch import eval_mode
from .ir.hf_config import empty_weights
from .passes.allocation import Allocate, standardized_fluctuation
from .passes.calibration import (CalibratedImportance, Cut, _readers_per_component, compensate, hold_out, hooked,
                                 make_readers)
from .passes.pipeline import PLAN, Job, check_options, gone_from_removed, parse_budget, run
from .passes.select import LLM_ROUND
from .plan import PruningPlan, named_tensors
from .shards import ShardReader, ShardWriter

log = logging.getLogger(__name__)

PLAN_FILE = "graphprune_plan.json"
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.(safetensors|bin)\.index\.json$")
PROPAGATE = ("dense", "pruned")


@dataclass
class Result:
    """What prune_pretrained did: the plan (every removed index, by tensor name), where it wrote, what it cost."""

    plan: PruningPlan
    output: str
    seconds: float
    peak_rss_bytes: int
    layout: str  # "transformers" (config.json describes the widths), "graphprune" (the plan does) or "deci"

    @property
    def uniform_config(self) -> bool:
        """config.json describes the widths: from_pretrained loads the output without graphprune."""
        return self.layout == "transformers"

    def summary(self) -> str:
        how = {"transformers": "transformers' from_pretrained loads it",
               "graphprune": "widths differ between layers: load it with graphprune.load",
               "deci": "widths differ between layers, DeciLM layout: vLLM and llama.cpp read it, graphprune.load "
                       "reloads it"}[self.layout]
        return (f"{self.plan.summary()}\nwrote {self.output} ({how})\n"
                f"peak memory {self.peak_rss_bytes / 2**30:.2f} GiB, {self.seconds:.1f} s")


def prune_pretrained(src: str | os.PathLike, out: str | os.PathLike, target_params: float | None = None,
                     target_flops: float | None = None, *, importance: str = "flap", compensate: bool | str = False,
                     uniform: bool = False, allocation: str = "global", calibration: Any = None, batch_size: int = 4,
                     propagate: str = "dense", layout: str = "graphprune",
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     round_to: int | str | None = "auto", max_ratio: float = 0.9,
                     max_shard_bytes: int = 2 * 1024**3, progress: Callable[[str], None] | None = None) -> Result:
    """Prune the checkpoint in directory `src` to `out` (a new directory), one decoder layer in memory at a time.

    Args:
        target_params / target_flops: the fraction of parameters (or FLOPs of one calibration window) to keep.
        importance: "flap" (default), "wanda" or "obs": criteria read from the calibration data (see graphprune.plan).
        compensate: True or "ls" (least squares), "bias" (FLAP's mean), or False.
        uniform: every layer keeps the same widths, so the written config.json describes the model and
            transformers' from_pretrained loads it; otherwise the budget is spent where scores are lowest across
            layers and the output is loaded with graphprune.hf.load_pretrained (the plan is written beside it).
        allocation: "global" (default), "uniform" (uniform=True) or "flap" (FLAP's adaptive structure: its metric
            standardized within each layer, one threshold; see graphprune.plan). "search" measures
            candidates on the whole model: load it and use graphprune.prune.
        layout: where layers differ, how the output describes them: "graphprune" (the original config.json and
            the plan; graphprune.load rebuilds it) or "deci" (LLaMA architecture: the DeciLM / Nemotron-NAS
            block_configs vLLM and llama.cpp read, as graphprune.save_pretrained writes; zero padding where that
            layout needs it, counted in the plan's notes). A config that describes the widths is written as is.
        calibration: token ids, [samples, tokens] (a tensor or array); all windows the same length.
        batch_size: calibration windows per forward.
        propagate: "dense" (default: the original model's activations feed each layer; the result equals the
            in-memory graphprune.prune) or "pruned" (the pruned layers' outputs feed the next ones).
        device: where each layer runs ("cuda" moves one layer at a time to the GPU; the rest stays on the CPU).
        dtype: the dtype layers run in (default: the checkpoint's); the written weights keep the checkpoint's dtypes
            and the statistics are float32.
        max_shard_bytes: the size of each written safetensors shard.
        progress: called with short messages ("pass 1: layers 3/24") as layers finish.
    """
    started = time.perf_counter()
    say = progress or (lambda message: log.info("%s", message))
    _map_large_blocks()
    kind, ratio = parse_budget(target_flops, target_params)
    round_to = check_options(round_to, max_ratio)
    compensate = "ls" if compensate is True else compensate
    if importance not in ("flap", "wanda", "obs"):
        raise UsageError(f"prune-hf scores channels from calibration data: importance must be 'flap', 'wanda' or "
                         f"'obs', got {importance!r}")
    if compensate not in (False, None, "ls", "bias"):
        raise UsageError(f"compensate must be True, 'ls', 'bias' or False, got {compensate!r}")
    if allocation == "search":
        raise UsageError("allocation='search' runs the whole model for every candidate width; prune-hf holds one "
                         "layer at a time: load the model and use graphprune.prune(..., allocation='search'), or use "
                         "allocation='flap' here")
    if allocation not in ("global", "uniform", "flap"):
        raise UsageError(f"allocation must be 'global', 'uniform' or 'flap', got {allocation!r}")
    if allocation == "flap" and uniform:
        raise UsageError("allocation='flap' gives layers different widths: not with uniform=True")
    uniform = uniform or allocation == "uniform"
    if layout not in ("graphprune", "deci"):
        raise UsageError(f"layout must be 'graphprune' or 'deci', got {layout!r}")
    if propagate not in PROPAGATE:
        raise UsageError(f"propagate must be 'dense' or 'pruned', got {propagate!r}")
    src, out = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(out))
    _check_paths(src, out)
    config, _ = load_config(src)
    if layout == "deci":
        deci.check_architecture(config)
    weights = ShardReader(src)
    ids = _token_windows(calibration, batch_size, config)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' but torch sees no CUDA GPU: run on the CPU (the default) or on a machine "
                         "with one")
    layers = _layer_count(config)
    skeleton = _skeleton(config)
    stack = _stack(skeleton, layers)
    if stack is None:
        raise UsageError(f"found no decoder stack in {type(skeleton).__name__} (a list of num_hidden_layers="
                         f"{layers} identical layers): prune-hf needs one; load the model and use graphprune.prune")
    weights.rename(_model_names(skeleton, weights))
    _check_weights(skeleton, weights)
    dtype = dtype or _stored_dtype(weights)
    seq_len = ids.shape[-1]

    # the analysis of one decoder layer: a 1-layer copy of the model, traced on meta; layer l's tensors are
    # layer 0's under another index
    one = _build(_truncated(config, 1))
    layer_an = analyse(one, _meta_ids(seq_len), None, False, False, "dispatch")[0]
    del one
    layer_comps = _layer_components(layer_an, f"{stack}.0.")
    target = {"uniform": uniform, "importance": importance, "compensate": compensate or False}
    selection = dict(config=config, seq_len=seq_len, layer_an=layer_an, layer_comps=layer_comps, stack=stack,
                     flap=allocation == "flap",
                     job=dict(kind=kind, ratio=ratio, round_to=round_to, max_ratio=max_ratio, target=target,
                              auto_round=LLM_ROUND))  # a causal LM, as graphprune.plan rounds one
    _select(np.ones((layers, len(layer_comps))), uniform, **selection)  # an unreachable budget fails before any work
    runner = _Runner(skeleton, stack, weights, device, dtype)
    say(f"capturing the inputs of {stack}.0 for {len(ids)} calibration batches of {tuple(ids[0].shape)} tokens")
    inputs = runner.capture(ids)
    table = np.zeros((layers, len(layer_comps)))
    structure = np.zeros_like(table) if allocation == "flap" else None  # FLAP's metric, per layer
    hidden = inputs
    for index in range(layers):  # pass 1: every layer's scores, on the original model's activations
        hidden, table[index], metric = _score_layer(runner, index, hidden, layer_an, layer_comps, importance,
                                                    compensate, flap=structure is not None)
        if structure is not None:
            structure[index] = metric
        say(f"pass 1 (scores): layers {index + 1}/{layers}")
    the_plan = _select(table, uniform, **selection, structure=structure)

    with atomic_directory(out) as tmp:
        added: list[tuple[str, str, int]] = []
        written = os.path.join(tmp, ".layers") if layout == "deci" else tmp  # converted below unless uniform
        os.makedirs(written, exist_ok=True)
        with ShardWriter(written, max_shard_bytes=max_shard_bytes) as writer:
            layer_names = f"{stack}."
            for name in weights.names:
                if not name.startswith(layer_names):
                    writer.add(weights.stored_name(name), sliced(the_plan, name, weights.get(name)))
            hidden = inputs
            for index in range(layers):  # pass 2: compensate, write, propagate
                hidden = _prune_layer(runner, index, hidden, the_plan, layer_an, stack, compensate, propagate,
                                      writer, added)
                say(f"pass 2 (prune and write): layers {index + 1}/{layers}")
            the_plan.set_compensation({}, added)
            uniform_config = _write_config(config, the_plan, writer, written, uniform,
                                           lambda bias: weights.dtype(bias.rpartition(".")[0] + ".weight"))
        if written != tmp:
            _to_layout(written, tmp, None if uniform_config else config, the_plan)
        the_plan.save(os.path.join(tmp, PLAN_FILE))
        for name in sorted(os.listdir(src)):  # tokenizer, generation config, ...
            path = os.path.join(src, name)
            if os.path.isfile(path) and name != "config.json" and not WEIGHT_FILES.fullmatch(name):
                shutil.copy2(path, os.path.join(tmp, name))
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    the_plan.notes.append(f"pruned layer by layer in {seconds:.1f} s, peak memory {peak / 2**30:.2f} GiB "
                          f"(propagate={propagate!r}, {ids.numel()} calibration tokens)")
    the_plan.save(os.path.join(out, PLAN_FILE))
    return Result(the_plan, out, seconds, peak, "transformers" if uniform_config else layout)


def load_pretrained(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A directory prune_pretrained wrote, as a model: the plan replayed onto the architecture its config.json
    builds (no weights allocated twice), then the pruned weights loaded. Uniform outputs also load with
    transformers' from_pretrained alone."""
    from transformers import AutoModelForCausalLM

    directory = os.fspath(directory)
    plan_file = os.path.join(directory, PLAN_FILE)
    if not os.path.isfile(plan_file):
        raise UsageError(f"{directory} holds no {PLAN_FILE}: it was not written by graphprune prune-hf "
                         "(load it with transformers' from_pretrained)")
    the_plan = PruningPlan.load(plan_file)
    config, _ = load_config(directory)
    uniform_config = bool(the_plan.target.get("config_describes_widths"))
    if uniform_config:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        model.graphprune_plan = the_plan
        return model.eval()
    with empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    model = the_plan.apply(model, inplace=True, verify=False)
    state = {}
    with ShardReader(directory) as weights:
        weights.rename(_model_names(model, weights))
        for name in weights.names:
            state[name] = weights.get(name)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied copies are not in the files
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise GraphPruneError(f"{directory}: the weights do not match the plan (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}): was the directory changed after graphprune wrote it?")
    if dtype is not None:
        model.to(dtype)
    model.graphprune_plan = the_plan
    return model.eval()


def calibration_ids(path: str | os.PathLike, model_dir: str | os.PathLike, seq_len: int = 256,
                    samples: int = 16) -> np.ndarray:
    """Token ids [windows, seq_len] from a .npy array of token ids (used as it is) or a text file, tokenized with
    the model directory's tokenizer and cut into at most `samples` consecutive windows of `seq_len` tokens."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"calibration file {path} does not exist")
    if path.endswith(".npy"):
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path} is not a .npy array ({exc}): save token ids with numpy.save") from None
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"{path} holds a {ids.dtype} array of shape {ids.shape}: it should be integer token ids "
                             "shaped [samples, tokens]")
        return ids
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: give a text file or a .npy array of token ids") from None
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the way out is the same
        raise UsageError(f"{model_dir} has no tokenizer transformers can load ({type(exc).__name__}): give the "
                         "calibration as a .npy array of token ids shaped [samples, tokens]") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than the model's maximum": it is cut into windows
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    windows = min(len(ids) // seq_len, samples)
    if windows == 0:
        raise UsageError(f"{path} holds {len(ids)} tokens, fewer than one calibration window of {seq_len}: give "
                         "more text or a smaller --seq-len")
    return ids[:windows * seq_len].reshape(windows, seq_len)


# --- checks ---------------------------------------------------------------------------------------------------

def _check_paths(src: str, out: str) -> None:
    if not os.path.isdir(src):
        raise UsageError(f"{src} is not a directory: give a Hugging Face model directory (config.json and "
                         "*.safetensors)")
    if os.path.lexists(out):
        raise UsageError(f"{out} exists: give a new output directory (nothing is overwritten)")
    if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
        raise UsageError(f"the output {out} is inside the input directory {src}: write it somewhere else")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {out}: directory {parent} does not exist")


def _token_windows(calibration: Any, batch_size: int, config) -> torch.Tensor:
    """[batches, batch_size, tokens] int64 token ids from [samples, tokens]; samples that do not fill the last
    batch are dropped (every batch must have the same shape)."""
    if calibration is None:
        raise UsageError("prune-hf needs calibration token ids ([samples, tokens]): a text file (tokenized with the "
                         "model's tokenizer) or a .npy array of token ids")
    ids = torch.as_tensor(np.asarray(calibration)).long()
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise UsageError(f"calibration must be token ids shaped [samples, tokens], got shape {tuple(ids.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = getattr(config, "vocab_size", None)
    if ids.numel() and (int(ids.min()) < 0 or (vocab and int(ids.max()) >= vocab)):
        raise UsageError(f"calibration token ids must lie in [0, {vocab}), found {int(ids.min())}..{int(ids.max())}: "
                         "were they made with this model's tokenizer?")
    batches = ids.shape[0] // batch_size
    if batches == 0:
        raise UsageError(f"calibration holds {ids.shape[0]} windows of {ids.shape[1]} tokens, fewer than one batch "
                         f"of {batch_size}: give more text or a smaller batch_size")
    return ids[:batches * batch_size].reshape(batches, batch_size, ids.shape[1])


def _check_weights(skeleton: nn.Module, weights: ShardReader) -> None:
    """Every parameter the config builds is in the checkpoint with the same shape (tied copies may be absent)."""
    tied = _tied_names(skeleton)
    problems = []
    for name, t in skeleton.state_dict().items():
        if name not in weights:
            if name not in tied and name in dict(skeleton.named_parameters()):
                problems.append(f"{name} is missing")
        elif tuple(weights.shape(name)) != tuple(t.shape):
            problems.append(f"{name} is {tuple(weights.shape(name))}, the config builds {tuple(t.shape)}")
    if problems:
        raise UsageError(f"the weights do not match config.json ({'; '.join(problems[:3])}"
                         f"{'; ...' if len(problems) > 3 else ''}): is the directory complete?")


def _model_names(model: nn.Module, weights: ShardReader) -> dict[str, str]:
    """{parameter name: checkpoint key} where they differ: transformers renames some keys while loading (GPT-NeoX's
    embed_out is lm_head; old LayerNorm gamma/beta; a missing or extra base-model prefix), with its own rules.
    Checkpoints whose tensors transformers converts (MoE experts stacked, fused projections split) are refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers before 5 loads keys as they are
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    state = model.state_dict()
    names = {}
    for key in weights.names:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise UsageError(f"{weights.directory} stores {key} in a layout transformers converts while loading "
                             f"({converted} -> {name}); prune-hf reads tensors as stored: load the model and use "
                             "graphprune.prune")
        if name != key:
            names[name] = key
    return names


def _tied_names(model: nn.Module) -> set[str]:
    first = dict(model.named_parameters(remove_duplicate=True))
    return {n for n, _ in model.named_parameters(remove_duplicate=False) if n not in first}


def _stored_dtype(weights: ShardReader) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes."""
    sizes: dict[torch.dtype, int] = {}
    for name in weights.names:
        dt = weights.dtype(name)
        if dt.is_floating_point:
            sizes[dt] = sizes.get(dt, 0) + weights.nbytes(name)
    return max(sizes, key=sizes.get) if sizes else torch.float32


# --- the model, a layer at a time ----------------------------------------------------------------------------

def _skeleton(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config).eval()


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in tensors.items()}


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for m in module.modules():
        for key, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[key] = b.to(device)


def _prefixed(layer: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(prefix + n if n else prefix.rstrip("."), m) for n, m in layer.named_modules()]


def _layer_components(an, prefix: str) -> np.ndarray:
    """The prunable components that live only in the tensors under `prefix` (one decoder layer's heads and
    channels), sorted."""
    inside, outside = set(), set()
    for name, v in an.graph.params.items():
        comps = {int(c) for axis in range(v.ndim) for c in an.component[an.elements(v, axis)] if an.prunable[c]}
        (inside if name.startswith(prefix) else outside).update(comps)
    return np.array(sorted(inside - outside), dtype=np.int64)


class _Runner:
    """Moves decoder layers in and out of memory and runs them on the captured inputs."""

    def __init__(self, skeleton: nn.Module, stack: str, weights: ShardReader, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.stack, self.weights, self.device, self.dtype = skeleton, stack, weights, device, dtype
        self.layers = skeleton.get_submodule(stack)
        self.kwargs: list[dict[str, Any]] = []

    def capture(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The first layer's inputs for every batch (hidden states on the CPU, other arguments kept per batch)."""
        head = self.model.get_output_embeddings()
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        tied = {id(p) for p in self.model.get_input_embeddings().parameters()}
        loaded = []
        for name, p in self.model.named_parameters():
            if name.startswith(self.stack + ".") or (id(p) in skip and id(p) not in tied):
                continue
            loaded.append(name)
            self._set(name, self.weights.get(name).to(self.device, self.dtype))
        _buffers_to(self.model, self.device)  # rotary frequencies

        class _Captured(Exception):
            pass

        captured: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append(hidden.to("cpu"))
            for cache in ("past_key_values", "past_key_value"):
                kwargs.pop(cache, None)
            kwargs["use_cache"] = False
            self.kwargs.append(kwargs)
            raise _Captured

        hook = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in ids:
                    try:
                        self.model(input_ids=batch.to(self.device), use_cache=False)
                    except _Captured:
                        continue
                    raise GraphPruneError(f"{self.stack}.0 was never called: the model's forward does not run its "
                                          "decoder stack in order")
        finally:
            hook.remove()
            for name in loaded:  # the embedding and final norm go back to meta until pass 2 copies them out
                self._set(name, None)
        return captured

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        old = module._parameters[leaf]
        value = torch.empty_like(old, device="meta") if value is None else value
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def load(self, index: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Layer `index` with its weights read from the shards, and its tensors under layer 0's names."""
        layer = self.layers[index]
        prefix = f"{self.stack}.{index}."
        for name, _ in list(layer.named_parameters()):
            self._set(prefix + name, self.weights.get(prefix + name).to(self.device, self.dtype))
        _buffers_to(layer, self.device)
        zero = f"{self.stack}.0."
        return layer, {zero + n: t for n, t in named_tensors(layer).items()}

    def unload(self, index: int) -> None:
        layer = self.layers[index]
        prefix = f"{self.stack}.{index}."
        for name, _ in list(layer.named_parameters()):
            self._set(prefix + name, None)

    def run(self, layer: nn.Module, hidden: list[torch.Tensor], readers=(), keep: bool = True,
            hold: bool = False) -> list[torch.Tensor]:
        """The layer's outputs for every batch (on the CPU), feeding `readers` its inputs on the way (hold=True:
        the held-out batches apart as well, as graphprune.plan's calibration holds them out)."""
        outs = []
        modules = _prefixed(layer, f"{self.stack}.0.")
        with torch.no_grad(), eval_mode(layer), hooked(modules, list(readers)):
            for index, (h, kwargs) in enumerate(zip(hidden, self.kwargs)):
                if hold:
                    hold_out(readers, index)
                y = layer(h.to(self.device), **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                if keep:
                    outs.append(y.to("cpu"))
        return outs


def _score_layer(runner: _Runner, index: int, hidden: list[torch.Tensor], layer_an, layer_comps: np.ndarray,
                 importance: str, compensate, flap: bool = False
                 ) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray | None]:
    """Pass 1 for one layer: its outputs, its components' scores (the X^T X each needs is freed once read) and,
    with `flap`, FLAP's structure metric."""
    zero = f"{runner.stack}.0."
    layer, tensors = runner.load(index)
    readers = make_readers(_prefixed(layer, zero), layer_an, tensors, grams=importance == "obs")
    for r in readers:  # as graphprune.plan collects them (wanda reads no X^T X); one layer's matrices at a time, so
        r.want_gram, r.gram_dtype = r.want_gram and importance != "wanda", torch.float64  # float64 (no copy later)
    out = runner.run(layer, hidden, readers, hold=compensate == "ls" and importance == "flap")
    seen = [r.cpu() for r in readers if r.n]
    on_cpu = _on_cpu(tensors)
    structure = standardized_fluctuation(layer_an, seen, on_cpu)[layer_comps] if flap else None
    scores = CalibratedImportance(importance, seen, compensate, release=True)(layer_an, on_cpu)
    del readers, seen, layer, tensors, on_cpu
    runner.unload(index)
    _release_memory()
    return out, scores[layer_comps], structure


def _select(table: np.ndarray, uniform: bool, config, seq_len: int, layer_an, layer_comps: np.ndarray, stack: str,
            flap: bool, job: dict, structure: np.ndarray | None = None) -> PruningPlan:
    """The selection on the whole model traced on meta, from the per-layer score table (and FLAP's structure
    metric, for allocation="flap"): what graphprune.plan decides on the loaded model. The analysis is dropped
    before the layers come back."""
    full = _build(config)
    an, keep, lockstep, multiple = analyse(full, _meta_ids(seq_len), None, uniform, False, "dispatch")
    passes = PLAN
    if flap:
        metric = _TableScorer(table if structure is None else structure, layer_an, layer_comps, stack)
        passes = PLAN[:2] + [Allocate(None, None, [], None, how="flap", standardized=metric)] + PLAN[2:]
    chosen = run(passes, Job(an, named_tensors(full), scorer=_TableScorer(table, layer_an, layer_comps, stack),
                           keep=keep, lockstep=lockstep, multiple=multiple, **job)).plan
    chosen._analysis = chosen._gone = None
    del an, keep, lockstep, full
    _release_memory()
    return chosen


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM where /proc has it. Not ru_maxrss on Linux: a process started
    from another one (subprocess: fork, then exec) inherits its parent's resident size in ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _map_large_blocks() -> None:
    """Ask glibc to serve blocks of 1 MiB and more from their own mappings, returned to the system when freed.
    By default the threshold grows to 32 MiB after the first large free, and a layer's freed activations and
    statistics then stay in the heap and add to the peak of the next layer."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _release_memory() -> None:
    """Hand freed heap memory back to the system (the analysis's many small objects, a layer's leftovers), so it
    does not count against the next layer's peak."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _TableScorer:
    """Scores of the whole model's components from the per-layer score table: layer l's components are found
    by tensor name (layer l's tensors are layer 0's under index l); everything outside the layers is kept."""

    absolute = True  # calibrated scores share one unit across layers (as CalibratedImportance)

    def __init__(self, table: np.ndarray, layer_an, layer_comps: np.ndarray, stack: str):
        self.table, self.layer_an, self.layer_comps, self.stack = table, layer_an, layer_comps, stack

    def __call__(self, an, tensors) -> np.ndarray:
        scores = np.full(len(an.prunable), np.inf)
        position = np.full(len(self.layer_an.prunable), -1)
        position[self.layer_comps] = np.arange(len(self.layer_comps))
        zero = f"{self.stack}.0."
        pattern = re.compile(re.escape(self.stack) + r"\.(\d+)\.(.*)")
        for name, v in an.graph.params.items():
            m = pattern.fullmatch(name)
            if m is None:
                continue
            mine = self.layer_an.graph.params.get(zero + m.group(2))
            if mine is None:
                continue
            for axis in range(v.ndim):
                where = position[self.layer_an.component[self.layer_an.elements(mine, axis)]]
                hit = where >= 0
                comps = an.component[an.elements(v, axis)]
                scores[comps[hit]] = self.table[int(m.group(1)), where[hit]]
        return scores


def _prune_layer(runner: _Runner, index: int, hidden: list[torch.Tensor], the_plan: PruningPlan, layer_an,
                 stack: str, method, propagate: str, writer: ShardWriter, added: list) -> list[torch.Tensor]:
    """Pass 2 for one layer: statistics where compensation needs them, the compensated and sliced tensors
    written, the next layer's inputs returned."""
    prefix, zero = f"{stack}.{index}.", f"{stack}.0."
    mine = {zero + name[len(prefix):]: axes for name, axes in the_plan.removed.items() if name.startswith(prefix)}
    gone = gone_from_removed(layer_an, mine)
    layer, tensors = runner.load(index)
    readers = []
    if method:  # least squares needs only the kept-kept and kept-removed blocks of X^T X: gathered as such
        readers = make_readers(_prefixed(layer, zero), layer_an, tensors)
        for r in readers:
            removed = gone[r.columns]
            if r.want_gram and method == "ls" and removed.any():
                r.split = (torch.from_numpy(np.nonzero(~removed)[0]), torch.from_numpy(np.nonzero(removed)[0]))
            r.want_gram = False
    ridges: list[dict] = []
    if propagate == "pruned" and method:
        dense = None
        updates, new_biases = _refit_in_order(runner, layer, hidden, readers, layer_an, gone, tensors, method, ridges)
    else:
        dense = runner.run(layer, hidden, readers, keep=propagate == "dense", hold=method == "ls")
        updates, new_biases = (compensate([r.cpu() for r in readers if r.n], layer_an, gone, _on_cpu(tensors),
                                          method, release=True, report=ridges) if method else ({}, []))
    the_plan.ridges.extend({**r, "module": prefix + r["module"][len(zero):]} for r in ridges)
    del readers
    local = PruningPlan(removed=mine, zeroed={zero + n[len(prefix):]: a for n, a in the_plan.zeroed.items()
                                             if n.startswith(prefix)},
                        fingerprint={n: list(t.shape) for n, t in tensors.items()}, target={},
                        flops={"before": 0, "after": 0}, params={"before": 0, "after": 0})
    local.set_compensation(updates, new_biases)
    if propagate == "pruned":
        view = _LayerView(layer, zero)
        with masked_in_place(local, view):
            nxt = runner.run(layer, hidden)
    else:
        nxt = dense
    weights = runner.weights
    for name, tensor in tensors.items():
        value, full = updates.get(name, tensor), prefix + name[len(zero):]
        writer.add(weights.stored_name(full), sliced(local, name, value).to(weights.dtype(full)))
    for bias, weight, axis in new_biases:
        full_bias, full_weight = prefix + bias[len(zero):], prefix + weight[len(zero):]
        # a bias compensation added has no key in the checkpoint: it is written under the model's name
        writer.add(full_bias, sliced(local, bias, updates[bias]).to(weights.dtype(full_weight)))
        added.append((full_bias, full_weight, axis))
    del tensors, updates, layer
    runner.unload(index)
    _release_memory()
    return nxt


def _refit_in_order(runner: _Runner, layer: nn.Module, hidden: list[torch.Tensor], readers: list, layer_an,
                    gone: np.ndarray, tensors: dict[str, torch.Tensor], method: str, ridges: list
                    ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, int]]]:
    """propagate="pruned" within the layer, as graphprune.plan's does (passes/propagate.py): the readers that lost
    inputs in the order the layer runs them, each observed with the ones before it cut and compensated (MLP's
    down_proj sees attention's o_proj already rewritten)."""
    readers_of = _readers_per_component(readers, len(layer_an.prunable))
    losing = [r for r in readers if gone[r.columns].any() and (readers_of[r.columns[gone[r.columns]]] == 1).all()]
    view = _LayerView(layer, f"{runner.stack}.0.")
    order: list[str] = []
    hooks = [view.get_submodule(r.module).register_forward_pre_hook(lambda _m, _a, name=r.module: order.append(name))
             for r in losing]
    try:
        runner.run(layer, hidden[:1], keep=False)
    finally:
        for h in hooks:
            h.remove()
    losing.sort(key=lambda r: order.index(r.module) if r.module in order else len(order))
    updates: dict[str, torch.Tensor] = {}
    new_biases: list[tuple[str, str, int]] = []
    with Cut(view) as cut:
        for r in losing:
            runner.run(layer, hidden, [r], keep=False, hold=method == "ls")
            more, added = compensate([r.cpu()], layer_an, gone, _on_cpu(tensors), method, release=True, report=ridges)
            updates.update(more)
            new_biases += added
            cut(r, gone, updates)
    return updates, new_biases


class _LayerView(nn.Module):
    """A decoder layer seen under layer 0's names, so a per-layer plan can mask it in place."""

    def __init__(self, layer: nn.Module, zero: str):
        super().__init__()
        parts = zero.rstrip(".").split(".")
        holder = self
        for part in parts[:-1]:
            child = nn.Module()
            holder.add_module(part, child)
            holder = child
        holder.add_module(parts[-1], layer)


def _to_layout(written: str, tmp: str, config, the_plan: PruningPlan) -> None:
    """The output written in `written` moved into `tmp`, converted to the DeciLM layout unless `config` is None
    (its own config describes the widths), one tensor at a time."""
    if config is not None:
        with ShardReader(written) as pruned:
            shapes = {name: pruned.shape(name) for name in pruned.names}
            padded = deci.write_into(tmp, config, shapes, pruned.get)
        the_plan.notes.append(f"written in the DeciLM layout (block_configs), {padded:,} zero parameters of padding")
        shutil.rmtree(written)
        return
    for name in os.listdir(written):
        os.replace(os.path.join(written, name), os.path.join(tmp, name))
    os.rmdir(written)


def _write_config(config, the_plan: PruningPlan, writer: ShardWriter, tmp: str, uniform: bool,
                  dtype_of: Callable[[str], torch.dtype]) -> bool:
    """config.json for the output: updated so that from_pretrained builds the pruned shapes where one config can
    describe them (writing the zero biases a config flag brings along); else the original, and the plan rebuilds
    the model. Returns whether the config describes the widths."""
    slim = _build(config)
    if the_plan.removed:  # the torch backend updates the config where one config describes the widths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = the_plan.apply(slim, inplace=True, verify=False)
    shapes = {n: tuple(t.shape) for n, t in named_tensors(slim).items()}
    rebuilt = {n: tuple(t.shape) for n, t in named_tensors(_build(slim.config)).items()}
    describes = rebuilt == shapes
    if describes:
        for name in sorted(shapes.keys() - set(the_plan.fingerprint)):  # zero biases a config flag brings along
            writer.add(name, torch.zeros(shapes[name], dtype=dtype_of(name)))
        slim.config.dtype = config.dtype  # _build made the skeleton in bfloat16
        config = slim.config
    elif uniform:
        warnings.warn("the config cannot describe the pruned widths; load the output with "
                      "graphprune.hf.load_pretrained", stacklevel=3)
    the_plan.target["config_describes_widths"] = describes
    config.save_pretrained(tmp)
    return describes
