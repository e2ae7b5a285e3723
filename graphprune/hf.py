"""Hugging Face integration: HESSO inside a transformers Trainer run, and checkpoints pruned layer by layer
(prune_pretrained / load_pretrained, from graphprune/hf_prune.py; `graphprune prune-hf` on the command line).

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[graphprune.hf.HESSOCallback(example_inputs, target_params=0.7,
                                                             start_step=100, pruning_steps=400)])
    trainer.train()
    slim = trainer.callback_handler.callbacks[-1].hesso.slim()     # or keep the callback object

The callback wraps the optimizer the Trainer built (its param groups, weight decay and scheduler stay as they
are) through torch's optimizer step hooks, so HESSO acts exactly when the Trainer's optimizer steps: not on
accumulation micro-steps, not on steps the fp16 GradScaler skips. HESSO's own state (schedule, chosen units,
scores) is written beside each checkpoint as hesso.pt and read back when training resumes from one.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import UsageError
from .files import atomic_write
from .hf_prune import load_pretrained, prune_pretrained
from .train import HESSO

STATE_FILE = "hesso.pt"


class HESSOCallback(TrainerCallback):
    """Builds graphprune.HESSO on the Trainer's model and optimizer when training begins.

    Args:
        example_inputs: one batch of model inputs (a dict such as {"input_ids": ..., "attention_mask": ...}).
        resume_from: the checkpoint directory training resumes from, when it is not in the run's output_dir
            (the Trainer does not tell callbacks where it resumed from).
        **options: HESSO's arguments (target_flops or target_params, start_step, pruning_steps, ...).
    """

    def __init__(self, example_inputs: Any, resume_from: str | os.PathLike | None = None, **options: Any):
        self.example_inputs, self.options, self.resume_from = example_inputs, options, resume_from
        self.hesso: HESSO | None = None
        self._before = None
        self._hooks: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        base = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if self.hesso is None or self.hesso.base is not base:
            for h in self._hooks:
                h.remove()
            self.hesso = HESSO(model, self.example_inputs, base, **self.options)
            self._hooks = [base.register_step_pre_hook(self._pre), base.register_step_post_hook(self._post)]
        if state.global_step > 0:  # resuming: HESSO's schedule must resume too, never restart silently
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            saved = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(saved):
                raise UsageError(f"training resumes at step {state.global_step} but {saved} does not exist: pass "
                                 "HESSOCallback(..., resume_from=<the checkpoint directory>) when it is not in "
                                 "output_dir, or start the run over")
            self.hesso.load_state_dict(torch.load(saved, weights_only=True))

    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = self.hesso.before_step()

    def _post(self, optimizer, args, kwargs) -> None:
        self.hesso.after_step(self._before)
        self._before = None

    def on_save(self, args, state, control, **kwargs):
        if self.hesso is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                buf = io.BytesIO()
                torch.save(self.hesso.state_dict(), buf)
                atomic_write(os.path.join(folder, STATE_FILE), buf.getvalue())


__all__ = ["HESSOCallback", "load_pretrained", "prune_pretrained"]
