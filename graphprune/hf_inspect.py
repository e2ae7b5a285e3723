"""What graphprune could prune in a Hugging Face causal LM, from its config.json alone (no weights read).

A 70B checkpoint is 140 GB; the channel analysis only needs shapes. So the model is built on the meta device
(parameters without storage) and recorded by the ordinary dispatch tracer on meta token ids. Recording and
analysing all 80 layers of a 70B LLaMA takes about 40 s and 8 GB (the analysis keeps one id per element of
every tensor axis), so a model whose layers repeat is traced with 1, 2 and 3 layers instead: every count shown
(groups, FLOPs, parameters, pinned channels, per role) is affine in the layer count, so L layers are the
1-layer result plus (L - 1) times the step from 1 to 2 layers. The 3-layer trace checks that step, and the
full model built on meta checks that every layer has the same parameter shapes; a model that fails either
check, or whose config varies per layer (Gemma 2's alternating layer_types), is traced whole on meta instead.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .analysis.channels import Analysis, analyze
from .analysis.cost import CostModel
from .errors import TraceError, UsageError
from .ir.from_torch import trace
from .passes.uniform import _family_axes
from .render import fmt_num

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 128


@dataclass
class Group:
    """One kind of prunable group: `width` units (channels, heads, KV groups), `count` such groups in the model."""

    role: str  # module path with layer indices blanked ("model.layers.#.mlp"), or "hidden" for the residual stream
    unit: str  # "channels", "heads", "KV groups", "groups of N channels"
    width: int
    count: int
    per_layer: bool  # lives inside one layer of the repeated stack
    tensors: tuple[str, ...] = ()  # the weights it slices, layer indices blanked


@dataclass
class Inspection:
    """The numbers `graphprune inspect-hf` prints; str() renders them. FLOPs are for one forward of
    `seq_len` tokens at batch 1 (2 x MACs, as graphprune.count_flops)."""

    name: str
    model_type: str
    architecture: str
    layers: int | None
    stack: str | None  # the repeated decoder stack's module path ("model.layers")
    hidden_size: int | None
    seq_len: int
    flops: int
    params: int
    flops_by_role: dict[str, int] = field(default_factory=dict)
    params_by_role: dict[str, int] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    pinned: list[dict[str, Any]] = field(default_factory=list)  # {"reason", "channels", "sites"}
    method: str = ""

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.seq_len

    def __str__(self) -> str:
        return render(self)


def inspect_pretrained(path_or_config: Any, seq_len: int = DEFAULT_SEQ_LEN) -> Inspection:
    """Inspect a model directory (only config.json is read), a config.json path, or a PretrainedConfig."""
    config, name = load_config(path_or_config)
    if getattr(config, "use_cache", None) is False:  # without a KV cache, transformers looks for packed sequences
        config.use_cache = True  # in the position ids' values, which meta tensors do not have
    seq_len = _seq_len(config, seq_len)
    layers = _layer_count(config)
    full = _build(config)
    stack = _stack(full, layers)
    why_not = _why_not_uniform(config, full, stack, layers)
    if why_not is None:
        try:
            parts = [_summary(_build(_truncated(config, n)), _meta_ids(seq_len), stack) for n in (1, 2, 3)]
        except Exception as exc:  # noqa: BLE001 - the whole model may still trace; if not, that error is raised
            parts, why_not = None, f"a shorter copy does not trace: {type(exc).__name__}"
    if why_not is None:
        step = _minus(parts[1], parts[0])
        result = _affine(parts[0], step, layers)
        if _plus(parts[1], step) == parts[2] and _params_total(result) == _numel(full):
            method = (f"weight-free: 1-, 2- and 3-layer copies traced on the meta device, extrapolated to "
                      f"{layers} layers")
        else:
            why_not = "the 1-, 2- and 3-layer traces do not grow by the same step"
    if why_not is not None:
        if layers and layers > 3:  # 80 layers of a 70B model: about 45 s and 8 GB
            log.warning("%s: tracing all %d layers on the meta device (%s); large models take a while", name,
                        layers, why_not)
        result = _summary(full, _meta_ids(seq_len), stack)
        method = f"weight-free: the whole model traced on the meta device ({why_not})"
    return _inspection(result, config, name, full, stack, layers, seq_len, method)


def inspect_model(model: torch.nn.Module, seq_len: int = DEFAULT_SEQ_LEN) -> Inspection:
    """The same report from an ordinary full trace of a model in memory (random token ids)."""
    config = model.config
    seq_len = _seq_len(config, seq_len)
    layers = _layer_count(config)
    ids = {"input_ids": torch.randint(0, config.vocab_size, (1, seq_len))}
    stack = _stack(model, layers)
    return _inspection(_summary(model, ids, stack), config, config.model_type, model, stack, layers, seq_len,
                       "full trace of the model in memory")


def load_config(path_or_config: Any):
    """(config, display name) from a directory holding config.json, a .json path, or a config object."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(path_or_config, PretrainedConfig):
        return copy.deepcopy(path_or_config), path_or_config.model_type
    path = os.fspath(path_or_config)
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist: give the directory of a Hugging Face model that holds its "
                         "config.json (weights are not needed)")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"{path} holds no config.json: give the directory of a Hugging Face model (only "
                         "config.json is read; weights are not needed)")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} is not a readable JSON config ({exc}); it should be a model's config.json") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_MAPPING:
        import transformers

        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise UsageError(f"{file} has {what}, which transformers {transformers.__version__} does not know "
                         "(custom code is never run): upgrade transformers, or use a config of a built-in "
                         "architecture")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = CONFIG_MAPPING[model_type].from_dict(data)
    name = os.path.basename(os.path.normpath(os.path.dirname(os.path.abspath(file))))
    return config, name or model_type


def _seq_len(config, seq_len: int) -> int:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"seq_len must be a positive number of tokens, got {seq_len!r}")
    limit = getattr(config, "max_position_embeddings", None)
    return min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len


def _layer_count(config) -> int | None:
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def _build(config) -> torch.nn.Module:
    """The causal LM on the meta device: shapes only, nothing allocated, however large. In bfloat16, as LLM
    checkpoints are stored: some kernels have a meta version only for the dtypes their GPU kernels take (the
    grouped matmul of MoE experts), and the dtype changes no shape, FLOP or parameter count."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16)  # sets its dtype
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UsageError(f"{type(config).__name__} ({config.model_type}) has no causal-LM class in "
                             "transformers: inspect-hf handles decoder LMs (AutoModelForCausalLM); trace other "
                             "models with graphprune.plan") from None
        raise


def _meta_ids(seq_len: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device="meta")}


def _stack(model: torch.nn.Module, layers: int | None) -> str | None:
    """The module path of the repeated decoder layers: the ModuleList of `layers` modules of one class."""
    if layers is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == layers and len({type(x) for x in m}) == 1:
            return name
    return None


def _why_not_uniform(config, full: torch.nn.Module, stack: str | None, layers: int | None) -> str | None:
    """None if the layers can be extrapolated from short copies, else the reason they cannot."""
    if layers is None or stack is None:
        return "no repeated decoder stack found"
    if layers <= 3:
        return f"{layers} layers"
    varying = [k for k, v in _per_layer_fields(config, layers).items() if len(set(map(repr, v))) > 1]
    if varying:
        return f"config.{varying[0]} differs between layers"
    shapes: list[dict[str, tuple]] = [{} for _ in range(layers)]
    prefix = stack + "."
    for name, p in full.named_parameters():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            shapes[int(index)][rest] = tuple(p.shape)
    if any(s != shapes[0] for s in shapes):
        return "its layers have different parameter shapes"
    return None


def _per_layer_fields(config, layers: int) -> dict[str, list]:
    """Config lists with one entry per layer (layer_types, ...); token id lists are not."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (list, tuple)) and len(v) == layers
            and not k.endswith(("_id", "_ids")) and k != "architectures"}


def _truncated(config, n: int):
    short = copy.deepcopy(config)
    for key, value in _per_layer_fields(config, config.num_hidden_layers).items():
        setattr(short, key, type(value)(value[:n]))
    short.num_hidden_layers = n
    return short


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


# --- one trace -> counters that add up across layers ---------------------------------------------------------

def _blank(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _role(module: str) -> str:
    """A module path with layer indices blanked, cut just below the first repeated index
    (model.layers.#.self_attn.q_proj -> model.layers.#.self_attn)."""
    parts = _blank(module).split(".")
    if "#" in parts:
        parts = parts[:parts.index("#") + 2]
    return ".".join(parts) or "(model)"


def _summary(model: torch.nn.Module, inputs: dict, stack: str | None) -> dict[str, Any]:
    """Trace and analyse once; every number as a Counter keyed by something that names no layer (so the
    counters of traces of different depths subtract), and the sites of pinned channels as a set."""
    try:
        graph, _ = trace(model, inputs)
    except TraceError as exc:
        if not inputs["input_ids"].is_meta:
            raise
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split())[:200]
        raise TraceError(f"{type(model).__name__} does not run on meta tensors ({type(cause).__name__}: {text}), "
                         "which the weight-free trace needs (code that reads tensor values, a kernel without a meta "
                         "version): load the model and use graphprune.hf_inspect.inspect_model(model)") from exc
    an = analyze(graph)
    flops, params = CostModel(an, an.flop_terms), CostModel(an, an.param_terms)
    out: dict[str, Any] = {k: Counter() for k in ("flops", "params", "groups", "pinned")}
    out["sites"] = set()
    for label, cost in zip(flops.labels, flops.per_term()):
        out["flops"][_role(label or "")] += round(float(cost))
    for label, cost in zip(params.labels, params.per_term()):
        out["params"][_role(label.rpartition(".")[0])] += round(float(cost))
    config = getattr(model, "config", None)
    for axes, fam in zip(_family_axes(an), an.families):
        out["groups"][_group_key(an, axes, fam, config, stack)] += 1
    for comp, (reason, place) in an.pin_reasons.items():
        if an.has_producer[comp]:
            out["pinned"][_blank_text(reason)] += 1
            place = re.sub(r" \(node \d+\)|node \d+, ", "", place)
            out["sites"].add((_blank_text(reason), _blank_text(place)))
    return out


def _blank_text(text: str) -> str:
    return re.sub(r"'([^']*)'", lambda m: f"'{_blank(m.group(1))}'", text)


def _group_key(an: Analysis, axes: dict, fam, config, stack: str | None) -> tuple:
    """(role, unit, width, per layer, weights): what identifies a group in traces of any depth."""
    names = sorted({_blank(name) for name, _ in axes})
    prefix = f"{stack}."
    layers = {name[len(prefix):].partition(".")[0] for name, _ in axes if stack and name.startswith(prefix)}
    per_layer = len(layers) == 1 and all(name.startswith(prefix) for name, _ in axes)
    modules = [n.rpartition(".")[0].split(".") for n in names]
    common = []
    for level in zip(*modules):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    unit_size = min(axes.values())
    width = len(fam)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if unit_size == 1:
        unit = "channels"
    elif kv is not None and kv != heads and width == kv:
        unit = "KV groups"
    elif width == heads:
        unit = "heads"
    else:
        unit = f"groups of {unit_size} channels"
    hidden = not per_layer and bool(layers) and width == getattr(config, "hidden_size", None)
    role = "hidden" if hidden else ".".join(common)
    if an.lossy[fam].any():
        unit += " (lossy: normalized)"
    return role or "(model)", unit, width, per_layer, tuple(names)


def _plus(a: dict[str, Any], b: dict[str, Any], times: int = 1) -> dict[str, Any]:
    """a + times * b for the counters; the union for the sets."""
    out = {}
    for key, value in a.items():
        if isinstance(value, set):
            out[key] = value | b[key]
            continue
        c = Counter(value)
        for k, v in b[key].items():
            c[k] += times * v
        out[key] = Counter({k: v for k, v in c.items() if v})
    return out


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return _plus(a, b, -1)


def _affine(one: dict[str, Any], step: dict[str, Any], layers: int) -> dict[str, Any]:
    return _plus(one, step, layers - 1)


def _params_total(summary: dict[str, Any]) -> int:
    return sum(summary["params"].values())


def _inspection(s: dict[str, Any], config, name: str, model, stack, layers, seq_len, method) -> Inspection:
    groups = [Group(role, unit, width, count, per_layer, names)
              for (role, unit, width, per_layer, names), count in s["groups"].items()]
    groups.sort(key=lambda g: (g.role != "hidden", not g.per_layer, g.role, -g.width))
    sites: dict[str, list[str]] = {}
    for reason, place in sorted(s["sites"]):
        sites.setdefault(reason, []).append(place)
    pinned = [{"reason": r, "channels": n, "sites": sites.get(r, [])}
              for r, n in sorted(s["pinned"].items(), key=lambda kv: (-kv[1], kv[0]))]
    return Inspection(name, config.model_type, type(model).__name__, layers, stack,
                      getattr(config, "hidden_size", None), seq_len, sum(s["flops"].values()),
                      sum(s["params"].values()), _by_size(s["flops"]), _by_size(s["params"]), groups, pinned, method)


def _by_size(counts: Counter) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# --- text ---------------------------------------------------------------------------------------------------

def render(r: Inspection) -> str:
    """The text `graphprune inspect-hf` prints."""
    stack = f"{r.layers} layers in {r.stack}" if r.stack else f"{r.layers or '?'} layers"
    lines = [f"{r.name}: {r.architecture} ({r.model_type}), {stack}, hidden size {r.hidden_size}",
             f"  ({r.method})",
             (f"FLOPs per token {fmt_num(r.flops_per_token)} (a forward of {r.seq_len} tokens: "
              f"{fmt_num(r.flops)}), parameters {fmt_num(r.params)} ({r.params:,})"),
             "parameters and FLOPs per token by role:"]
    roles = list(dict.fromkeys([*r.params_by_role, *r.flops_by_role]))
    width = max(map(len, roles), default=0)
    for role in roles:
        p, f = r.params_by_role.get(role, 0), r.flops_by_role.get(role, 0) / r.seq_len
        each = f"  ({fmt_num(p / r.layers)} per layer)" if "#" in role and r.layers and p else ""
        each += "  (its weights are counted where they are shared from)" if role in r.flops_by_role and not p else ""
        lines.append(f"  {role:<{width}}  params {fmt_num(p):>8}  FLOPs/token {fmt_num(f):>8}{each}")
    lines.append(f"prunable groups ({sum(g.count for g in r.groups)} in all):")
    for g in r.groups:
        if g.role == "hidden":
            text = f"hidden size (the residual stream, all layers) {g.unit}: {g.width}"
            text += f" x {g.count}" if g.count > 1 else ""
        elif g.per_layer and g.count == r.layers:
            text = f"{g.role} {g.unit}: {g.width} per layer x {g.count} layers"
        else:
            text = f"{g.role} {g.unit}: {g.width}" + (f" x {g.count}" if g.count > 1 else "")
        leaves = sorted({n.removeprefix(g.role + ".") for n in g.tensors})
        lines.append(f"  {text}  [{', '.join(leaves[:6])}{', ...' if len(leaves) > 6 else ''}]")
    if not r.pinned:
        lines.append("no weighted channels are kept whole")
    else:
        lines.append("weighted channels kept whole, by reason:")
        for row in r.pinned:
            lines.append(f"  {row['channels']:>8}  {row['reason']}")
            more = f" (+{len(row['sites']) - 3} more)" if len(row["sites"]) > 3 else ""
            lines.append(f"            at {'; '.join(row['sites'][:3])}{more}")
    return "\n".join(lines)
