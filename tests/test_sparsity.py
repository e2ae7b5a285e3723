"""graphprune.sparsify: N:M masks along each layer's input channels on real architectures (torchvision
convolutions, transformers' GPT-2 Conv1D and LLaMA Linear layers), skipped layers with their reasons, and
the reconstruction SparseGPT's updates buy over masks alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision

import graphprune
import graphprune.cli
import graphprune.onnx
import graphprune.verify
from graphprune.errors import UsageError
from graphprune.passes.calibration import reader_kind

T = pytest.importorskip("transformers")


def _groups(module: torch.nn.Module, weight: torch.Tensor, m: int = 4) -> torch.Tensor:
    """The weight as [..., groups of m consecutive input channels, m]."""
    kind, axis = reader_kind(module)
    w = weight.detach().movedim(axis, -1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _gpt2():
    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return T.GPT2LMHeadModel(config).eval()


def test_magnitude_masks_keep_the_two_largest_of_every_four_input_channels():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    sparse = graphprune.sparsify(model, x)
    report = sparse.graphprune_sparsity
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is unchanged
    assert [layer.name for layer in report.skipped] == ["conv1"] and "3 input channels" in report.skipped[0].reason
    modules = dict(sparse.named_modules())
    originals = dict(model.named_modules())
    for layer in report.masked:
        new = _groups(modules[layer.name], modules[layer.name].weight)
        old = _groups(originals[layer.name], originals[layer.name].weight)
        kept = new != 0
        assert (kept.sum(-1) == 2).all(), layer.name  # random weights have no zeros of their own
        assert torch.equal(new[kept], old[kept])  # kept weights unchanged
        largest = old.abs().topk(2, dim=-1).indices
        assert kept.gather(-1, largest).all(), layer.name
        assert 0.5 < layer.kept_magnitude < 1
    out = sparse(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, model(x))

    same = graphprune.sparsify(model, x, inplace=True)
    assert same is model and torch.equal(model.fc.weight, sparse.fc.weight)


def test_skip_reasons_on_gpt2_and_a_narrow_linear():
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 16))
    report = graphprune.sparsify(model, {"input_ids": ids}, ignore=["transformer.h.1.mlp"]).graphprune_sparsity
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert "tied" in reasons["lm_head"]  # shares the embedding: masking it would change the input side too
    assert reasons["transformer.h.1.mlp.c_fc"] == reasons["transformer.h.1.mlp.c_proj"] == "ignored"
    assert {layer.name for layer in report.masked} >= {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"}

    narrow = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 12))
    report = graphprune.sparsify(narrow, torch.randn(3, 20), pattern="1:2").graphprune_sparsity
    assert [layer.masked for layer in report.layers] == [True, True]  # 1:2 has no tensor-core shape rule
    report = graphprune.sparsify(narrow, torch.randn(3, 20)).graphprune_sparsity
    assert "inputs % 16" in report.layers[0].reason and "outputs % 8" in report.layers[1].reason


def test_wanda_and_sparsegpt_fit_the_layer_outputs_on_held_out_tokens():
    """The output error on held-out tokens: SparseGPT's updated weights beat both masks on every layer, and
    Wanda's mask beats magnitude's in all (LLaMA, random weights, uneven input channel scales, 2:4)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # inputs with uneven channel scales, as in trained LLMs
        model.model.embed_tokens.weight.mul_(torch.rand(64) * 4 + 0.1)
    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 100, (4, 32), generator=gen)} for _ in range(4)]
    held_out = {"input_ids": torch.randint(0, 100, (4, 32), generator=gen)}
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(**held_out)
    for h in hooks:
        h.remove()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        sparse = graphprune.sparsify(model, held_out, method=method, calibration=calibration)
        masked = {layer.name for layer in sparse.graphprune_sparsity.masked}
        assert masked >= {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
        modules = dict(sparse.named_modules())
        errors[method] = {}
        for name in masked:
            x, dense = inputs[name], dict(model.named_modules())[name].weight
            with torch.no_grad():
                errors[method][name] = float((x @ (modules[name].weight - dense).T).norm() / (x @ dense.T).norm())
    for name in errors["sparsegpt"]:
        assert errors["sparsegpt"][name] < min(errors["wanda"][name], errors["magnitude"][name]), name
    total = {method: sum(e.values()) for method, e in errors.items()}
    assert total["sparsegpt"] < 0.9 * total["wanda"] and total["wanda"] < 0.95 * total["magnitude"], total


def test_bad_input_is_refused():
    model = torch.nn.Linear(16, 8)
    x = torch.randn(2, 16)
    for pattern in ("4:2", "2-4", "0:4"):
        with pytest.raises(UsageError, match="N:M"):
            graphprune.sparsify(model, x, pattern=pattern)
    with pytest.raises(UsageError, match="calibration"):
        graphprune.sparsify(model, x, method="wanda")
    with pytest.raises(UsageError, match="method must be"):
        graphprune.sparsify(model, x, method="random", calibration=[x])


def test_sparsegpt_on_convolutions_reads_unfolded_patches():
    """3x3 convolutions: SparseGPT's statistics are the unfolded patches in (tap, channel) order, the order its
    N:M groups and weight updates use; a wrong order would make the updates hurt instead of help."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1().eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2)]
    held_out = torch.randn(8, 3, 32, 32, generator=gen)
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        model(held_out)
    for h in hooks:
        h.remove()
    error = {}
    for method in ("wanda", "sparsegpt"):
        sparse = graphprune.sparsify(model, held_out, method=method, calibration=calibration)
        report = sparse.graphprune_sparsity
        convs = [layer for layer in report.masked if layer.shape[2:] == (3, 3)]
        assert len(convs) == 8 and not any("Wanda's mask" in layer.reason for layer in convs)
        modules, dense = dict(sparse.named_modules()), dict(model.named_modules())
        with torch.no_grad():
            error[method] = sum(float((modules[c.name](inputs[c.name]) - dense[c.name](inputs[c.name])).norm()
                                      / dense[c.name](inputs[c.name]).norm()) for c in convs)
    assert error["sparsegpt"] < 0.6 * error["wanda"], error


def test_a_mask_that_breaks_the_outputs_is_refused():
    """log of a sum that masking turns negative: the masked model's outputs go NaN, so sparsify raises."""

    class LogOf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.linear(x).log()

    model = LogOf()
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([-5.0, 4.0, 4.0, -2.9]).repeat(8, 4))  # dense sum > 0, masked < 0
    x = torch.ones(2, 16)
    assert torch.isfinite(model(x)).all()
    before = model.linear.weight.clone()
    with pytest.raises(graphprune.GraphPruneError, match="non-finite outputs"):
        graphprune.sparsify(model, x)
    assert torch.equal(model.linear.weight, before)


class ConvMLP(torch.nn.Module):
    """Every case the ONNX sparsity pass sorts: a 3-channel stem (too few inputs), a 32-channel conv, a depthwise
    conv (grouped), Linear layers exported as Gemm (2-d input) and as MatMul with a transposed initializer
    (3-d input), and a 10-way classifier (outputs not a multiple of 8)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.tokens, self.fc, self.head = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.conv(torch.relu(self.stem(x))))))
        x = torch.relu(self.tokens(x.flatten(2).transpose(1, 2)))  # [batch, pixels, 64]: MatMul
        return self.head(torch.relu(self.fc(x.mean(1))))  # [batch, 64]: Gemm


def _polygraphy_sparse(path) -> set[str]:
    onnx = pytest.importorskip("onnx")
    sparse_tool = pytest.importorskip("polygraphy.tools.sparse")
    pruner = sparse_tool.SparsityPruner(onnx.load(str(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its float16 arithmetic overflows harmlessly
        pruner.check()
    return pruner.sparse_tensors


def test_onnx_sparsity_is_the_torch_pass_and_polygraphy_agrees(tmp_path, capsys):
    from .conftest import export_onnx

    pytest.importorskip("onnxruntime")
    from graphprune.ir.from_onnx import session

    onnx = pytest.importorskip("onnx")
    from graphprune.backends import onnx_sparsity

    torch.manual_seed(0)
    model, x = ConvMLP().eval(), torch.randn(2, 3, 8, 8)
    src = export_onnx(model, x, tmp_path / "model.onnx")
    flops = graphprune.onnx.count_flops(src)
    original = open(src, "rb").read()
    report = graphprune.onnx.sparsify(src, tmp_path / "sparse.onnx")
    assert open(src, "rb").read() == original and not _polygraphy_sparse(src)
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert len(report.masked) == 3 and len(reasons) == 3, str(report)
    assert any("3 input channels" in r for r in reasons.values()) and any("grouped" in r for r in reasons.values())
    assert any("10 outputs" in r for r in reasons.values())
    # the same masks as graphprune.sparsify on the PyTorch model: the outputs agree
    sparse = graphprune.sparsify(model, x)
    got = session(open(tmp_path / "sparse.onnx", "rb").read()).run(None, {"input_0": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), sparse(x).detach(), atol=1e-5)
    # polygraphy's checker finds the pattern exactly on the weights graphprune masked
    assert _polygraphy_sparse(tmp_path / "sparse.onnx") == {layer.name for layer in report.masked}

    assert graphprune.cli.main(["inspect", str(tmp_path / "sparse.onnx"), "--sparsity"]) == 0
    out = capsys.readouterr().out
    assert "6 weighted layers, 3 can hold 2:4, 3 hold it" in out and "float32: no sparse kernels" in out

    # pruned, masked and written in float16 in one run: widths stay multiples of 16, so the pruned layers keep
    # their eligibility; the file passes the full checker (the CLI refuses otherwise) and runs
    assert graphprune.cli.main(["prune", src, "-o", str(tmp_path / "slim.onnx"), "--target-flops", "0.6",
                                "--sparsity", "2:4", "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "2:4 sparsity (magnitude): 3 of 6 weighted layers masked" in out and "float16 weights" in out
    proto = onnx.load(str(tmp_path / "slim.onnx"))
    rows = onnx_sparsity.rows(proto, 2, 4)
    holding = {name for _, name, _, holds, _, _ in rows if holds == "yes"}
    assert len(holding) == 3 and _polygraphy_sparse(tmp_path / "slim.onnx") == holding
    assert {trt for _, name, _, _, _, trt in rows if name in holding} == {"eligible; under 256 channels, usually dense"}
    half = session(proto.SerializeToString()).run(None, {"input_0": x.numpy()})[0]
    assert half.dtype == "float32" and torch.isfinite(torch.from_numpy(half)).all()
    assert proto.graph.initializer and graphprune.onnx.count_flops(tmp_path / "slim.onnx") < 0.65 * flops
    eligible = [w for w in onnx_sparsity.weights(proto, 2, 4) if not w.reason]
    assert {w.name for w in eligible} == holding and all(w.shape[w.in_axis] % 16 == 0 for w in eligible)


def test_onnx_vit_pruned_masked_in_float16_holds_the_pattern_everywhere_graphprune_says(tmp_path):
    """A real transformer through `graphprune prune --sparsity 2:4 --fp16`: every layer graphprune calls eligible
    holds the pattern by polygraphy's reading too, and the file runs in ONNX Runtime close to the float32 one."""
    from .conftest import export_onnx

    timm = pytest.importorskip("timm")
    onnx = pytest.importorskip("onnx")
    from graphprune.backends import onnx_sparsity
    from graphprune.ir.from_onnx import session

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=16).eval()
    x = torch.randn(1, 3, 64, 64)
    src = export_onnx(model, x, tmp_path / "vit.onnx")
    out = tmp_path / "vit-slim.onnx"
    assert graphprune.cli.main(["prune", src, "-o", str(out), "--target-params", "0.7", "--sparsity", "2:4",
                                "--fp16"]) == 0
    proto = onnx.load(str(out))
    layers = onnx_sparsity.weights(proto, 2, 4)
    eligible = {w.name for w in layers if not w.reason}
    # 12 blocks x (qkv, proj, fc1, fc2) as MatMul, the head as Gemm; attention's activation MatMuls and the
    # 3-channel patch embedding are skipped
    assert len(eligible) == 49 and {w.op for w in layers if not w.reason} == {"Gemm", "MatMul"}
    assert sum("operand computed in the graph" in w.reason for w in layers) == 24
    assert _polygraphy_sparse(out) == eligible
    assert all(w.dtype == "float16" for w in layers if not w.reason)
    got = session(proto.SerializeToString()).run(None, {"input_0": x.numpy()})[0]
    assert torch.isfinite(torch.from_numpy(got)).all() and got.shape == (1, 16)


def _permutations(model, x):
    from graphprune.analysis.channels import analyze
    from graphprune.ir.from_torch import trace
    from graphprune.passes.nm import _skip_reason, weighted_layers
    from graphprune.passes.permute import plan_permutations

    an = analyze(trace(model, x)[0])
    layers = [(name, module) for name, module in weighted_layers(model) if _skip_reason(module, 2, 4) is None]
    return plan_permutations(model, an, layers, 2, 4)


@pytest.mark.parametrize("arch", ["resnet18", "llama", "gpt2"])
def test_channel_permutation_keeps_the_model_exact_and_more_magnitude(arch):
    """Reordering a channel group in every tensor it spans (producers' rows, readers' columns, norms, biases,
    embeddings) computes the same function; the searched order keeps more |W| under 2:4 masks; the inverse
    brings the tensors back bit for bit."""
    from graphprune.passes.permute import apply_permutations

    torch.manual_seed(0)
    if arch == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=16).eval(), torch.randn(2, 3, 32, 32)
    elif arch == "llama":
        config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=96)
        model, x = T.LlamaForCausalLM(config).eval(), {"input_ids": torch.randint(0, 96, (2, 12))}
    else:
        model, x = _gpt2(), {"input_ids": torch.randint(0, 100, (2, 12))}
    found = _permutations(model, x)
    assert found and all(p.kept_after > p.kept_before for p in found)
    if arch == "llama":  # the residual stream (embedding, norms, q/k/v/gate/up columns, lm_head) and both MLPs
        assert len(found) == 3 and max(len(p.readers) for p in found) == 2 * 5 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = graphprune.verify.outputs(model, x)
    apply_permutations(model, found)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for got, expected in zip(graphprune.verify.outputs(model, x), want):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    apply_permutations(model, found, inverse=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparsify_with_permutation_keeps_more_magnitude_than_without():
    torch.manual_seed(0)
    model, x = _gpt2(), {"input_ids": torch.randint(0, 100, (2, 12))}
    scale = torch.rand(256) ** 3 + 0.05  # uneven MLP channels, as trained models have: where the order matters
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(scale)
            block.mlp.c_proj.weight.mul_(scale[:, None])
    plain, permuted = graphprune.sparsify(model, x), graphprune.sparsify(model, x, permute=True)

    def kept(sparse):
        modules = dict(sparse.named_modules())
        return sum(float(modules[layer.name].weight.detach().abs().sum()) for layer in sparse.graphprune_sparsity.masked)

    assert kept(permuted) > kept(plain)
    assert "channel permutation: 2 groups reordered" in str(permuted.graphprune_sparsity)
    got = graphprune.verify.outputs(permuted, x)[0]
    assert torch.isfinite(got).all() and got.shape == graphprune.verify.outputs(model, x)[0].shape


def _llama_mlp(device="cpu", dtype=torch.float32):
    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


def test_semi_structured_keeps_masked_dense_with_the_reason_off_gpu():
    model, ids = _llama_mlp(), {"input_ids": torch.randint(0, 128, (1, 16))}
    sparse = graphprune.sparsify(model, ids, semi_structured=True)
    report = sparse.graphprune_sparsity
    assert report.masked and all(layer.kernel == "masked dense: on cpu: 2:4 kernels need a CUDA GPU"
                                 for layer in report.masked)
    assert "0 of" in report.notes[-1] and type(sparse.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    with pytest.raises(UsageError, match="2:4 kernels"):
        graphprune.sparsify(model, ids, "1:4", semi_structured=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with sparse tensor cores (compute capability 8.0+)")
def test_semi_structured_runs_on_sparse_tensor_cores():
    model, ids = _llama_mlp("cuda", torch.float16), {"input_ids": torch.randint(0, 128, (2, 64), device="cuda")}
    masked = graphprune.sparsify(model, ids)
    sparse = graphprune.sparsify(model, ids, semi_structured=True)
    kernels = {layer.name: layer.kernel for layer in sparse.graphprune_sparsity.masked}
    assert all(kernels[f"model.layers.{i}.mlp.{p}"].startswith("2:4") for i in range(2)
               for p in ("gate_proj", "up_proj", "down_proj")), kernels
    assert isinstance(sparse.model.layers[0].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    got, want = (graphprune.verify.outputs(m, ids)[0].float() for m in (sparse, masked))
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())
