"""ONNX in, ONNX out: op rules on small exported models, verified in ONNX Runtime against the masked original
(graphprune.onnx.prune does that itself and raises if they differ), FLOPs at target counted again from the
written file, the checker, plans shared with the torch backend, and bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune
import graphprune.onnx as gonnx
from graphprune.errors import GraphPruneError, UsageError
from graphprune.ir.from_onnx import session

from .conftest import distinct_params, export_onnx


def prune_file(tmp_path, model, inputs, ratio=0.5, dynamo=False, dynamic=None, tol=0.01, **options):
    """Export, prune (exact widths unless round_to is given: these models are small), check."""
    options.setdefault("round_to", 1)
    src = export_onnx(distinct_params(model), inputs, tmp_path / "model.onnx", dynamo=dynamo, dynamic=dynamic)
    dst = str(tmp_path / "slim.onnx")
    plan = gonnx.prune(src, dst, target_flops=ratio, **options)
    onnx.checker.check_model(dst, full_check=True)
    assert abs(gonnx.count_flops(dst) / gonnx.count_flops(src) - plan.flops_ratio) < 1e-6
    assert ratio - tol <= plan.flops_ratio <= ratio + 0.01
    return plan, src, dst


class ConvNet(nn.Module):
    """conv/bn/relu, a residual add, concat, max pool, global pool, flatten and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 24, 1)
        self.c = nn.Conv2d(40, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.cat([x, self.b(x)], 1)
        x = nn.functional.max_pool2d(x, 2)
        x = self.c(x).relu().mean((2, 3))
        return self.head(x)


@pytest.mark.parametrize("dynamo", [False, True])
def test_convnet(tmp_path, dynamo):
    plan, src, dst = prune_file(tmp_path, ConvNet(), torch.randn(1, 3, 16, 16), dynamo=dynamo)
    assert plan.params_ratio < 1
    slim, original = onnx.load(dst), onnx.load(src)
    assert {o.domain: o.version for o in slim.opset_import} == {o.domain: o.version for o in original.opset_import}
    assert slim.producer_name == original.producer_name and slim.ir_version == original.ir_version
    assert "verified against the masked original in ONNX Runtime" in plan.notes


class MobileBlock(nn.Module):
    """Depthwise and grouped convs, ReLU6 (Clip), hard-swish, PReLU and squeeze-excite (broadcast Mul)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.prelu = nn.PReLU(32)
        self.project = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = nn.functional.hardswish(self.dw(y))
        y = self.prelu(self.grouped(y))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * s)


def test_mobile_block(tmp_path):
    # whole groups of the grouped conv go together (8 channels of 32): the budget is met coarsely
    _, _, dst = prune_file(tmp_path, MobileBlock(), torch.randn(1, 8, 12, 12), ratio=0.6, tol=0.15)
    groups = {n.name: n for n in onnx.load(dst).graph.node if n.op_type == "Conv"}
    assert any(a.name == "group" and 1 < a.i < 32 for n in groups.values() for a in n.attribute)


class UpNet(nn.Module):
    """ConvTranspose, nearest and bilinear Resize, Pad, instance and group norms."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(32, affine=True)
        self.up = nn.ConvTranspose2d(32, 24, 2, stride=2)
        self.gn_per_channel = nn.GroupNorm(24, 24)
        self.gn = nn.GroupNorm(4, 24)
        self.c2 = nn.Conv2d(24, 24, 3)
        self.c3 = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = torch.relu(self.inorm(self.c1(x)))
        y = self.gn_per_channel(self.up(y))
        y = nn.functional.interpolate(y, scale_factor=2, mode="nearest")
        y = nn.functional.pad(self.c2(y), (1, 1, 1, 1))
        y = nn.functional.interpolate(self.gn(y), size=(20, 20), mode="bilinear", align_corners=False)
        return self.c3(y)


def test_upsampling_and_norms(tmp_path):
    plan, _, _ = prune_file(tmp_path, UpNet(), torch.randn(1, 3, 6, 6), ratio=0.7)
    assert 0 not in plan.removed.get("c2.weight", {})  # GroupNorm(4, 24) mixes c2's channels: kept whole
    assert 1 in plan.removed.get("up.weight", {})  # GroupNorm(24, 24) is per channel: pruned


class Slicing(nn.Module):
    """chunk (Split), slicing a channel range (Slice), a fixed channel selection (Gather), transposes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 1)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        a, b = torch.chunk(self.c1(x), 2, dim=1)
        y = self.c2(a) + self.c3(b)
        y = self.c4(y[:, :8])
        z = y[:, [0, 2, 5]]
        return self.fc(z.transpose(1, 3)).sum(1)


@pytest.mark.parametrize("dynamo", [False, True])
def test_split_slice_gather(tmp_path, dynamo):
    prune_file(tmp_path, Slicing(), torch.randn(1, 3, 4, 4), ratio=0.7, dynamo=dynamo, tol=0.03)


class Attention(nn.Module):
    """A transformer block: q/k/v projections, heads (Reshape + Transpose), Softmax, LayerNorm, GELU MLP,
    an einsum and an expand."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.gate = nn.Parameter(torch.randn(64))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        h = nn.functional.gelu(self.up(self.norm(x)))
        h = torch.einsum("bnd,d->bnd", h, self.gate.expand(64))
        return x + self.down(h)


@pytest.mark.parametrize("dynamo", [False, True])
def test_attention_block(tmp_path, dynamo):
    plan, _, _ = prune_file(tmp_path, Attention(), torch.randn(2, 6, 32), ratio=0.7, dynamo=dynamo)
    assert any(g["after"] < g["before"] for g in plan.groups)


def test_dynamic_batch_and_sequence(tmp_path):
    """With dynamic axes the exporter builds reshape targets from Shape -> Gather -> Concat chains: their
    head counts are rewritten, the batch and sequence stay dynamic."""
    _, _, dst = prune_file(tmp_path, Attention(), torch.randn(2, 6, 32), ratio=0.7,
                           dynamic={"input_0": {0: "batch", 1: "seq"}})
    sess = session(dst)
    for shape in ((1, 3, 32), (3, 9, 32)):
        out = sess.run(None, {"input_0": np.random.randn(*shape).astype(np.float32)})[0]
        assert out.shape == shape


def test_reductions(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 64, 3), nn.Conv2d(64, 48, 1)

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x)))
            return y.amax((2, 3)), torch.relu(y).sum(1)  # a channel sum needs removed channels to be zero

    prune_file(tmp_path, Net(), torch.randn(1, 3, 8, 8), ratio=0.8)


def _conv_lrn_conv(path) -> str:
    """Conv -> LRN -> Conv -> Conv, built by hand: LRN mixes neighbouring channels and has no rule."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (16, 3, 1, 1)), ("w2", (16, 16, 1, 1)), ("w3", (16, 16, 1, 1)), ("w4", (4, 16, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("LRN", ["a"], ["b"], size=3),
             helper.make_node("Conv", ["b", "w2"], ["c"]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "w3"], ["e"]), helper.make_node("Conv", ["e", "w4"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_op_without_rule_pins_with_reason(tmp_path):
    src = _conv_lrn_conv(tmp_path / "m.onnx")
    text = gonnx.inspect(src)
    assert "no rule for op onnx.LRN" in text
    plan = gonnx.plan(src, 0.8)
    assert set(plan.removed) <= {"w2", "w3", "w4"} and "w1" not in plan.removed  # LRN's input stays whole
    gonnx.prune(src, tmp_path / "slim.onnx", 0.8)


def test_torch_and_onnx_backends_agree(tmp_path):
    """One plan, made on the PyTorch model, applied by both backends: the same outputs."""
    import torchvision

    model = distinct_params(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    plan = graphprune.plan(model, x, 0.5)
    src = export_onnx(model, x, tmp_path / "r18.onnx", dynamo=True)
    dst = str(tmp_path / "r18_slim.onnx")
    gonnx.prune(src, dst, the_plan=plan)
    with torch.no_grad():
        want = plan.apply(model)(x).numpy()
    got = session(dst).run(None, {session(dst).get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert abs(gonnx.count_flops(dst) / gonnx.count_flops(src) - plan.flops_ratio) < 1e-3


def test_plan_json_round_trip_and_report(tmp_path):
    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    plan = gonnx.prune(src, tmp_path / "a.onnx", 0.5, plan_out=tmp_path / "plan.json", report=tmp_path / "r.html")
    again = gonnx.prune(src, tmp_path / "b.onnx", the_plan=graphprune.PruningPlan.load(tmp_path / "plan.json"))
    assert again.removed == plan.removed
    assert onnx.load(tmp_path / "a.onnx").graph.initializer[0] == onnx.load(tmp_path / "b.onnx").graph.initializer[0]
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "<rect" in page and "FLOPs" in page
    convs = [r for r in plan.layers if r["flops_before"] and r["shape_before"] and len(r["shape_before"]) == 4]
    assert len(convs) == 4  # each Conv node's row carries its weight (initializers named by no layer)
    assert all(r["params_before"] > 0 and r["params_after"] <= r["params_before"] for r in convs)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, check=False)


def test_cli_prune_inspect_bench(tmp_path):
    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    out = tmp_path / "slim.onnx"
    done = _cli("prune", src, "-o", out, "--target-flops", "0.5", "--round-to", "4", "--plan-out", tmp_path / "p.json")
    assert done.returncode == 0, done.stderr
    assert "of original; target flops 0.5" in done.stdout and out.exists() and (tmp_path / "p.json").exists()
    assert hashlib.sha256(Path(src).read_bytes()).hexdigest() == digest  # the input is untouched
    inspected = _cli("inspect", src)
    assert inspected.returncode == 0 and "prunable groups" in inspected.stdout
    bench = _cli("bench", src, out, "--runs", "3", "--warmup", "1", "--threads", "1")
    assert bench.returncode == 0, bench.stderr
    assert "median ms" in bench.stdout and "p90 ms" in bench.stdout and "speed-up" in bench.stdout


def test_bad_input(tmp_path):
    good = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    data = Path(good).read_bytes()
    (tmp_path / "text.onnx").write_bytes(b"this is not a model\n" * 10)
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    broken = onnx.load(good)
    broken.graph.node[0].input[0] = "nothing_makes_this"
    onnx.save(broken, tmp_path / "invalid.onnx")
    out = tmp_path / "out.onnx"
    cases = [
        (("prune", tmp_path / "missing.onnx", "-o", out, "--target-flops", "0.5"), 2, "no ONNX file"),
        (("prune", tmp_path / "text.onnx", "-o", out, "--target-flops", "0.5"), 1, "not an ONNX model"),
        (("prune", tmp_path / "cut.onnx", "-o", out, "--target-flops", "0.5"), 1, "ONNX model"),
        (("prune", tmp_path / "invalid.onnx", "-o", out, "--target-flops", "0.5"), 1, "not a valid ONNX model"),
        (("prune", good, "-o", out, "--target-flops", "1.5"), 2, "(0, 1]"),
        (("prune", good, "-o", out, "--target-flops", "0"), 2, "(0, 1]"),
        (("prune", good, "-o", tmp_path / "no" / "such" / "dir.onnx", "--target-flops", "0.5"), 2, "does not exist"),
        (("prune", good, "-o", out), 2, "give a budget"),
        (("prune", good, "-o", good, "--target-flops", "0.5"), 2, "never overwrites its input"),
        (("prune", good, "-o", tmp_path, "--target-flops", "0.5"), 2, "is a directory"),
    ]
    for args, code, text in cases:
        done = _cli(*args)
        assert done.returncode == code, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert text in lines[-1] and lines[-1].startswith("graphprune: error:"), (args, done.stderr)
        assert not out.exists() and not (tmp_path / "no").exists()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".graphprune-")]
    with pytest.raises(UsageError):
        gonnx.prune(good, out, target_flops=-1)
    with pytest.raises(GraphPruneError, match="ask for at least"):
        gonnx.prune(good, out, target_flops=0.01)
    assert not out.exists()


def test_quantized_qdq_model(tmp_path):
    """A static per-channel int8 QDQ model from ONNX Runtime's quantizer: quantized weights, their scales and
    zero points are sliced together; Q -> DQ pairs keep removed channels zero."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    batches = iter([{"input_0": np.random.default_rng(i).standard_normal((1, 3, 16, 16), dtype=np.float32)}
                    for i in range(4)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantized = str(tmp_path / "q.onnx")
    quantize_static(src, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(quantized).graph.node}
    text = gonnx.inspect(quantized)
    assert "3 prunable groups" in text and "weight_quantized[2]" not in text  # kernel axes are not channels
    dst = str(tmp_path / "q_slim.onnx")
    plan = gonnx.prune(quantized, dst, 0.5, round_to=1)
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    slim = {i.name: i for i in onnx.load(dst).graph.initializer}
    weights = [n for n in slim if n.endswith("weight_quantized")]
    assert weights and all(slim[n].data_type == onnx.TensorProto.INT8 for n in weights)


def test_calibrated_importance_from_an_npz_file(tmp_path):
    """--calibration inputs.npz: samples split into the model's batch size; wanda / flap read the inputs
    of every conv / linear node from ONNX Runtime; the result is verified on the first batch."""
    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    np.savez(tmp_path / "inputs.npz", input_0=np.random.default_rng(0).standard_normal((6, 3, 16, 16),
                                                                                       dtype=np.float32))
    batches = gonnx.load_calibration(tmp_path / "inputs.npz", src)
    assert len(batches) == 6 and batches[0]["input_0"].shape == (1, 3, 16, 16)
    plans = {}
    for importance in ("flap", "wanda"):
        plans[importance] = gonnx.prune(src, tmp_path / f"{importance}.onnx", 0.5, importance=importance,
                                        calibration=batches, round_to=1)
        assert abs(plans[importance].flops_ratio - 0.5) <= 0.01
    assert plans["flap"].removed != gonnx.plan(src, 0.5, round_to=1).removed  # the data changes the choice
    done = _cli("prune", src, "-o", tmp_path / "cli.onnx", "--target-flops", "0.5", "--importance", "flap",
                "--calibration", tmp_path / "inputs.npz")
    assert done.returncode == 0, done.stderr
    missing = _cli("prune", src, "-o", tmp_path / "x.onnx", "--target-flops", "0.5", "--importance", "wanda")
    assert missing.returncode == 2 and "calibration" in missing.stderr


def test_progress_lines(capsys):
    """Steps print one line each; a counted loop prints its first and last count when not on a terminal."""
    from graphprune.cli import _progress

    _progress("reading model.onnx")
    for i in range(1, 4):
        _progress(f"timing 2 models, run {i}/3")
    assert capsys.readouterr().err.splitlines() == [
        "graphprune: reading model.onnx", "graphprune: timing 2 models, run 1/3", "graphprune: timing 2 models, run 3/3"]


def _sandwich(path, middle, extra_inits=(), opset=17, out_shape=(1, 4, 8, 8), w2_in=16) -> str:
    """x -> Conv(16) -> Relu -> <middle nodes: 'h' to 'm'> -> Conv(4) -> y, built by hand."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, w2_in, 1, 1)).astype(np.float32), "w2"),
             *[numpy_helper.from_array(np.asarray(a), n) for n, a in extra_inits]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]), helper.make_node("Relu", ["c"], ["h"]), *middle,
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return str(path)


def test_review_cases(tmp_path):
    """Constructs that once gave wrong or broken files: each is pruned exactly or kept whole."""
    from onnx import helper

    cases = {
        # a Pad value held by a float initializer: padded borders are not zero
        "pad_value": ([helper.make_node("Pad", ["h", "pads", "one"], ["m"])],
                      [("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), ("one", np.array(1.0, np.float32))],
                      (1, 4, 10, 10)),
        # log(sum(0)) = -inf: a removed channel would not be zero
        "reduce_log_sum": ([helper.make_node("ReduceLogSum", ["h"], ["m"], axes=[2, 3], keepdims=1)], [],
                           (1, 4, 1, 1)),
        # 2-d constant indices keep their shape (the gathered channels stay, the others go)
        "gather_2d": ([helper.make_node("Gather", ["h", "idx"], ["g"], axis=1),
                       helper.make_node("Reshape", ["g", "shape"], ["r"]),
                       helper.make_node("Concat", ["r", "h"], ["m"], axis=1)],
                      [("idx", np.array([[0, 1], [2, 3]], np.int64)), ("shape", np.array([1, 4, 8, 8], np.int64))],
                      (1, 4, 8, 8)),
        # channels-last resize: the last axis is the channel axis and passes through
        "resize_nhwc": ([helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
                         helper.make_node("Resize", ["t", "", "scales"], ["r"], mode="nearest"),
                         helper.make_node("Transpose", ["r"], ["m"], perm=[0, 3, 1, 2])],
                        [("scales", np.array([1, 2, 2, 1], np.float32))], (1, 4, 16, 16)),
    }
    from onnx import TensorProto

    branch = {k: helper.make_graph([helper.make_node(op, ["h", "bias"] if op == "Add" else ["h"], [f"{k}_out"])],
                                   k, [], [helper.make_tensor_value_info(f"{k}_out", TensorProto.FLOAT, None)])
              for k, op in (("then", "Add"), ("else", "Identity"))}
    # a control-flow body that reads an outer tensor: no rule, and what it reads is kept whole
    cases["if_body"] = ([helper.make_node("If", ["cond"], ["m"], then_branch=branch["then"],
                                          else_branch=branch["else"])],
                        [("cond", np.array(True)), ("bias", np.ones((1, 16, 1, 1), np.float32))], (1, 4, 8, 8))
    for name, (middle, inits, out_shape) in cases.items():
        src = _sandwich(tmp_path / f"{name}.onnx", middle, inits, out_shape=out_shape,
                        w2_in=20 if name == "gather_2d" else 16)
        session(src).run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})
        loaded = gonnx.read(src)
        w1 = loaded.og.graph.params["w1"]
        free = loaded.an.prunable[loaded.an.component[loaded.an.elements(w1, 0)]]
        if name in ("pad_value", "reduce_log_sum", "if_body"):  # would reach the last conv as non-zeros, or unknown
            assert not free.any()
            continue
        assert free.sum() == (12 if name == "gather_2d" else 16)
        plan = gonnx.prune(src, tmp_path / f"{name}_slim.onnx", 0.9, round_to=1)  # verified against the mask
        assert "w1" in plan.removed


def test_nan_outputs_never_verify(tmp_path):
    a = np.array([1.0, np.nan], np.float32)
    b = np.array([1.0, 2.0], np.float32)
    from onnx import TensorProto, helper, numpy_helper

    def const_model(values, path):
        graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                                  [numpy_helper.from_array(values, "c")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return onnx.load(path)

    feeds = {"x": np.zeros(2, np.float32)}
    assert "not finite" in gonnx.compare(const_model(a, tmp_path / "a.onnx"), const_model(b, tmp_path / "b.onnx"),
                                         feeds)
    assert gonnx.compare(const_model(b, tmp_path / "c.onnx"), const_model(b, tmp_path / "d.onnx"), feeds) is None


def test_outputs_never_overwrite_the_input(tmp_path):
    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    os.symlink(tmp_path, tmp_path / "link")
    for kwargs in ({"dst": tmp_path / "link" / "m.onnx"}, {"dst": tmp_path / "o.onnx", "plan_out": src},
                   {"dst": tmp_path / "o.onnx", "report": tmp_path / "o.onnx"}):
        dst = kwargs.pop("dst")
        with pytest.raises(UsageError):
            gonnx.prune(src, dst, 0.5, **kwargs)
    assert hashlib.sha256(Path(src).read_bytes()).hexdigest() == digest
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_output_overwrites_a_previous_one_from_its_folder(tmp_path, monkeypatch):
    """Weights kept in an external file stay external; pruning again into the same output, run from the output's
    folder, replaces both files (onnx's own writer refuses a data file that exists relative to the working
    directory)."""
    model = onnx.load(export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    for ratio in (0.6, 0.5):
        plan = gonnx.prune("ext.onnx", "slim.onnx", ratio)
        assert (tmp_path / "slim.onnx.data").exists()
        assert gonnx.count_flops("slim.onnx") == pytest.approx(plan.flops["after"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".graphprune-") or p.endswith(".data")
                and p not in ("ext.onnx.data", "slim.onnx.data")]


class PickChannels(nn.Module):
    """A fixed 1-d channel selection (Gather with constant indices) read by a conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.c2 = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))[:, [0, 3, 5, 9]])


@pytest.mark.parametrize("dynamo", [False, True])
def test_gather_of_pruned_channels(tmp_path, dynamo):
    """Removed channels that a 1-d Gather picked leave its index list (it once kept the old index shape); the
    dynamo exporter writes the same selection as a GatherND of [k, 1] indices on the moved axis."""
    plan, _, dst = prune_file(tmp_path, PickChannels(), torch.randn(1, 3, 4, 4), ratio=0.5, dynamo=dynamo)
    assert plan.removed["c2.weight"][1]  # gathered channels went
    gathers = [n for n in onnx.load(dst).graph.node if n.op_type in ("Gather", "GatherND")]
    assert len(gathers) == 1
    index = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(dst).graph.initializer}[gathers[0].input[1]]
    assert index.shape[0] == 4 - len(plan.removed["c2.weight"][1])


class ResidualStack(nn.Module):
    """A stem, three residual blocks in a Sequential (depth pruning can drop them), a head; with bias=False the
    blocks' second convs have none, so compensation adds one."""

    class Block(nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.a, self.b = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 1, bias=bias)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    def __init__(self, bias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*(self.Block(bias) for _ in range(3)))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("bias,options,what", [
    (True, {"compensate": True}, "compensation"), (False, {"compensate": True}, "added biases"),
    (True, {"depth": 1}, "removed blocks")], ids=["compensate", "added-bias", "depth"])
def test_plans_that_change_weights_are_refused(tmp_path, bias, options, what):
    """Slicing the file's initializers cannot replay compensation, added biases or removed blocks: such a plan is
    refused with what it carries and the way out, also after a JSON round trip (which drops the updated
    weights but keeps the target's compensate key), and nothing is written."""
    model = distinct_params(ResidualStack(bias))
    x = torch.randn(1, 3, 8, 8)
    plan = graphprune.plan(model, x, 0.6, calibration=[torch.randn(1, 3, 8, 8) for _ in range(4)], **options)
    assert bool(plan.added) == (not bias)
    src = export_onnx(model, x, tmp_path / "m.onnx")
    plan.save(tmp_path / "plan.json")
    for the_plan in (plan, graphprune.PruningPlan.load(tmp_path / "plan.json")):
        with pytest.raises(UsageError, match=what) as err:
            gonnx.prune(src, tmp_path / "slim.onnx", the_plan=the_plan)
        assert "torch.onnx.export(plan.apply(model)" in str(err.value)
        assert not (tmp_path / "slim.onnx").exists()


class ZeroBiases(nn.Module):
    """Two unrelated convs of one width with zero biases (a fresh model's): the exporter keeps one tensor for
    both biases (c2.bias = Identity(c1.bias))."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        nn.init.zeros_(self.c1.bias)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_merged_zero_biases_do_not_tie_layers(tmp_path):
    src = export_onnx(ZeroBiases(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    nodes = onnx.load(src).graph.node
    assert [n.input for n in nodes if n.op_type == "Identity"] == [["c1.bias"]]  # the exporter merged them
    loaded = gonnx.read(src)
    assert sorted(len(f) for f in loaded.an.families) == [16, 16]  # c1's and c2's channels, each on their own
    plan = gonnx.prune(src, tmp_path / "slim.onnx", 0.5, round_to=1)  # verified against the masked original
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    assert plan.removed["c1.weight"][0] != plan.removed["c2.weight"][0]  # chosen layer by layer


def test_dynamic_batch_prunes_like_fixed_shapes(tmp_path):
    """With a dynamic batch, widths computed from fixed widths (C // heads, a copied C) are constants, as with
    fixed shapes: the same channels are prunable; widths that follow the batch keep computing at run time."""
    model, x = distinct_params(Attention()), torch.randn(2, 6, 32)
    fixed = gonnx.read(export_onnx(model, x, tmp_path / "fixed.onnx"))
    src = export_onnx(model, x, tmp_path / "dyn.onnx", dynamic={"input_0": {0: "batch"}})
    dynamic = gonnx.read(src)
    assert sorted(map(len, dynamic.an.families)) == sorted(map(len, fixed.an.families))
    gonnx.prune(src, tmp_path / "slim.onnx", 0.5, round_to=1)
    for batch in (1, 5):
        out = session(str(tmp_path / "slim.onnx")).run(None, {"input_0": np.random.randn(batch, 6, 32).astype(
            np.float32)})[0]
        assert out.shape == (batch, 6, 32)


def test_gather_nd_of_several_coordinates_pins(tmp_path):
    """GatherND indices [[0, 1], [0, 2]] pick whole (batch, channel) planes: the channels stay whole."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 1, 1)).astype(np.float32), "w1")
    idx = numpy_helper.from_array(np.array([[0, 1], [0, 2]], np.int64), "idx")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]), helper.make_node("Relu", ["c"], ["h"]),
             helper.make_node("GatherND", ["h", "idx"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8])], [w1, idx])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    loaded = gonnx.read(tmp_path / "m.onnx")
    an = loaded.an
    comps = an.component[an.elements(loaded.og.graph.params["w1"], 0)]
    assert not an.prunable[comps].any()
    assert {an.pin_reasons[c][0] for c in comps} == {
        "GatherND with indices computed at run time, several coordinates or batch dims"}


class TwoBranches(nn.Module):
    """Two MLP branches; one has no biases, so once its weights are renamed nothing of it keeps its name."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64, bias=False), nn.Linear(64, 8, bias=False)
        self.c, self.d = nn.Linear(16, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.d(torch.relu(self.c(x)))


def test_plan_whose_tensors_the_exporter_renamed_is_refused(tmp_path):
    """The TorchScript exporter stores the weight of a linear layer on 3-d inputs transposed, for a MatMul, under
    another name: a PyTorch plan would prune only what it finds, so it is refused instead of writing a file that
    keeps more than the plan says."""
    model, x = distinct_params(TwoBranches()), torch.randn(2, 5, 16)
    plan = graphprune.plan(model, x, target_flops=0.5)
    src = export_onnx(model, x, tmp_path / "m.onnx")
    renamed = [n for n in plan.removed if n not in {i.name for i in onnx.load(src).graph.initializer}]
    assert renamed  # the premise: some pruned tensors are not initializers of the file under their names
    with pytest.raises(UsageError, match="plan this file instead"):
        gonnx.prune(src, tmp_path / "slim.onnx", the_plan=plan)
    assert not (tmp_path / "slim.onnx").exists()


def test_feeds_of_another_dtype_are_cast_for_the_verification(tmp_path):
    src = export_onnx(distinct_params(ConvNet()), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    feeds = {"input_0": np.random.default_rng(0).standard_normal((1, 3, 16, 16))}  # float64, numpy's default
    plan = gonnx.prune(src, tmp_path / "slim.onnx", target_flops=0.5, feeds=feeds)
    assert "verified against the masked original in ONNX Runtime" in plan.notes
