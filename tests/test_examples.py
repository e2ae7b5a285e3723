"""The scripts in examples/ run as a user runs them (a subprocess, small settings through
GRAPHPRUNE_EXAMPLE_SMALL=1), and what they write and print is checked against the files themselves; plus
PruningPlan.report on a PyTorch plan."""

from __future__ import annotations

import html
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import graphprune
import graphprune.onnx
from graphprune.errors import UsageError

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, out: pathlib.Path) -> str:
    """Run examples/NAME from an unrelated directory, so nothing it writes lands outside `out`."""
    env = {**os.environ, "GRAPHPRUNE_EXAMPLE_SMALL": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GRAPHPRUNE_EXAMPLE_OUT", None)
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--out", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # wrote only into its output directory
    return done.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text[-3000:]}"
    return float(match.group(1))


def load_example(name: str, monkeypatch):
    """The example as a module (with the small settings), to reuse its data and model factory."""
    monkeypatch.setenv("GRAPHPRUNE_EXAMPLE_SMALL", "1")
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_documented():
    names = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = re.findall(r'run_example\("(\w+\.py)"', pathlib.Path(__file__).read_text())
    assert names == sorted(tested)
    for name in names:
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""') and f"python examples/{name}" in source, name
        assert 'if __name__ == "__main__":' in source and "GRAPHPRUNE_EXAMPLE_SMALL" in source, name


def test_torchvision_cnn_example(tmp_path, monkeypatch):
    out = tmp_path / "out"
    stdout = run_example("prune_torchvision_cnn.py", out)
    printed_ratio = number(r"FLOPs ratio ([\d.]+) \(target 0.5\)", stdout)
    printed_accuracy = number(r"fine-tuned ([\d.]+)%", stdout) / 100

    example = load_example("prune_torchvision_cnn.py", monkeypatch)
    _, (x_test, y_test) = example.load_data()
    slim = graphprune.load(out / "resnet18-digits-slim.pt", example.make_model).eval()
    dense = example.make_model().eval()
    ratio = graphprune.count_flops(slim, x_test[:1]) / graphprune.count_flops(dense, x_test[:1])
    assert 0.49 <= ratio <= 0.5 + 1e-9 and abs(ratio - printed_ratio) < 6e-4
    assert slim.conv1.out_channels < 64  # really slimmed, not masked
    # the saved model is the fine-tuned one whose accuracy was printed
    assert abs(example.accuracy(slim, (x_test, y_test)) - printed_accuracy) < 1.5e-3
    plan = graphprune.PruningPlan.load(out / "resnet18-digits-plan.json")
    assert abs(plan.flops_ratio - ratio) < 1e-6


def test_hf_llm_example(tmp_path):
    import transformers

    out = tmp_path / "out"
    stdout = run_example("prune_hf_llm.py", out)
    dense_params = number(r"dense LLaMA: ([\d.]+)M parameters", stdout) * 1e6
    dense_ppl = number(r"perplexity: dense ([\d.]+)", stdout)
    slim_ppl = number(r"perplexity: dense [\d.]+, pruned ([\d.]+)", stdout)
    assert 1 < dense_ppl < 100  # even a few training steps beat a uniform guess over 256 bytes
    assert slim_ppl < 1.5 * dense_ppl  # flap + compensation keeps the model close

    loaded = transformers.LlamaForCausalLM.from_pretrained(out / "slim-llm").eval()  # no graphprune involved
    assert loaded.config.intermediate_size == number(r"intermediate_size (\d+)", stdout) < 384
    assert loaded.config.mlp_bias  # compensation added biases and the config describes them
    params = sum(p.numel() for p in loaded.parameters())
    assert abs(params / dense_params - 0.8) < 0.02
    prompt = torch.tensor([list(b"def ")])
    generated = loaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9) and int(generated.max()) < 256


def test_onnx_cli_example(tmp_path):
    import onnxruntime

    out = tmp_path / "out"
    stdout = run_example("prune_onnx_cli.py", out)
    src, dst = out / "mobilenet_v3_small.onnx", out / "slim.onnx"
    ratio = graphprune.onnx.count_flops(dst) / graphprune.onnx.count_flops(src)
    assert abs(ratio - 0.5) <= 0.01
    session = onnxruntime.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    plan = graphprune.PruningPlan.load(out / "plan.json")
    assert abs(plan.flops_ratio - ratio) < 1e-6
    assert "<svg" in (out / "report.html").read_text()
    assert "prunable groups" in stdout  # graphprune inspect
    medians = [float(m) for m in re.findall(r"\.onnx +([\d.]+) +[\d.]+ +[\d.]+x", stdout)]
    assert len(medians) == 2 and min(medians) > 0  # graphprune bench timed both files


def test_inspect_plan_example(tmp_path):
    out = tmp_path / "out"
    stdout = run_example("inspect_plan.py", out)
    plan = graphprune.PruningPlan.load(out / "plan.json")
    assert abs(number(r"fresh convnext_tiny: FLOPs ratio ([\d.]+)", stdout) - plan.flops_ratio) < 6e-4
    assert "layer norm normalizes" in stdout  # explain() gives the reason
    pinned, pinned_before = (number(p, stdout) for p in (r"allow_lossy=True: (\d+) weighted channels",
                                                          r"pinned instead of (\d+)"))
    assert pinned < pinned_before == sum(p["channels"] for p in plan.pinned)
    page = (out / "report.html").read_text()
    changed = [r for r in plan.layers if r["shape_before"] != r["shape_after"]]
    assert changed
    for row in changed:
        assert html.escape(row["layer"]) in page and "x".join(map(str, row["shape_after"])) in page


def test_plan_report_names_layers_and_widths(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    plan = graphprune.plan(model, torch.randn(1, 3, 64, 64), target_flops=0.5)
    plan.report(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    layers = [r for r in plan.layers if r["shape_before"] != r["shape_after"]]
    assert {r["layer"] for r in layers} >= {"conv1", "bn1", "layer1.0.conv1"}
    for r in layers:  # e.g. "layer1.0.conv1   64x64x3x3   13x16x3x3" in the summary table
        assert re.search(re.escape(r["layer"]) + r"\s+" + "x".join(map(str, r["shape_before"])) + r"\s+"
                         + "x".join(map(str, r["shape_after"])), page), r["layer"]
    for g in plan.groups:  # the chart: one bar per group, labelled "after / before"
        assert f">{g['after']} / {g['before']}</text>" in page
    assert f"({plan.flops_ratio:.3f})" in page
    with pytest.raises(UsageError, match=r"\.html"):
        plan.report(tmp_path / "report.txt")
    assert not (tmp_path / "report.txt").exists()
