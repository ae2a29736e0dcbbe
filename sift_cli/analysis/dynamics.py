"""How the body of the model trains, step by step (`analysis.dynamics=true`): how far the pre-trained weights
have moved, and how strongly Adam damps their steps. Written to diagnose PAC-tuning, whose stage-1 bound pulls
θ back to θ0 so hard that Adam's second moment, filled by that pull, keeps stage 2's steps tiny.

Per optimizer step t, measured when the gradient of step t is complete (after clipping, before the update;
the weights are those after t - 1 updates), logged to metrics.jsonl with `split: dynamics`:

- `body_movement`: ||θ - θ0|| over the body, the trainable tensors the checkpoint provided (θ0: their values
  when training starts); `head_movement` the same over the new ones (the head), whose names the model's
  loader reports (a method that renames parameters, as peft does, puts its head in the body);
- `adam_v_ratio`: the median, over the body's entries with a non-zero gradient g, of sqrt(v_hat) / |g|, where
  v_hat is Adam's bias-corrected second moment once g is in it (v = beta2 v_prev + (1 - beta2) g^2,
  v_hat = v / (1 - beta2^t)). About 1 when earlier gradients were as large as this one; r >> 1 when they were
  larger, and then Adam's step lr m_hat / sqrt(v_hat) is r times smaller than the same gradient would get
  fresh. Only with an optimizer that keeps `exp_avg_sq` (AdamW, Adam).

The share of the most predicted class, which shows a collapse to one class, is an evaluation metric
(`predicted_class_share`, sift_cli/metrics.py), logged with every evaluation.
"""

from __future__ import annotations

import math

import torch

SPLIT = "dynamics"


class DynamicsProbe:
    """Holds θ0 of the trainable tensors; `measure(optimizer)` gives the record of the current step."""

    def __init__(self, model: torch.nn.Module, new_params):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.body = [p for name, p in trainable if name not in new_params]
        self.head = [p for name, p in trainable if name in new_params]
        self.start = {id(p): p.detach().clone() for _, p in trainable}

    @torch.no_grad()
    def movement(self, params) -> float:
        squares = sum(((p.detach().float() - self.start[id(p)].float()) ** 2).sum(dtype=torch.float64)
                      for p in params)
        return math.sqrt(float(squares)) if params else 0.0

    @torch.no_grad()
    def adam_v_ratio(self, optimizer) -> float | None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        beta2 = {id(p): group["betas"][1] for group in optimizer.param_groups if "betas" in group
                 for p in group["params"]}
        ratios = []
        for p in self.body:
            if p.grad is None or id(p) not in beta2:
                continue
            state = optimizer.state.get(p, {})
            g = p.grad.detach().float()
            v_prev = state.get("exp_avg_sq")
            step = float(state.get("step", 0)) + 1
            b2 = beta2[id(p)]
            v = (1 - b2) * g * g + (b2 * v_prev.float() if v_prev is not None else 0.0)
            nonzero = g != 0
            ratios.append(((v / (1 - b2**step)).sqrt()[nonzero] / g.abs()[nonzero]).reshape(-1))
        ratios = torch.cat(ratios) if ratios else torch.empty(0)
        return float(ratios.median()) if ratios.numel() else None

    def measure(self, optimizer) -> dict:
        record = {"split": SPLIT, "body_movement": self.movement(self.body),
                  "head_movement": self.movement(self.head)}
        ratio = self.adam_v_ratio(optimizer)
        if ratio is not None:
            record["adam_v_ratio"] = ratio
        return record
