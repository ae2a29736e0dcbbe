"""Magnitude masks (MagPruning in Fu et al., AAAI 2023, after Han et al. 2015 and Lagunas et al. 2021:
large weights matter most): train the whole model for `warmup_steps` optimizer steps, keep the entries of
each target weight with the largest |theta| of the warmed-up weights, then fine-tune only those entries
starting again from the pre-trained weights.

theta is the warmed-up weight, as in the published code (`magprun` in src/runner.py of
github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune ranks |theta| after a 500-step burn-in of full
training). Unlike that code, training restarts from the pre-trained weights (and the initial task head)
instead of continuing from the warmed-up ones, which would leave every entry changed by the warm-up:
restarting keeps the fine-tuned model within the budget, the same floor(p * N) entries as SAM (split
over tensors in proportion to their sizes). `warmup_steps: 0` ranks the pre-trained weights themselves.
"""

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count
from sift_cli.methods.sparse import SparseMethod, SparseSettings, select_top, train_briefly


@dataclass
class MagnitudeSettings(SparseSettings):
    warmup_steps: int = MISSING  # full fine-tuning steps before |weight| is ranked (0: the pre-trained weights)
    warmup_lr: float = MISSING

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.warmup_steps, 0), "warmup_steps", "a non-negative integer")
        self.need(self.warmup_lr > 0, "warmup_lr", "> 0")


@register_method
class Magnitude(SparseMethod):
    name = "magnitude"
    Settings = MagnitudeSettings

    def choose(self, run, targets):
        model = run.unwrapped_model
        pretrained = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        states = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            for param in model.parameters():
                param.requires_grad_(True)
            train_briefly(run, [{"params": list(model.parameters()), "lr": float(self.cfg.warmup_lr)}],
                          int(self.cfg.warmup_steps), lambda batch: model(**batch).loss)
            scores = {name: m.weight.detach().abs().float() for name, m in targets.items()}
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(pretrained[name])
                    param.requires_grad_(states[name])
                    param.grad = None
        return select_top(scores, float(self.cfg.sparse_rate), "per_tensor")

    def summary(self) -> dict:
        return {**super().summary(), "warmup_steps": int(self.cfg.warmup_steps)}
