"""The built-in demo (graphprune.demo) and the command line (graphprune.cli)."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("sklearn")

import graphprune
from graphprune import demo
from graphprune.cli import main

TARGET = 0.5


@pytest.fixture(scope="module")
def threads_before_run():
    """A thread count other than the demo's 1, so the test can see whether the demo restores it."""
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(original)


@pytest.fixture(scope="module")
def result(threads_before_run):
    out = io.StringIO()
    res = demo.run(target_flops=TARGET, epochs=4, finetune_epochs=2, seed=0, latency_runs=20, file=out)
    res["printed"] = out.getvalue()
    res["threads_after"] = torch.get_num_threads()
    return res


def _torch_flops(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


# ----- demo ----------------------------------------------------------------------------------------------

def test_demo_trains_an_accurate_model(result):
    assert result["accuracy"]["original"] > 0.9


def test_demo_meets_the_flops_target(result):
    assert result["flops_ratio"] <= TARGET + 1e-9
    assert abs(result["flops_ratio"] - TARGET) <= 0.01
    assert result["flops"]["after"] < result["flops"]["before"]
    assert result["params"]["after"] < result["params"]["before"]


def test_demo_plan_flops_match_the_slim_model(result):
    """The plan's accounting agrees with torch's own FLOP counter run on the physical models."""
    x = torch.zeros(1, 1, 8, 8)
    before, after = _torch_flops(result["model"], x), _torch_flops(result["pruned_model"], x)
    assert result["flops"]["before"] == pytest.approx(before)
    assert result["flops"]["after"] == pytest.approx(after)
    assert graphprune.count_flops(result["pruned_model"], x) == pytest.approx(after)


def test_demo_pruned_model_is_smaller_and_recovers(result):
    slim = result["pruned_model"]
    n_slim = sum(p.numel() for p in slim.parameters())
    n_orig = sum(p.numel() for p in result["model"].parameters())
    assert n_slim == result["params"]["after"] < n_orig == result["params"]["before"]
    assert result["pruned_model"](torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert result["accuracy"]["finetuned"] > 0.85
    assert 0.0 <= result["accuracy"]["pruned"] <= 1.0


def test_demo_latency_numbers(result):
    lat = result["latency_ms"]
    for which in ("original", "pruned"):
        assert set(lat[which]) == {1, 64}
        for ms in lat[which].values():
            assert ms > 0 and math.isfinite(ms)


def test_demo_prints_summary_table_and_roundtrip(result):
    printed = result["printed"]
    assert result["roundtrip_ok"] is True
    assert "save/load round-trip: OK" in printed
    assert result["summary"] in printed
    assert "of original; target flops 0.5" in printed
    for row in ("test accuracy", "FLOPs", "params", "latency, batch 1 (ms)", "latency, batch 64 (ms)"):
        assert row in printed


def test_demo_restores_torch_threads(result, threads_before_run):
    assert result["threads_after"] == threads_before_run


def test_demo_rejects_bad_arguments_before_training():
    for bad in (0, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"target_flops must be a number in \(0, 1\]"):
            demo.run(target_flops=bad, file=io.StringIO())
    with pytest.raises(ValueError, match="epochs"):
        demo.run(epochs=0, file=io.StringIO())


def test_demo_data_split_is_deterministic():
    (xa, ya), (xt, yt) = demo.load_data(0)
    (xb, yb), _ = demo.load_data(0)
    (xc, _), _ = demo.load_data(1)
    assert len(xa) + len(xt) == 1797 and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    assert set(yt.tolist()) == set(range(10))  # stratified: every class is in the test split


# ----- command line ------------------------------------------------------------------------------------

def test_cli_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"graphprune {graphprune.__version__}"
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"graphprune {graphprune.__version__}"


def test_cli_target_out_of_range_is_a_one_line_error(capsys):
    assert main(["demo", "--target-flops", "1.5"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("graphprune: error: ")
    assert "(0, 1]" in lines[0] and "1.5" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_debug_shows_the_exception():
    with pytest.raises(ValueError):
        main(["--debug", "demo", "--target-flops", "1.5"])
    with pytest.raises(ValueError):
        main(["demo", "--target-flops", "1.5", "--debug"])


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["demo", "--target-flops", "half"], ["demo", "--bogus"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("graphprune: error: ") and "--help" in err


def test_cli_demo_forwards_options_and_reports_library_errors(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "run", lambda **kw: calls.append(kw) or {})
    assert main(["demo", "--target-flops", "0.3", "--epochs", "2", "--seed", "7"]) == 0
    assert calls == [{"target_flops": 0.3, "epochs": 2, "finetune_epochs": 3, "seed": 7}]

    def failing(**kw):
        raise graphprune.BudgetError("target FLOPs ratio 0.010 is out of reach:\n ask for at least 0.100")

    monkeypatch.setattr(demo, "run", failing)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == ("graphprune: error: target FLOPs ratio 0.010 is out of reach: ask for at "
                                       "least 0.100\n")


def test_python_dash_m_graphprune():
    proc = subprocess.run([sys.executable, "-m", "graphprune", "version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"graphprune {graphprune.__version__}"
    proc = subprocess.run([sys.executable, "-m", "graphprune", "nonsense"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
