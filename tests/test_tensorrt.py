"""The TensorRT backend (graphprune.backends.tensorrt) and `graphprune trt`.

The parsers run on real TensorRT output recorded in tests/data/tensorrt (SOURCES.md names where each file comes
from); the flag logic runs against the installed tensorrt's enums when it imports; the build, run and latency
test needs TensorRT and a CUDA GPU and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graphprune.onnx
from graphprune.backends import tensorrt as backend
from graphprune.backends.tensorrt import BuildReport, parse_inspector, parse_sparsity_log, precision_plan
from graphprune.cli import main
from graphprune.errors import BackendError, UsageError

DATA = Path(__file__).parent / "data" / "tensorrt"

# BuilderFlag members as the Python bindings declare them (python/src/infer/pyCore.cpp in NVIDIA/TensorRT at the
# tags v10.16 and v11.1; the 10.16.1.11 and 11.4.0.106 binding wheels hold the same names): only what the
# precision logic reads.
FLAGS_10 = {"FP16", "BF16", "INT8", "FP8", "SPARSE_WEIGHTS", "TF32", "OBEY_PRECISION_CONSTRAINTS"}
FLAGS_11 = {"SPARSE_WEIGHTS", "TF32", "DEBUG", "REFIT"}


def _text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# ---- the build log ------------------------------------------------------------------------------------------

def test_sparsity_lines_of_a_tensorrt_10_16_build():
    """Recent 10.x logs these at VERBOSE, once per Myelin subgraph ("(foreignNode)") and once for the engine."""
    text = _text("trt10.16_cookbook_sparsity_build.log")
    assert sum("(Sparsity)" in line for line in text.splitlines()) == 4
    eligible, picked = parse_sparsity_log(text)
    assert eligible == ["node_linear", "node_conv2d + node_relu", "node_conv2d_1 + node_relu_1"]
    assert picked == []  # an fp32 build: TensorRT chose no sparse tactic
    assert parse_sparsity_log(text.splitlines(keepends=True)) == (eligible, picked)


def test_sparsity_lines_in_the_older_info_format():
    eligible, picked = parse_sparsity_log(_text("trt_developer_guide_sparsity_example.log"))
    assert eligible == ["conv1", "conv2", "conv3"] and picked == ["conv2", "conv3"]
    text = _text("trt8_pytorch_tensorrt_issue1340_excerpt.log")
    assert sum("(Sparsity)" in line for line in text.splitlines()) == 2
    assert parse_sparsity_log(text) == ([], [])  # both lists empty in that build; no other line leaks in


def test_a_log_without_sparsity_lines_gives_nothing():
    assert parse_sparsity_log(_text("trt10.16_cookbook_layer_info.json")) == ([], [])


# ---- the engine inspector -----------------------------------------------------------------------------------

def test_inspector_json_of_tensorrt_10_16():
    text = _text("trt10.16_cookbook_layer_info.json")
    layers = parse_inspector(text)
    assert [layer.name for layer in layers] == [
        "node_conv2d + node_relu", "node_max_pool2d", "node_conv2d_1 + node_relu_1", "node_max_pool2d_1",
        "node_linear_myl4_0", "__myl_MulSum_myl4_1", "__myl_AddMaxrSubExpSum_myl4_2", "__myl_DivMulMaxr_myl4_3",
        "__myl_CastReshCast_myl4_4"]
    by_name = {layer.name: layer for layer in layers}
    conv = by_name["node_conv2d_1 + node_relu_1"]
    assert conv.type == "CaskConvolution" and conv.has_sparse_weights is False and conv.precision == "fp32"
    assert conv.tactic.startswith("sm50_xmma_conv_fprop_fused_conv_act_fp32")
    assert [layer.name for layer in layers if layer.has_sparse_weights is not None] == [
        "node_conv2d + node_relu", "node_conv2d_1 + node_relu_1"]
    assert by_name["node_linear_myl4_0"].type == "gemm" and by_name["node_linear_myl4_0"].precision == "fp32"
    assert by_name["__myl_CastReshCast_myl4_4"].precision == "int64"
    assert backend.inspector_io_names(text) == ["x", "y", "z"]


def test_inspector_json_of_an_fp16_resnet_from_trex():
    text = _text("trt8_trex_resnet_a100_fp16.graph.json")
    layers = parse_inspector(text)
    assert len(layers) == 36
    convs = [layer for layer in layers if layer.has_sparse_weights is not None]
    assert len(convs) == 21 and not any(layer.has_sparse_weights for layer in convs)
    assert {layer.type for layer in convs} == {"CaskConvolution"}  # the 20 convolutions and the Gemm head
    first = next(layer for layer in layers if layer.name == "Conv_0 + Relu_1")
    assert first.precision == "fp16" and first.tactic.startswith("trt_turing_cutlass_image_network_first_layer")
    assert layers[0].type == "Reformat" and layers[0].precision == "fp16"  # "Channel major FP16 format where ..."
    assert layers[-1].precision == "fp32"  # "Row major linear FP32"
    assert backend.inspector_io_names(text) == ["input.1", "191"]


def test_inspector_tensorrt_11_keys_on_the_recorded_10_16_layers():
    """No TensorRT 11 inspector JSON was found published (SOURCES.md). This is NOT a recording: it applies to the
    real 10.16 file the two changes NVIDIA's own tools handle for 11 (Polygraphy: "TensorRT 11 split the combined
    'Format/Datatype' field into separate 'Datatype' and 'Format' keys"; the TensorRT cookbook reads the I/O
    tensors from "I/O Tensors" objects instead of "Bindings"), to check the parser reads both spellings alike."""
    import json

    data = json.loads(_text("trt10.16_cookbook_layer_info.json"))
    for layer in data["Layers"]:
        for tensor in layer["Inputs"] + layer["Outputs"]:
            tensor["Datatype"] = tensor.pop("Format/Datatype")
    data["I/O Tensors"] = [{"Name": name} for name in data.pop("Bindings")]
    assert parse_inspector(data) == parse_inspector(_text("trt10.16_cookbook_layer_info.json"))
    assert backend.inspector_io_names(data) == ["x", "y", "z"]


def test_not_inspector_json_is_refused():
    with pytest.raises(BackendError, match="Layers"):
        parse_inspector('{"performance_summary": {}}')


def test_report_joins_the_log_and_the_inspector():
    """The cookbook's sparsity build and its trtexec layer-info export are two builds of the same network (the
    same layer names); joined they give one row per layer either source names."""
    eligible, picked = parse_sparsity_log(_text("trt10.16_cookbook_sparsity_build.log"))
    report = BuildReport(engine_path="model.engine", tensorrt_version="10.16.1",
                         layers=parse_inspector(_text("trt10.16_cookbook_layer_info.json")),
                         eligible=eligible, picked=picked)
    rows = [(r.layer, r.eligible, r.picked, r.has_sparse_weights) for r in report.rows()]
    assert rows == [("node_conv2d + node_relu", True, False, False),
                    ("node_conv2d_1 + node_relu_1", True, False, False),
                    ("node_linear", True, False, None)]  # inside the Myelin subgraph: no inspector layer of that name
    summary = report.summary()
    assert "0 of 3 eligible layers run sparse kernels" in summary and "TensorRT 10.16.1" in summary
    assert "node_conv2d_1 + node_relu_1  yes       no             no" in summary


# ---- flags and precision ------------------------------------------------------------------------------------

def test_precision_on_tensorrt_10_sets_the_fp16_flag():
    assert precision_plan(FLAGS_10, "float16", None, True) == (True, [])
    on, notes = precision_plan(FLAGS_10, "float32", None, True)
    assert on and "float16" in notes[0]
    off, notes = precision_plan(FLAGS_10, "float32", False, True)
    assert not off and "no sparse kernels at float32" in notes[0]


def test_precision_on_tensorrt_11_comes_from_the_file():
    assert precision_plan(FLAGS_11, "float16", None, True) == (False, [])
    assert precision_plan(FLAGS_11, "float16", True, True) == (False, [])
    on, notes = precision_plan(FLAGS_11, "float32", None, True)
    assert not on and "TensorRT 11" in notes[0] and "--fp16" in notes[0]
    with pytest.raises(UsageError, match="no FP16 builder flag"):
        precision_plan(FLAGS_11, "float32", True, True)
    assert precision_plan(FLAGS_11, "float32", None, False) == (False, [])


def _tensorrt_or_skip():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        pytest.skip(f"tensorrt does not import here ({type(exc).__name__}: {exc}); install graphprune[tensorrt]")
    return tensorrt


def test_flags_against_the_installed_tensorrt():
    trt = _tensorrt_or_skip()
    major = int(trt.__version__.split(".")[0])
    bits, names = backend.creation_flags(trt)
    members = set(trt.NetworkDefinitionCreationFlag.__members__)
    assert set(names) <= members
    assert bits == sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, n)) for n in names)
    if major >= 10:
        assert names == [] and bits == 0  # explicit batch is implied (10) or gone (11)
    if major >= 11:
        assert "EXPLICIT_BATCH" not in members
    flags = backend.builder_flag_names(trt)
    assert "SPARSE_WEIGHTS" in flags
    assert ("FP16" in flags) == (major < 11)
    assert hasattr(trt.LayerInformationFormat, "JSON") and hasattr(trt.ProfilingVerbosity, "DETAILED")
    set_fp16, _ = precision_plan(flags, "float16", None, True)
    assert set_fp16 == (major < 11)


# ---- ONNX files and the command line ------------------------------------------------------------------------

class Convs(nn.Module):
    """Wide enough (256 channels, 3x3) that TensorRT has a reason to try sparse kernels."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.a = nn.Conv2d(64, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 64, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def sparse_fp16(tmp_path_factory):
    """A 2:4-masked float16 ONNX file and its float32 original."""
    from .conftest import export_onnx

    tmp = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    src = export_onnx(Convs().eval(), torch.randn(1, 64, 16, 16), tmp / "model.onnx")
    dst = tmp / "sparse16.onnx"
    report = graphprune.onnx.sparsify(src, dst, "2:4", fp16=True)
    assert len(report.masked) == 3, str(report)
    return Path(src), dst


def test_weight_dtype_of_onnx_files(sparse_fp16):
    src, dst = sparse_fp16
    assert backend.onnx_weight_dtype(src) == "float32"
    assert backend.onnx_weight_dtype(dst) == "float16"


def test_the_module_imports_without_tensorrt():
    code = "import sys, graphprune, graphprune.backends.tensorrt; sys.exit('tensorrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True).returncode == 0


def test_cli_without_tensorrt_or_a_gpu_says_so_and_writes_nothing(sparse_fp16, tmp_path, capsys):
    reason = backend.available()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: test_build_run_and_time_an_engine covers the command")
    _, dst = sparse_fp16
    out = tmp_path / "x.engine"
    assert main(["trt", str(dst), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"graphprune: error: {reason}"
    assert "TensorRT" in reason or "GPU" in reason
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(BackendError, match=reason.split(":")[0]):
        backend.build(dst, out)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_usage_errors(tmp_path, capsys, sparse_fp16):
    assert main(["trt", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.engine")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert main(["trt", str(sparse_fp16[1]), "-o", str(tmp_path / "nowhere" / "x.engine")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["trt", str(sparse_fp16[1])])  # -o is required
    assert exit_.value.code == 2
    assert not any(tmp_path.iterdir())


# ---- on a GPU with TensorRT ---------------------------------------------------------------------------------

def test_build_run_and_time_an_engine(sparse_fp16, tmp_path, capsys):
    reason = backend.available()
    if reason is not None:
        pytest.skip(reason)
    from graphprune.ir.from_onnx import session

    _, dst = sparse_fp16
    engine = tmp_path / "sparse.engine"
    report = backend.build(dst, engine)
    assert engine.is_file() and engine.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["sparse.engine"]  # no temporary file left behind
    assert report.layers and len(report.eligible) >= 2, report.summary()  # the two 3x3 convolutions hold 2:4
    assert set(report.picked) <= set(report.eligible)
    by_name = {layer.name: layer for layer in report.layers}
    for name in report.picked:
        if name in by_name:
            assert by_name[name].has_sparse_weights is True, report.summary()
    x = torch.randn(1, 64, 16, 16)
    want = session(dst.read_bytes()).run(None, {"input_0": x.numpy()})[0]
    got = backend.run_engine(engine, {"input_0": x})
    (out,) = got.values()
    assert out.is_cuda and tuple(out.shape) == want.shape
    scale = float(np.abs(want).max())
    assert float(np.abs(out.float().cpu().numpy() - want).max()) <= 2e-2 * scale
    median, p90 = backend.latency(engine, {"input_0": x}, runs=20, warmup=3)
    assert 0 < median <= p90
    assert main(["trt", str(dst), "-o", str(tmp_path / "cli.engine")]) == 0
    printed = capsys.readouterr().out
    assert "eligible layers run sparse kernels" in printed and (tmp_path / "cli.engine").is_file()
