"""Magnitude masks (MagPruning in Fu et al., AAAI 2023, after Han et al. 2015 and Lagunas et al. 2021:
large weights matter most), as the published code runs them (`magprun` in src/runner.py of
github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, burn-in 500): train the whole model for
`warmup_steps` optimizer steps (the code: 499, choosing at its 500th), keep the floor(p * n) entries of each
target tensor of n entries with the largest |theta| of the warmed-up weights, and go on training only
those, from the warmed-up model (the head included). The fine-tuned model therefore differs from the
pre-trained one everywhere the warm-up moved it, and `save.weights` stores the whole model.

The warm-up is the start of the run, as in the code: the run's optimizer, learning rate and schedule
(`warmup_lr: null`), or a constant `warmup_lr` with no weight decay. What still differs from the code: after
the warm-up the loop starts a fresh optimizer and schedule (the code keeps AdamW's moments and the schedule's
position), and training starts again from the first batches. `warmup_steps: 0` ranks the pre-trained weights.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count, make_optimizer
from sift_cli.methods.sparse import SparseMethod, SparseSettings, plain_state, select_top, train_briefly
from sift_cli.trainer import make_schedule


@dataclass
class MagnitudeSettings(SparseSettings):
    warmup_steps: int = MISSING  # full fine-tuning steps before |weight| is ranked (0: the pre-trained weights)
    warmup_lr: Optional[float] = None  # null: the run's optimizer and schedule; a number: constant, no decay

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.warmup_steps, 0), "warmup_steps", "a non-negative integer")
        self.need(self.warmup_lr is None or self.warmup_lr > 0, "warmup_lr", "> 0 or null")


@register_method
class Magnitude(SparseMethod):
    name = "magnitude"
    Settings = MagnitudeSettings
    scope = "per_tensor"

    def choose(self, run, targets):
        if int(self.cfg.warmup_steps):
            self.warm_up(run)
        scores = {name: tensor.detach().abs().float() for name, tensor in targets.items()}
        return select_top(scores, float(self.cfg.sparse_rate), self.scope)

    def warm_up(self, run) -> None:
        """Full fine-tuning of every parameter for `warmup_steps` steps; the model stays warmed up."""
        model = run.unwrapped_model
        states = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            for param in model.parameters():
                param.requires_grad_(True)
            if self.cfg.warmup_lr is None:
                optimizer = self.create_optimizer(model, run.tcfg)
                scheduler = make_schedule(optimizer, run.tcfg, run.total_steps, run.steps_per_epoch)
            else:
                optimizer = make_optimizer([{"params": list(model.parameters()), "lr": float(self.cfg.warmup_lr)}],
                                           run.tcfg, weight_decay=0.0)
                scheduler = None
            train_briefly(run, optimizer, int(self.cfg.warmup_steps), lambda batch: model(**batch).loss, scheduler)
        finally:
            for name, param in model.named_parameters():
                param.requires_grad_(states[name])
                param.grad = None

    def export(self, model):
        """After a warm-up every tensor moved: the whole model, as its forward sees it."""
        return plain_state(model) if int(self.cfg.warmup_steps) else super().export(model)

    def summary(self) -> dict:
        return {**super().summary(), "warmup_steps": int(self.cfg.warmup_steps)}
