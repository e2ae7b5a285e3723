"""ONNX model zoo: torchvision exports (the dynamo exporter, and the TorchScript one where it still works)
and Hugging Face BERT (pretrained MiniLM) and GPT-2, pruned to half their FLOPs. graphprune.onnx.prune
itself runs strict shape inference, the full checker and the ONNX Runtime comparison with the masked
original (it raises if any fails); here the written file is checked again, run, and its FLOPs counted
from the graph, which must also agree with the torch cost model on the source model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torchvision

import graphprune
import graphprune.onnx as gonnx
from graphprune.ir.from_onnx import example_feeds, load_model, session

from .conftest import distinct_params, export_onnx

pytestmark = pytest.mark.slow

CNNS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
        "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_v2_s", "densenet121",
        "squeezenet1_0", "squeezenet1_1", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "regnet_x_400mf",
        "regnet_y_400mf", "regnet_y_800mf", "convnext_tiny", "googlenet", "inception_v3", "mnasnet0_5",
        "mnasnet1_0"]
OTHERS = {  # name: (input shape, constructor options, TorchScript exporter works)
    "alexnet": ((1, 3, 64, 64), {}, False),  # TorchScript: adaptive pooling to a size that does not divide
    "r3d_18": ((1, 3, 8, 64, 64), {}, True),
    "mc3_18": ((1, 3, 8, 64, 64), {}, True),
    "fcn_resnet50": ((1, 3, 64, 64), {"weights_backbone": None, "aux_loss": False}, True),
    "deeplabv3_mobilenet_v3_large": ((1, 3, 64, 64), {"weights_backbone": None, "aux_loss": False}, True),
    "lraspp_mobilenet_v3_large": ((1, 3, 64, 64), {"weights_backbone": None}, True),
    "swin_t": ((1, 3, 64, 64), {}, True),
    "vit_b_16": ((1, 3, 64, 64), {"image_size": 64}, True),
    "maxvit_t": ((1, 3, 224, 224), {}, True),
}
SPECS = {name: ((1, 3, 80, 80) if name == "inception_v3" else (1, 3, 64, 64), {}, True) for name in CNNS}
SPECS.update(OTHERS)
CASES = [(name, exporter) for name, (_, _, ts) in SPECS.items() for exporter in (("dynamo", "torchscript") if ts
                                                                                  else ("dynamo",))]


class Outputs(torch.nn.Module):
    """Segmentation models return a dict: export its tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


@pytest.fixture(autouse=True)
def _remove_files(tmp_path):
    """Each model and its pruned copy are written to disk (up to 700 MB for ViT-B): removed after each test."""
    yield
    for f in tmp_path.iterdir():
        if f.is_file():
            f.unlink()


def check_pruned(src: str, dst: str, plan, ratio: float = 0.5) -> None:
    onnx.checker.check_model(dst, full_check=True)
    assert "verified against the masked original in ONNX Runtime" in plan.notes
    assert abs(plan.flops_ratio - ratio) <= 0.01
    assert abs(gonnx.count_flops(dst) / gonnx.count_flops(src) - plan.flops_ratio) < 1e-6
    feeds = example_feeds(load_model(dst, check=False), seed=3)
    want = [o.shape for o in session(src).run(None, feeds)]
    assert [o.shape for o in session(dst).run(None, feeds)] == want


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_torchvision(tmp_path, name, exporter):
    shape, options, _ = SPECS[name]
    model = Outputs(distinct_params(torchvision.models.get_model(name, weights=None, **options)))
    x = torch.randn(shape)
    src = export_onnx(model, x, tmp_path / f"{name}.onnx", dynamo=exporter == "dynamo")
    assert gonnx.count_flops(src) == graphprune.count_flops(model, x)  # one FLOPs definition for both
    dst = str(tmp_path / f"{name}_slim.onnx")
    check_pruned(src, dst, gonnx.prune(src, dst, target_flops=0.5))


class Logits(torch.nn.Module):
    """A Hugging Face model called with positional inputs, returning its first output."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        options = {"use_cache": False} if "gpt2" in type(self.model).__name__.lower() else {}
        return self.model(**dict(zip(self.names, inputs)), **options)[0]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript", "torchscript-dynamic"])
def test_bert_minilm(tmp_path, exporter):
    """Pretrained all-MiniLM-L6-v2 (a BERT), on real text; with dynamic batch and sequence axes the pruned
    file still runs at other shapes."""
    from .test_calibration import _minilm, _text_batches

    tokenizer, model = _minilm()
    ids = torch.cat([b["input_ids"] for b in _text_batches(tokenizer, 2, start=0, length=16)])
    inputs = (ids, torch.ones_like(ids))
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ("input_0", "input_1")}
    src = export_onnx(Logits(model, ["input_ids", "attention_mask"]).eval(), inputs, tmp_path / "bert.onnx",
                      dynamo=exporter == "dynamo", dynamic=dynamic if exporter.endswith("dynamic") else None)
    dst = str(tmp_path / "bert_slim.onnx")
    names = [i.name for i in session(src).get_inputs()]
    check_pruned(src, dst, gonnx.prune(src, dst, target_flops=0.5, feeds=dict(zip(names, (a.numpy() for a in inputs)))))
    if exporter.endswith("dynamic"):
        other = np.random.default_rng(0).integers(0, 1000, (3, 23))
        out = session(dst).run(None, dict(zip(names, (other, np.ones_like(other)))))[0]
        assert out.shape == (3, 23, 384)


def test_gpt2(tmp_path):
    """The dynamo exporter; the TorchScript one cannot export current transformers' GPT-2 (aten::diff)."""
    import transformers

    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=64,
                                  attn_implementation="eager")
    model = distinct_params(transformers.GPT2LMHeadModel(cfg))
    ids = torch.randint(0, 1000, (1, 16))
    src = export_onnx(Logits(model, ["input_ids"]).eval(), (ids,), tmp_path / "gpt2.onnx", dynamo=True)
    dst = str(tmp_path / "gpt2_slim.onnx")
    plan = gonnx.prune(src, dst, target_flops=0.5)
    check_pruned(src, dst, plan)
    assert any(g["after"] < g["before"] for g in plan.groups)
    np.testing.assert_equal(onnx.load(dst).graph.output[0].type, onnx.load(src).graph.output[0].type)


def export_torchscript(model, x, path, dynamic_batch: bool) -> str:
    """The TorchScript exporter at opset 17, as users call it; dynamic_batch: batch axes of input and output."""
    import contextlib
    import io
    import warnings

    axes = {"input_0": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input_0"],
                          output_names=["output"], dynamic_axes=axes)
    return str(path)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic-batch"])
@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "swin_t"])
def test_torchscript_fresh_weights(tmp_path, name, dynamic):
    """A freshly initialised model (plain random init): the exporter merged its identical initializers (zero
    biases, LayerNorm ones) into Identity copies of one tensor, which must not tie unrelated layers; with a
    dynamic batch, widths computed from fixed widths (swin_t's C // num_heads) must not pin. Both reach half
    the FLOPs with at least the groups of their PyTorch versions, and the dynamic file computes the masked
    original at batch 3."""
    from graphprune.backends.onnx import masked

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    src = export_torchscript(model, x, tmp_path / f"{name}.onnx", dynamic)
    inits = {i.name for i in onnx.load(src).graph.initializer}
    assert any(n.op_type == "Identity" and n.input[0] in inits for n in onnx.load(src).graph.node)  # merged
    dst = str(tmp_path / f"{name}_slim.onnx")
    plan = gonnx.prune(src, dst, target_flops=0.5)
    check_pruned(src, dst, plan)
    torch_groups = Counter(g["before"] for g in graphprune.plan(model, x, 0.5).groups)
    assert not torch_groups - Counter(g["before"] for g in plan.groups)  # every group PyTorch prunes, the file too
    if dynamic:
        feeds = {"input_0": np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)}
        reference = masked(gonnx.read(src).og, load_model(src, check=False), plan.zeroed)
        assert gonnx.compare(onnx.load(dst), reference, feeds) is None
