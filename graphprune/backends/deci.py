"""Per-layer widths of a LLaMA-architecture decoder written as a DeciLM / Nemotron-NAS config (`block_configs`),
the layout vLLM, SGLang, TensorRT-LLM, mlx-lm and llama.cpp's converter read for decoders whose layers differ, and
read back into a transformers LLaMA model.

The layout fixes two things graphprune may change: every layer keeps all `num_attention_heads` query heads (a
layer's `n_heads_in_group` sets its KV heads), and an MLP is `ffn_mult` wide, which readers turn into
int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of 256. A layer that lost heads, or an MLP width that
is no multiple of 256, is padded with zero channels: outputs stay exactly the same (a padded query head's o_proj
columns are zero, padded gate/up rows feed zero down_proj columns) but the padding costs what it holds, so it is
counted and reported. Plan with round_to=256 and leave the heads whole to keep every saving.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import GraphPruneError, UnsupportedModelError
from ..files import atomic_directory
from ..ir.hf_config import empty_weights
from ..shards import ShardReader, ShardWriter

ARCHITECTURE, MODEL_TYPE = "DeciLMForCausalLM", "nemotron-nas"
FFN_MULTIPLE = 256  # readers round int(2 * ffn_mult * hidden / 3) up to this
# the config fields one value describes for every layer; block_configs replaces them
_PER_LAYER = ("intermediate_size", "num_key_value_heads")
_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)")


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width a DeciLM reader builds from `ffn_mult` (the rule vLLM, TensorRT-LLM and llama.cpp share)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


@dataclass(frozen=True)
class Block:
    """One decoder layer: widths in the weights (heads, kv_heads, mlp) and as written (kv_slots, ffn)."""
    heads: int
    kv_heads: int
    mlp: int
    kv_slots: int  # KV heads written: num_attention_heads // n_heads_in_group
    ffn: int  # MLP width written: a multiple of 256

    def config(self, n_heads: int, hidden: int) -> dict:
        ffn_mult = round(1.5 * self.ffn / hidden, 6)
        assert ffn_width(ffn_mult, hidden) == self.ffn, (self.ffn, hidden)
        return {"attention": {"n_heads_in_group": n_heads // self.kv_slots, "no_op": False,
                              "replace_with_linear": False},
                "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False}}


@dataclass
class Saved:
    """What graphprune.save_pretrained wrote: the layout ("transformers": the model's own config describes it;
    "deci": block_configs) and the zero parameters the layout needed (0 where it holds the widths exactly)."""
    directory: str
    layout: str
    padded_params: int = 0


def blocks(config, shapes: dict[str, tuple[int, ...]]) -> list[Block]:
    """Each layer's widths, from the tensor shapes, and the narrowest layout widths that hold them."""
    n_heads, head_dim = config.num_attention_heads, _head_dim(config)
    out = []
    for i in range(config.num_hidden_layers):
        def rows(proj: str, i=i) -> int:
            key = f"model.layers.{i}.{'mlp' if proj in ('gate', 'up', 'down') else 'self_attn'}.{proj}_proj.weight"
            if key not in shapes:
                raise UnsupportedModelError(f"no {key}: the DeciLM layout describes LLaMA-architecture decoders "
                                            "(q/k/v/o_proj, gate/up/down_proj); save this model with graphprune.save")
            return shapes[key][0]
        q, kv, mlp = rows("q"), rows("k"), rows("gate")
        if q % head_dim or kv % head_dim or kv != rows("v") or rows("up") != mlp:
            raise UnsupportedModelError(f"layer {i}: q/k/v widths {q}/{kv}/{rows('v')} are not whole heads of "
                                        f"{head_dim}: no DeciLM layout describes them; save with graphprune.save")
        q, kv = q // head_dim, kv // head_dim
        group = q // kv if kv and q % kv == 0 else 0
        # fewest KV heads that keep every kept group whole: a divisor of n_heads, at least kv, groups at least `group`
        slots = [d for d in range(kv, n_heads + 1) if group and n_heads % d == 0 and n_heads // d >= group]
        if not slots or mlp == 0:
            raise UnsupportedModelError(f"layer {i} keeps {q} query heads over {kv} KV heads and {mlp} MLP channels: "
                                        "the DeciLM layout cannot hold it; save with graphprune.save")
        out.append(Block(q, kv, mlp, slots[0], -(-mlp // FFN_MULTIPLE) * FFN_MULTIPLE))
    return out


def write(config, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor], directory: str) -> Saved:
    """Write config.json (block_configs) and safetensors to `directory` (created atomically; it must not exist).
    `get(name)` gives one tensor at a time, so a checkpoint on disk converts without being loaded whole."""
    with atomic_directory(directory) as tmp:
        padded = write_into(tmp, config, shapes, get)
    return Saved(os.fspath(directory), "deci", padded)


def check_architecture(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise UnsupportedModelError(f"the DeciLM layout describes LLaMA-architecture decoders, this is "
                                    f"{getattr(config, 'model_type', None)!r}: save it with graphprune.save")


def write_into(tmp: str, config, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor]) -> int:
    """write() into the existing directory `tmp`; returns the zero parameters the layout needed."""
    check_architecture(config)
    hidden = shapes["model.embed_tokens.weight"][1]
    layers = blocks(config, shapes)
    n_heads, head_dim = config.num_attention_heads, _head_dim(config)
    bias = {kind: any(m and m[2] == kind and m[4] == "bias" for m in map(_NAME.fullmatch, shapes))
            for kind in ("self_attn", "mlp")}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    padded = 0
    with ShardWriter(tmp) as writer:
        for name in shapes:
            match = _NAME.fullmatch(name)
            if name == "lm_head.weight" and tied or match and match[4] == "bias":
                continue  # tied to the embedding; biases are written beside their weights
            if not match:
                writer.add(name, get(name))
                continue
            block = layers[int(match[1])]
            stem = name[:-len("weight")]
            weight = get(name)
            tensors = {"weight": weight}
            if bias[match[2]]:  # one config flag for all: absent biases are written as zeros
                tensors["bias"] = get(stem + "bias") if stem + "bias" in shapes else weight.new_zeros(len(weight))
            for leaf, tensor in tensors.items():
                new = _pad(tensor, match[3], leaf, block, n_heads, head_dim)
                padded += new.numel() - (tensor.numel() if stem + leaf in shapes else 0)
                writer.add(stem + leaf, new)
    fields = {k: v for k, v in config.to_dict().items() if k not in _PER_LAYER and not k.startswith("_")}
    fields.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, hidden_size=hidden, head_dim=head_dim,
                  attention_bias=bias["self_attn"], mlp_bias=bias["mlp"],
                  block_configs=[b.config(n_heads, hidden) for b in layers])
    rope = fields.get("rope_parameters") or {}
    fields.setdefault("rope_theta", rope.get("rope_theta"))  # readers older than transformers 5 look here
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(fields, fh, indent=2, sort_keys=True)
    return padded


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _pad(tensor: torch.Tensor, proj: str, leaf: str, block: Block, n_heads: int, head_dim: int) -> torch.Tensor:
    """`tensor` (one projection's weight or bias) at the written widths, zeros in the new channels."""
    if proj in ("gate", "up", "down"):
        axis = 1 if proj == "down" and leaf == "weight" else 0
        if proj == "down" and leaf == "bias":
            return tensor
        return _place(tensor, axis, list(range(block.mlp)), block.ffn)
    if proj in ("k", "v"):
        return _place(tensor, 0, _channels(range(block.kv_heads), head_dim), block.kv_slots * head_dim)
    if proj == "o" and leaf == "bias":
        return tensor
    # query head r of kept KV head j goes to slot j * (heads per written group) + r, so it still reads head j
    group, slot_group = block.heads // block.kv_heads, n_heads // block.kv_slots
    slots = [j * slot_group + r for j in range(block.kv_heads) for r in range(group)]
    return _place(tensor, 1 if proj == "o" else 0, _channels(slots, head_dim), n_heads * head_dim)


def _channels(heads, head_dim: int) -> list[int]:
    return [h * head_dim + c for h in heads for c in range(head_dim)]


def _place(tensor: torch.Tensor, axis: int, where: list[int], size: int) -> torch.Tensor:
    if size == tensor.shape[axis]:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = size
    out = tensor.new_zeros(shape)
    out.index_copy_(axis, torch.tensor(where), tensor)
    return out


def is_deci(config: dict) -> bool:
    return isinstance(config, dict) and "block_configs" in config


def load(directory: str) -> nn.Module:
    """A DeciLM-layout directory as a transformers LLaMA model whose layers take the widths block_configs gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
        fields = json.load(fh)
    block_configs = fields.pop("block_configs")
    if len(block_configs) != fields.get("num_hidden_layers"):
        raise GraphPruneError(f"{directory}/config.json: {len(block_configs)} block_configs for "
                              f"{fields.get('num_hidden_layers')} layers")
    for i, b in enumerate(block_configs):
        unsupported = [f"{part}.{flag}" for part in ("attention", "ffn") for flag in ("no_op", "replace_with_linear")
                       if b.get(part, {}).get(flag)]
        if unsupported:
            raise UnsupportedModelError(f"{directory}: layer {i} uses {', '.join(unsupported)}; graphprune loads "
                                        "DeciLM configs with attention and MLP in every layer (load it in vLLM)")
    for key in ("architectures", "model_type", "auto_map"):
        fields.pop(key, None)
    hidden, n_heads = fields["hidden_size"], fields["num_attention_heads"]
    fields["head_dim"] = fields.get("head_dim") or hidden // n_heads
    # a pruned residual stream: LlamaConfig refuses hidden_size != heads x head_dim, the model builds it
    config = LlamaConfig(**{**fields, "hidden_size": n_heads * fields["head_dim"]})
    config.hidden_size = hidden
    with empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(config)
        for i, b in enumerate(block_configs):
            layer_config = copy.copy(model.config)
            layer_config.num_key_value_heads = n_heads // b["attention"]["n_heads_in_group"]
            layer_config.intermediate_size = ffn_width(b["ffn"]["ffn_mult"], hidden)
            model.model.layers[i] = type(model.model.layers[i])(layer_config, i)
    with ShardReader(directory) as weights:
        state = {name: weights.get(name) for name in weights.names}
    try:
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise GraphPruneError(f"{directory}: the weights do not match block_configs ({exc})") from None
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise GraphPruneError(f"{directory}: the weights do not match block_configs (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    model.config.block_configs = block_configs  # the layout, for whoever saves this model again
    return model.eval()
