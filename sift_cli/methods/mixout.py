"""Mixout (Lee, Cho and Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained
Language Models", ICLR 2020; code: github.com/bloodwass/mixout, mixout/mixout.py and MixLinear).

A regulariser on full fine-tuning, so not a sparse method: every parameter trains. In training, each
target linear layer computes with
    W_mix = (M * W + (1 - M) * W0 - p * W0) / (1 - p) = W0 + M * (W - W0) / (1 - p),
where W0 is the layer's weight at the start (the pre-trained weight; for the new task head, its initial
weight) and M ~ Bernoulli(1 - p) is drawn for each forward per input feature (a column of W), as the
reference MixLinear does: mixout replaces the dropout on that layer's input, so every nn.Dropout is set
to p = 0 (as in the reference example for Hugging Face models). In evaluation W_mix = W, its expectation.
The gradient is that of W_mix (M / (1 - p)); the reference backward leaves out the 1 / (1 - p).

The published SAM code's `mixout` (src/runner.py of fuzihaofzh/AnalyzeParameterEfficientFinetune) is a
different procedure: it resets a random share p of the fine-tuned entries to W0 at evaluation only.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, freeze_all_but
from sift_cli.methods.sparse import is_target_list, find_targets, replace_module


class MixoutLinear(nn.Module):
    """A linear layer whose weight is mixed out toward W0 in training; `weight` and `bias` keep their names."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__()
        self.in_features, self.out_features, self.p = linear.in_features, linear.out_features, p
        self.weight, self.bias = linear.weight, linear.bias
        # A plain attribute, not a buffer: data parallelism would broadcast a buffer at every forward.
        self.target = linear.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training and self.p > 0:
            keep = torch.empty(self.in_features, device=weight.device, dtype=weight.dtype).bernoulli_(1 - self.p)
            weight = self.target + (weight - self.target) * (keep / (1 - self.p))
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mixout={self.p}"


@dataclass
class MixoutSettings(Settings):
    p: float = MISSING  # mix probability
    target_modules: Any = MISSING  # all_linear, or suffixes of linear-layer names

    def check(self, run) -> None:
        super().check(run)
        self.need(0 <= self.p < 1, "p", "in [0, 1)")
        self.need(is_target_list(self.target_modules), "target_modules",
                  "all_linear or a non-empty list of module-name suffixes")


@register_method
class Mixout(Method):
    name = "mixout"
    draws_weights = True
    Settings = MixoutSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layers: dict[str, MixoutLinear] = {}  # filled by `prepare`

    def check_model(self, model):
        find_targets(model, self.cfg.target_modules, exclude=set())

    def prepare(self, model, ctx):
        p = float(self.cfg.p)
        freeze_all_but(model, lambda name: True)
        for name, linear in find_targets(model, self.cfg.target_modules, exclude=set()).items():
            self.layers[name] = MixoutLinear(linear, p)
            replace_module(model, name, self.layers[name])
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    def select(self, run) -> None:
        """W0 follows the model to its device (the model moves after `prepare`)."""
        for layer in self.layers.values():
            layer.target = layer.target.to(layer.weight.device)

    def summary(self) -> dict:
        return {"mixout_p": float(self.cfg.p), "mixout_layers": len(self.layers)}

    def memory_plan(self, parts):
        """Full fine-tuning whose target layers keep a copy of their initial weight (a plain attribute, not a
        buffer) and compute with a new mixed weight each forward; every dropout is off."""
        mixed, mixed_top = parts.matching(self.cfg.target_modules, with_head=True)
        copies = parts.arch.layers * sum(lin.fan_in * lin.fan_out for lin in mixed)
        copies += sum(lin.fan_in * lin.fan_out for lin in mixed_top)
        modes = {**parts.dense_modes, **{lin.name: "mixed" for lin in mixed + mixed_top}}
        return Plan(Training(modes, dropout=False), [(parts.everything, parts.weight_bytes)],
                    buffers=copies * parts.weight_bytes)
