"""Property tests: random DAGs of conv / linear / norm layers joined by add, cat, split, chunk and reshape.
For every drawn model: the plan meets the FLOPs target (or says what is reachable), the slimmed model
keeps its output shape, and the exactness oracle holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphprune
from graphprune.analysis.channels import analyze
from graphprune.analysis.cost import CostModel
from graphprune.ir.from_torch import trace

from .conftest import oracle_error, run

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "none": lambda x: x}


class RandomDag(nn.Module):
    """Interprets a drawn program; every tensor is (batch, channels, 8, 8)."""

    def __init__(self, program: list[tuple], in_ch: int = 3):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList()
        widths = [in_ch]
        for step in program:
            kind = step[0]
            if kind == "conv":
                _, src, out, k, groups, norm, _ = step
                cin = widths[src]
                g = groups if cin % groups == 0 and out % groups == 0 else 1
                block = [nn.Conv2d(cin, out, k, padding=k // 2, groups=g)]
                if norm == "bn":
                    block.append(nn.BatchNorm2d(out))
                elif norm == "gn":
                    block.append(nn.GroupNorm(2 if out % 2 == 0 else 1, out))
                self.layers.append(nn.Sequential(*block))
                widths.append(out)
            elif kind == "linear":  # channel-last linear: permute, Linear, permute back
                _, src, out, _ = step
                self.layers.append(nn.Linear(widths[src], out))
                widths.append(out)
            elif kind == "add":
                _, a, b = step
                self.layers.append(nn.Conv2d(widths[b], widths[a], 1))  # brings b to a's width
                widths.append(widths[a])
            elif kind == "cat":
                _, a, b = step
                self.layers.append(nn.Identity())
                widths.append(widths[a] + widths[b])
            elif kind in ("chunk", "split"):
                _, src = step
                self.layers.append(nn.Identity())
                widths.append(widths[src] - widths[src] // 2 if kind == "split" else widths[src] // 2)
            elif kind in ("reshape", "reshape_fixed"):  # flatten spatial into channels-last tokens and back
                _, src = step
                self.layers.append(nn.Linear(widths[src], widths[src]))
                widths.append(widths[src])
        self.widths = widths
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x):
        values = [x]
        for step, layer in zip(self.program, self.layers):
            kind = step[0]
            if kind == "conv":
                values.append(ACTS[step[-1]](layer(values[step[1]])))
            elif kind == "linear":
                y = layer(values[step[1]].permute(0, 2, 3, 1))
                values.append(ACTS[step[-1]](y).permute(0, 3, 1, 2))
            elif kind == "add":
                values.append(values[step[1]] + layer(values[step[2]]))
            elif kind == "cat":
                values.append(torch.cat([values[step[1]], values[step[2]]], dim=1))
            elif kind == "chunk":
                src = values[step[1]]
                values.append(src[:, : src.shape[1] // 2 * 2].chunk(2, dim=1)[1])
            elif kind == "split":
                src = values[step[1]]
                values.append(torch.split(src, src.shape[1] // 2, dim=1)[-1] if src.shape[1] % 2 == 0
                              else src[:, src.shape[1] // 2:])
            elif kind in ("reshape", "reshape_fixed"):
                src = values[step[1]]
                b, c, h, w = src.shape
                tokens = F.relu(layer(src.reshape(b, c, h * w).transpose(1, 2)))
                # reshape_fixed takes the width from the source, as code that assumes equal widths does
                width = c if kind == "reshape_fixed" else tokens.shape[-1]
                values.append(tokens.transpose(1, 2).reshape(b, width, h, w))
        return self.head(values[-1].mean((2, 3)))


def _coarsest_channel(model, x) -> float:
    """Largest fraction of the model's FLOPs that one prunable component saves."""
    an = analyze(trace(model, x)[0])
    cost = CostModel(an, an.flop_terms)
    return float(cost.first_order_saving()[an.prunable].max() / cost.total())


@st.composite
def programs(draw):
    n = draw(st.integers(2, 7))
    program = [("conv", 0, draw(st.integers(16, 32)), 3, 1, draw(st.sampled_from(["bn", "none"])), "relu")]
    for i in range(1, n):
        count = i + 1  # values so far (input + i steps)
        src = draw(st.integers(1, count - 1))
        kind = draw(st.sampled_from(["conv", "conv", "linear", "add", "cat", "chunk", "split", "reshape",
                                     "reshape_fixed"]))
        if kind == "conv":
            program.append(("conv", src, draw(st.integers(8, 32)), draw(st.sampled_from([1, 3])),
                            draw(st.sampled_from([1, 1, 2, 4])), draw(st.sampled_from(["bn", "gn", "none"])),
                            draw(st.sampled_from(list(ACTS)))))
        elif kind == "linear":
            program.append(("linear", src, draw(st.integers(8, 32)), draw(st.sampled_from(list(ACTS)))))
        elif kind in ("add", "cat"):
            program.append((kind, src, draw(st.integers(1, count - 1))))
        else:
            program.append((kind, src))
    program.append(("conv", len(program), draw(st.integers(16, 32)), 3, 1, "none", "relu"))
    return program


CASES = 60


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.floats(0.4, 0.95), st.sampled_from(["l2", "random"]))
def _random_dag_case(outcomes, program, target, importance):
    torch.manual_seed(0)
    model = RandomDag(program).eval()
    x = torch.randn(2, 3, 8, 8)
    try:
        plan = graphprune.plan(model, x, target_flops=target, importance=importance)
    except graphprune.BudgetError as err:
        assert err.reachable > target  # the error names a ratio that really is above the target
        outcomes.append("unreachable")
        return
    outcomes.append("planned")
    assert plan.flops_ratio <= target + 1e-9
    # lands within 0.01 below the target, or within one channel's worth where channels are coarse
    assert target - plan.flops_ratio <= max(0.01, 1.01 * _coarsest_channel(model, x))
    if any(step[0] in ("reshape_fixed", "chunk", "split") for step in program):
        # widths derived in forward code (fixed reshapes, shape[1] // 2 slices) may not follow the new widths:
        # prune() verifies and falls back to a regenerated graph
        slim = graphprune.prune(model, x, target_flops=target, importance=importance)
        reference = slim.graphprune_plan.mask(model)
        assert torch.allclose(run(slim, x), run(reference, x), rtol=1e-5, atol=1e-6)
        return
    slim = plan.apply(model)
    assert run(slim, x).shape == run(model, x).shape
    assert oracle_error(plan, model, x) <= 1e-5
    counted = graphprune.count_flops(slim, x) / graphprune.count_flops(model, x)
    assert abs(counted - plan.flops_ratio) <= 1e-6


def test_random_dags_prune_exactly():
    """A fixed seed, so a failure reproduces; and most drawn cases must really plan (a BudgetError returns early),
    or the checks above test little."""
    outcomes: list[str] = []
    _random_dag_case(outcomes)
    assert len(outcomes) >= 0.9 * CASES
    assert outcomes.count("planned") >= 0.9 * len(outcomes), outcomes
