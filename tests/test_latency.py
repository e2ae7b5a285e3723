"""Latency budgets (passes/latency.py, backends/onnx_latency.py): tables measured in ONNX Runtime on a real
resnet18 export, cached by fingerprint, read by the selection; PyTorch models planned on their export."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torchvision

import graphprune
import graphprune.onnx as gonnx
from graphprune.backends import onnx_latency
from graphprune.cli import main
from graphprune.errors import UsageError
from graphprune.passes.latency import LatencyModel, LatencyTable, removal_for
from graphprune.passes.select import auto_multiple
from tests.conftest import distinct_params, export_onnx


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Tables go to a directory of this module's own (measured once here, then read from it)."""
    directory = tmp_path_factory.mktemp("latency-cache")
    before = os.environ.get("GRAPHPRUNE_CACHE")
    os.environ["GRAPHPRUNE_CACHE"] = str(directory)
    yield os.path.join(directory, "latency")
    if before is None:
        del os.environ["GRAPHPRUNE_CACHE"]
    else:
        os.environ["GRAPHPRUNE_CACHE"] = before


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, cache):
    torch.manual_seed(0)
    model = distinct_params(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 64, 64)
    path = export_onnx(model, x, tmp_path_factory.mktemp("resnet") / "resnet18.onnx", dynamo=True)
    return model, x, path


@pytest.fixture(scope="module")
def pruned(resnet, tmp_path_factory):
    """resnet18's export pruned to 0.6 of its measured latency (measures and caches the table)."""
    out = tmp_path_factory.mktemp("pruned") / "slim.onnx"
    return gonnx.prune(resnet[2], out, target_latency=0.6), out


def test_latency_plan_lands_at_the_target_in_the_measured_block(pruned, resnet, cache):
    result, out = pruned
    lat = result.latency
    assert lat["runtime"] == "onnxruntime" and lat["threads"] == 1
    assert 0.57 <= lat["after"] / lat["before"] <= 0.6 + 1e-9  # spent the budget, in predicted ms
    assert lat["measured_before"] > 0 and lat["measured_after"] > 0  # the files were timed side by side
    assert "measured" in result.summary() and "predicted" in result.summary()
    # every pruned group keeps the multiple the table measured fastest (narrow ones a halved one)
    block = lat["block"]
    assert block in onnx_latency.BLOCKS
    for g in result.groups:
        multiple = auto_multiple(g["before"], block)
        if multiple and g["after"] < g["before"]:
            assert g["after"] % multiple == 0, g
    # the plan's FLOPs follow from latency: not the FLOPs plan's 0.6
    assert result.flops_ratio < 0.6
    tables = os.listdir(cache)
    assert len(tables) == 1 and tables[0].startswith("onnxruntime-")
    table = LatencyTable.load(os.path.join(cache, tables[0]))
    assert table.fingerprint == onnx_latency.fingerprint(gonnx.read(resnet[2]), 1)
    assert table.block == block and len(table.layers) == 21  # 20 convolutions and the classifier


def test_the_table_is_read_from_the_cache_and_keyed_by_threads(pruned, resnet, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(onnx_latency, "_time_pruned", no_measuring)
    again = gonnx.plan(resnet[2], target_latency=0.6)
    assert again.removed == pruned[0].removed
    with pytest.raises(AssertionError, match="measured again"):  # 2 threads: another table
        gonnx.plan(resnet[2], target_latency=0.6, threads=2)


@pytest.mark.parametrize("damage", ["fields missing", "times short of the grid"])
def test_a_damaged_table_is_measured_again(pruned, resnet, cache, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    os.makedirs(tmp_path / "latency")
    name = os.listdir(cache)[0]
    with open(os.path.join(cache, name)) as f:
        data = json.load(f)
    if damage == "fields missing":
        data = {"runtime": "onnxruntime", "fingerprint": data["fingerprint"]}
    else:
        data["layers"][3]["ms"] = data["layers"][3]["ms"][:-1]
    with open(tmp_path / "latency" / name, "w") as f:
        json.dump(data, f)
    seen = []
    real = onnx_latency._time_pruned
    monkeypatch.setattr(onnx_latency, "_time_pruned", lambda *a: seen.append(1) or real(*a))
    table = onnx_latency.measure(gonnx.read(resnet[2]), 1)
    assert seen and table.layers  # measured, and the file replaced
    LatencyTable.load(str(tmp_path / "latency" / name)).check(gonnx.read(resnet[2]).an)


def test_grid_widths_are_what_whole_heads_leave(tmp_path):
    """In a ViT a head goes whole: every width a layer is timed at is one the removal reaches, none is zero."""
    import timm

    from graphprune.passes.latency import flop_nodes, grid_widths, layer_spaces

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    loaded = gonnx.read(export_onnx(vit, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx", dynamo=True))
    an = loaded.an
    checked = set()
    for terms in flop_nodes(an).values():
        for space in layer_spaces(an, terms):
            comps = an.component[an.space_offset[space]:an.space_offset[space] + an.space_size[space]]
            for block in onnx_latency.BLOCKS:
                for width in grid_widths(an, space, block):
                    assert width > 0
                    assert np.isin(comps, removal_for(an, {space: width}), invert=True).sum() == width
            checked.add(len(np.unique(comps)) < len(comps))
    assert checked == {True, False}  # spaces of whole heads and of single channels


def test_the_model_reproduces_measured_points_and_interpolates_between(pruned, resnet):
    loaded = gonnx.read(resnet[2])
    table = onnx_latency.measure(loaded, 1)
    model = LatencyModel(loaded.an, table)
    index = loaded.an.space_index
    checked = 0
    for row, layer in enumerate(table.layers):
        if len(layer.spaces) != 2 or len(layer.grid[0]) < 3 or len(layer.grid[1]) < 3:
            continue
        sx, sy = (index[tuple(k)] for k in layer.spaces)
        ms = np.asarray(layer.ms)
        for i, j in ((0, 0), (1, 2), (len(layer.grid[0]) - 1, 1)):
            removed = removal_for(loaded.an, {sx: layer.grid[0][i], sy: layer.grid[1][j]})
            assert model.per_term(removed)[row] == pytest.approx(table.scale * ms[i, j], rel=1e-9)
        # halfway between grid points: the mean of the four corners
        x0, x1, y0, y1 = layer.grid[0][1], layer.grid[0][2], layer.grid[1][1], layer.grid[1][2]
        if (x0 + x1) % 2 == 0 and (y0 + y1) % 2 == 0:
            removed = removal_for(loaded.an, {sx: (x0 + x1) // 2, sy: (y0 + y1) // 2})
            corners = ms[1:3, 1:3].mean()
            assert model.per_term(removed)[row] == pytest.approx(table.scale * corners, rel=1e-9)
        checked += 1
    assert checked >= 10
    assert model.total() == pytest.approx(table.whole_ms, rel=1e-9)  # the fit goes through the whole model


def test_the_selection_spends_measured_time(pruned, resnet, monkeypatch):
    """On the measured table's grids, with times proportional to each layer's input x output widths (so the
    outcome does not hang on this machine's noise), the layer made 20 times slower keeps fewer channels."""
    loaded = gonnx.read(resnet[2])
    table = onnx_latency.measure(loaded, 1)

    def proportional(layer, factor=1.0):
        ms = factor * np.ravel(layer.ms)[-1] * np.ones([len(g) for g in layer.grid] or [1])
        for axis, g in enumerate(layer.grid):
            ms = ms * (np.asarray(g, dtype=float) / g[-1]).reshape([-1] + [1] * (len(layer.grid) - axis - 1))
        return dataclasses.replace(layer, ms=ms.tolist())

    even = dataclasses.replace(table, layers=[proportional(layer) for layer in table.layers])
    kept = {}
    for row in (16, 18):  # layer4.0.conv2 and layer4.1.conv1 (512 x 512 channels)
        spaces = [loaded.an.space_index[tuple(k)] for k in table.layers[row].spaces]
        slow = dataclasses.replace(even, layers=list(even.layers))
        slow.layers[row] = proportional(table.layers[row], 20.0)
        for label, used in (("even", even), ("slow", slow)):
            monkeypatch.setattr(onnx_latency, "measure", lambda *a, used=used, **k: used)
            plan = gonnx.plan(resnet[2], target_latency=0.6, loaded=loaded)
            kept[row, label] = np.prod(LatencyModel(loaded.an, used).kept_widths(np.nonzero(plan._gone)[0])[spaces])
        assert kept[row, "slow"] < 0.9 * kept[row, "even"], kept  # its input x output channels


def test_a_pytorch_model_is_planned_on_its_export(pruned, resnet):
    model, x, path = resnet
    slim = graphprune.prune(model, x, target_latency=0.6)
    plan = slim.graphprune_plan
    assert plan.latency["after"] / plan.latency["before"] == pytest.approx(pruned[0].latency["after"] /
                                                                           pruned[0].latency["before"])
    assert plan.latency["measured_after"] > 0
    for name, axes in pruned[0].removed.items():  # the same channels as the plan on the file
        if name in plan.removed:
            assert plan.removed[name] == axes
    assert dict(slim.named_parameters())["conv1.weight"].shape[0] == 64 - len(pruned[0].removed["conv1.weight"][0])
    assert torch.isfinite(slim(x)).all()
    with torch.no_grad():  # another batch size: an ordinary module, as the original
        assert torch.allclose(slim(torch.cat([x, 2 * x, -x]))[1], slim(2 * x)[0], rtol=1e-4, atol=1e-5)


def test_bad_latency_arguments_are_refused_before_any_work(resnet):
    model, x, path = resnet
    with pytest.raises(UsageError, match="runtime"):
        gonnx.plan(path, target_latency=0.5, runtime="tensorrt")
    with pytest.raises(UsageError, match="threads"):
        gonnx.plan(path, target_latency=0.5, threads=0)
    with pytest.raises(UsageError, match="exactly one budget"):
        gonnx.plan(path, target_flops=0.5, target_latency=0.5)
    with pytest.raises(UsageError, match="importance"):
        graphprune.plan(model, x, target_latency=0.5, importance="taylor")
    with pytest.raises(UsageError, match="uniform"):
        graphprune.plan(model, x, target_latency=0.5, uniform=True)
    with pytest.raises(UsageError, match="target_latency"):  # threads mean nothing to a FLOPs budget
        gonnx.plan(path, target_flops=0.5, threads=2)
    with pytest.raises(UsageError, match="target_latency"):
        graphprune.plan(model, x, target_flops=0.5, runtime="tensorrt")


def test_cli_prunes_to_a_latency_budget(pruned, resnet, tmp_path, capsys):
    out = tmp_path / "slim.onnx"
    assert main(["prune", str(resnet[2]), "-o", str(out), "--target-latency", "0.6"]) == 0
    printed = capsys.readouterr().out
    assert "target latency 0.6" in printed and "predicted" in printed and out.exists()
    with pytest.raises(SystemExit):  # one budget at a time
        main(["prune", str(resnet[2]), "-o", str(out), "--target-latency", "0.6", "--target-flops", "0.5"])
    capsys.readouterr()
    assert main(["prune", str(resnet[2]), "-o", str(tmp_path / "x.onnx"), "--target-flops", "0.5",
                 "--threads", "2"]) == 2  # --threads means nothing without a latency budget
    assert "--target-latency" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    assert main(["bench", str(resnet[2]), str(out), "--runs", "2", "--runtime", "tensorrt"]) == 2
    assert "TensorRT" in capsys.readouterr().err
