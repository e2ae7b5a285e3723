"""graphprune.HESSO: the ramp, holding at zero, base optimizers, AMP, exact slimming, resume in a fresh
process, two-process DDP on gloo, a transformer's heads and GQA groups, and the Hugging Face Trainer callback."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphprune
from graphprune.demo import DigitsNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch(step: int, n: int = 32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(opt, model, steps: int, scaler=None, autocast: bool = False, first: int = 0):
    for step in range(first, first + steps):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def slim_error(opt, model, x) -> float:
    """Relative error of opt.slim() against the trained model itself (not its mask) on other inputs."""
    slim = opt.slim()
    model.eval(), slim.eval()
    with torch.no_grad():
        ref, got = model(x), slim(x)
    assert type(slim) is type(model)
    return float((got - ref).norm() / ref.norm())


def test_ramp_is_linear_to_exact_zero_bn_and_readers_included():
    torch.manual_seed(0)
    model = DigitsNet()
    base = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    opt = graphprune.HESSO(model, batch(0)[0][:2], base, target_flops=0.6, start_step=3, pruning_steps=8,
                           pruning_periods=2)
    train(opt, model, 3)
    assert opt.status()["phase"] == "period 1 of 2" and opt.ramping.any()
    masks = dict(opt.ramp)
    assert {"bn1.weight", "bn1.bias"} & set(masks) or {"bn2.weight", "bn2.bias"} & set(masks)
    readers = [n for n, m in masks.items() if m.ndim > 1 and not m.all(dim=1).any() and m.any()]
    assert readers, "the ramp must include readers' input columns, not only producer rows"
    params = dict(model.named_parameters())
    start = {n: params[n].detach()[m].clone() for n, m in masks.items()}
    untouched = {n: params[n].detach()[~m].clone() for n, m in masks.items()}
    for t in range(1, 5):  # the period runs from step 3 to step 7
        train(opt, model, 1, first=2 + t)
        for n, m in masks.items():
            expected = start[n] * (4 - t) / 4
            torch.testing.assert_close(params[n].detach()[m], expected, rtol=1e-5, atol=1e-7)
            assert torch.equal(params[n].detach()[~m], untouched[n])
    assert all(bool((params[n].detach()[m] == 0).all()) for n, m in masks.items())


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
], ids=["sgd", "adam", "adamw"])
def test_bases_slim_exactly_at_the_target_and_hold_zero_at_high_lr(make):
    torch.manual_seed(0)
    model = DigitsNet()
    base = make(model.parameters())
    opt = graphprune.HESSO(model, batch(0)[0][:4], base, target_flops=0.5, start_step=4, pruning_steps=12,
                           pruning_periods=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)  # schedulers take HESSO
    for step in range(20):
        train(opt, model, 1, first=step)
        sched.step()
    st = opt.status()
    assert st["phase"] == "done" and abs(st["flops_ratio"] - 0.5) <= 0.01, st
    for group in base.param_groups:
        group["lr"] = 10.0
    train(opt, model, 100, first=20)
    params = dict(model.named_parameters())
    assert opt.held and not opt.ramp
    for name, mask in opt.held.items():
        assert bool((params[name].detach()[mask] == 0).all()), name
        for value in base.state[params[name]].values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert bool((value[mask] == 0).all()), f"a moment of {name} is not zero"
    x = batch(999, n=7)[0]  # held-out inputs at another batch size
    assert slim_error(opt, model, x) <= 1e-5
    slim = opt.slim()
    assert graphprune.count_flops(slim, x) / graphprune.count_flops(model, x) == pytest.approx(st["flops_ratio"])


def test_grad_scaler_reads_unscaled_updates_and_bf16_autocast_slims():
    def run(scaler, autocast=False):
        torch.manual_seed(0)
        model = DigitsNet()
        opt = graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                               target_flops=0.6, start_step=3, pruning_steps=6, pruning_periods=2)
        train(opt, model, 12, scaler=scaler, autocast=autocast)
        return model, opt

    plain, plain_opt = run(None)
    scaled, scaled_opt = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert np.array_equal(plain_opt.gone, scaled_opt.gone)  # a power-of-two scale unscales exactly
    for (n, a), b in zip(plain.named_parameters(), scaled.parameters()):
        assert torch.equal(a, b), n
    model, opt = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), autocast=True)
    assert opt.finished and slim_error(opt, model, batch(5)[0]) <= 1e-5


RESUME = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F, graphprune
    from graphprune.demo import DigitsNet
    sys.path.insert(0, {tests!r})
    from test_train import batch, train
    torch.set_num_threads(1)
    mode, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = DigitsNet()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = graphprune.HESSO(model, batch(0)[0][:2], base, target_flops=0.5, start_step=4, pruning_steps=12,
                           pruning_periods=3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=24)
    def steps(first, last):
        for s in range(first, last):
            train(opt, model, 1, first=s)
            sched.step()
    if mode == "whole":
        steps(0, 24)
    elif mode == "first":
        steps(0, 10)  # mid-period: decision 2 at step 8, its units reach zero at step 12
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}}, path + ".ckpt")
    else:
        ckpt = torch.load(path + ".ckpt", weights_only=True)
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); sched.load_state_dict(ckpt["sched"])
        steps(10, 24)
    torch.save(model.state_dict(), path)
""")


def test_resume_mid_period_in_a_fresh_process_is_bit_for_bit(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=os.path.join(ROOT, "tests")))

    def run(mode, path):
        subprocess.run([sys.executable, str(script), mode, str(path)], check=True, cwd=ROOT, timeout=300)

    run("whole", tmp_path / "whole.pt")
    run("first", tmp_path / "resumed.pt")
    run("second", tmp_path / "resumed.pt")
    whole, resumed = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_state_dict_from_another_setup_is_refused():
    model = DigitsNet()
    opt = graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.1), target_flops=0.5,
                           pruning_steps=10, pruning_periods=2)
    other = graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.1), target_flops=0.4,
                             pruning_steps=10, pruning_periods=2)
    with pytest.raises(graphprune.UsageError, match="another model, budget or schedule"):
        other.load_state_dict(opt.state_dict())
    ignoring = graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.1),
                                target_flops=0.5, pruning_steps=10, pruning_periods=2, ignore=["conv1"])
    with pytest.raises(graphprune.UsageError, match="another model, budget or schedule"):
        ignoring.load_state_dict(opt.state_dict())
    twin = copy.deepcopy(opt)  # e.g. a checkpointing wrapper copying the optimizer
    assert twin.step_count == 0 and np.array_equal(twin.gone, opt.gone)
    with pytest.raises(graphprune.UsageError, match="not a HESSO state_dict"):
        opt.load_state_dict(opt.base.state_dict())
    with pytest.raises(graphprune.UsageError, match="not in its slim form"):
        opt.slim()
    with pytest.raises(graphprune.UsageError, match="pruning_periods"):
        graphprune.HESSO(model, batch(0)[0][:2], opt.base, target_flops=0.5, pruning_steps=3, pruning_periods=4)
    with pytest.raises(graphprune.UsageError, match="LayerNorm"):
        graphprune.HESSO(model, batch(0)[0][:2], opt.base, target_flops=0.5, allow_lossy=True)
    with pytest.raises(graphprune.UsageError, match="not all zero"):
        graphprune.HESSO(model, batch(0)[0][:2], opt.base, target_flops=0.5, importance={"magnitude": 0})
    with pytest.raises(graphprune.UsageError, match="holds none of this model's parameters"):
        graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(DigitsNet().parameters(), lr=0.1),
                         target_flops=0.5)


DDP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, numpy as np, graphprune
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, {tests!r})
    from test_train import batch, slim_error
    import torch.nn.functional as F
    from graphprune.demo import DigitsNet
    rank, wrap, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks; DDP would broadcast rank 0's anyway
    model = DigitsNet()
    x0 = batch(0)[0][:2]
    if wrap == "before":
        model = DDP(model)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = graphprune.HESSO(model, x0, base, target_flops=0.5, start_step=3, pruning_steps=9, pruning_periods=3)
    if wrap == "after":
        model = DDP(model)
    for step in range(16):
        x, y = batch(100 * rank + step)  # each rank its own data: only the all-reduced gradients agree
        F.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
    inner = model.module
    err = slim_error(opt, inner, batch(7)[0])
    np.savez(out, gone=opt.gone, err=err, params=torch.cat([p.detach().flatten() for p in inner.parameters()]).numpy())
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("wrap", ["before", "after"])
def test_two_process_gloo_ddp_ranks_agree(tmp_path, wrap):
    script = tmp_path / "ddp.py"
    script.write_text(DDP.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000 + len(wrap)))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), wrap, str(tmp_path / f"rank{r}.npz")], cwd=ROOT,
                              env=env) for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    a, b = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert a["gone"].any() and np.array_equal(a["gone"], b["gone"]), "the ranks chose different units"
    assert np.array_equal(a["params"], b["params"])
    assert a["err"] <= 1e-5 and b["err"] <= 1e-5


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_transformer_heads_and_gqa_groups_train_into_an_exact_slim_model():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # only attention is prunable here (MLPs and the embedding, which holds the hidden width, kept whole): the
    # budget must be met with whole heads of q and o and whole KV groups of k and v
    opt = graphprune.HESSO(model, {"input_ids": ids}, torch.optim.AdamW(model.parameters(), lr=1e-3),
                           target_params=0.9, start_step=2, pruning_steps=6, pruning_periods=2,
                           ignore=["model.embed_tokens", "model.layers.0.mlp", "model.layers.1.mlp"])
    model.train()
    for step in range(10):
        x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        opt.step(), opt.zero_grad()
    assert opt.status()["params_ratio"] < 0.9
    slim = opt.slim()
    other = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(99))
    model.eval(), slim.eval()
    with torch.no_grad():
        ref, got = model(input_ids=other).logits, slim(input_ids=other).logits
    assert float((got - ref).norm() / ref.norm()) <= 1e-5
    attention = [layer.self_attn for layer in slim.model.layers]
    assert any(a.k_proj.out_features < 32 for a in attention), "no KV group was removed"
    assert all(a.q_proj.out_features == 2 * a.k_proj.out_features for a in attention)  # whole GQA groups go


def test_an_unreachable_budget_is_refused_before_training():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(graphprune.BudgetError, match="out of reach"):
        graphprune.HESSO(model, {"input_ids": ids}, torch.optim.AdamW(model.parameters()), target_params=0.8,
                         ignore=["model.embed_tokens", "model.layers.0.mlp", "model.layers.1.mlp"])


def test_hf_trainer_callback_prunes_a_bert_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from graphprune.hf import HESSOCallback

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 100, (12,), generator=g), "labels": int(i % 2)} for i in range(64)]
    example = {"input_ids": rows[0]["input_ids"][None].repeat(2, 1)}
    callback = HESSOCallback(example, target_flops=0.6, start_step=2, pruning_steps=6, pruning_periods=2)
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8,
                                          learning_rate=1e-3, save_steps=5, report_to=[], use_cpu=True,
                                          logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    opt = callback.hesso
    assert opt.step_count == 12 and opt.finished and abs(opt.status()["flops_ratio"] - 0.6) <= 0.01
    assert os.path.isfile(tmp_path / "run" / "checkpoint-5" / "hesso.pt")
    slim = opt.slim()
    x = torch.randint(0, 100, (3, 9), generator=g)
    model.eval(), slim.eval()
    with torch.no_grad():
        ref, got = model(input_ids=x).logits, slim(input_ids=x).logits
    assert float((got - ref).norm() / ref.norm()) <= 1e-5
    # resuming from the mid-run checkpoint, moved elsewhere, restores HESSO's schedule and ends with the same
    # decisions; without being told where the checkpoint is, the callback refuses instead of restarting
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run" / "checkpoint-5", moved)
    for resume_from in (None, moved):
        torch.manual_seed(0)
        again = HESSOCallback(example, resume_from=resume_from, target_flops=0.6, start_step=2, pruning_steps=6,
                              pruning_periods=2)
        args = transformers.TrainingArguments(str(tmp_path / "second"), max_steps=12, per_device_train_batch_size=8,
                                              learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                              logging_steps=100, disable_tqdm=True)
        trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args,
                                       train_dataset=rows, callbacks=[again])
        if resume_from is None:
            with pytest.raises(graphprune.UsageError, match="resume_from"):
                trainer.train(resume_from_checkpoint=str(moved))
        else:
            trainer.train(resume_from_checkpoint=str(moved))
    assert again.hesso.step_count == 12 and np.array_equal(again.hesso.gone, opt.gone)


FSDP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, graphprune
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from graphprune.demo import DigitsNet
    dist.init_process_group("gloo", rank=0, world_size=1)
    x = torch.randn(2, 1, 8, 8)
    model = DigitsNet()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    try:
        graphprune.HESSO(model, x, torch.optim.SGD(model.parameters(), lr=0.1), target_flops=0.5)
    except graphprune.UsageError as exc:
        assert "FSDP" in str(exc), exc
    else:
        sys.exit("FSDP before HESSO was not refused")
    model = DigitsNet()
    opt = graphprune.HESSO(model, x, torch.optim.SGD(model.parameters(), lr=0.1), target_flops=0.5, start_step=5)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    try:
        opt.step()
    except graphprune.UsageError as exc:
        assert "replaced after HESSO was built" in str(exc), exc
    else:
        sys.exit("FSDP after HESSO was not refused")
    dist.destroy_process_group()
""")


def test_fsdp_is_refused_with_the_way_out(tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(28500 + os.getpid() % 1000))
    done = subprocess.run([sys.executable, str(script)], check=False, cwd=ROOT, env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_earlier_decisions_are_kept_and_rounded_widths_still_land_on_the_target():
    from graphprune.passes.select import select

    model = DigitsNet()
    an, _, _, _ = graphprune.api.analyse(model, batch(0)[0][:2], None, False, False, "dispatch")
    costs = graphprune.passes.pipeline.Job(an, {}, "flops", 0.5, None, {})
    graphprune.passes.pipeline.CostModels()(costs)
    rng = np.random.default_rng(0)
    for round_to in (8, "auto", None):
        earlier = np.zeros(len(an.prunable), dtype=bool)
        earlier[select(an, rng.random(len(an.prunable)), costs.flops, 0.8, round_to=round_to, max_ratio=0.9)] = True
        scores = rng.random(len(an.prunable))
        chosen = select(an, scores, costs.flops, 0.5, round_to=round_to, max_ratio=0.9, force=earlier)
        gone = np.zeros_like(earlier)
        gone[chosen] = True
        assert gone[earlier].all(), "an earlier decision was dropped"
        fresh = select(an, scores, costs.flops, 0.5, round_to=round_to, max_ratio=0.9)
        ratio, fresh_ratio = (costs.flops.total(c) / costs.flops.total() for c in (chosen, fresh))
        assert ratio <= 0.5 and ratio >= min(fresh_ratio, 0.49), (round_to, ratio, fresh_ratio)


def test_coarse_units_do_not_make_early_periods_overspend_and_odd_setups_are_handled(caplog):
    class Net(torch.nn.Module):  # a grouped conv (4 coarse groups), a depthwise conv, fine pointwise channels
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32)
            self.g, self.b2 = torch.nn.Conv2d(32, 64, 3, padding=1, groups=4), torch.nn.BatchNorm2d(64)
            self.dw, self.pw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.nn.Conv2d(64, 48, 1)
            self.fc = torch.nn.Linear(48, 10)

        def forward(self, x):
            x = torch.relu(self.b2(self.g(torch.relu(self.b1(self.c1(x))))))
            return self.fc(torch.relu(self.pw(torch.relu(self.dw(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 16, 16)
    one_shot = graphprune.plan(model, x, target_flops=0.5, round_to=None).flops_ratio
    opt = graphprune.HESSO(model, x, torch.optim.SGD(model.parameters(), lr=0.0), target_flops=0.5, start_step=1,
                           pruning_steps=2, pruning_periods=2, round_to=None, importance="l2")
    for _ in range(3):
        opt.step()
    assert opt.finished and opt.status()["flops_ratio"] >= one_shot - 0.005  # not two whole groups too many
    assert any("too coarse" in n for n in opt.plan.notes)

    # an update-based criterion cannot score before the first update: magnitude, said so
    with caplog.at_level(logging.WARNING, logger="graphprune.train"):
        model = DigitsNet()
        graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.1), target_flops=0.5,
                         start_step=0, pruning_steps=4, pruning_periods=2, importance="taylor")
    assert "ranks by magnitude" in caplog.text

    # a model cast after HESSO was built: slim() verifies on inputs cast alike
    model = DigitsNet()
    opt = graphprune.HESSO(model, batch(0)[0][:2], torch.optim.SGD(model.parameters(), lr=0.05), target_flops=0.5,
                           start_step=1, pruning_steps=2, pruning_periods=1)
    model.double()
    for step in range(3):
        x, y = batch(step)
        F.cross_entropy(model(x.double()), y).backward()
        opt.step(), opt.zero_grad()
    slim = opt.slim()
    x = batch(9, n=5)[0].double()
    model.eval(), slim.eval()
    assert float((slim(x) - model(x)).norm() / model(x).norm()) <= 1e-10
