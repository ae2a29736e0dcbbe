"""`analysis.dynamics=true`: per step, the body's distance from θ0 and Adam's sqrt(v_hat)/|g|, against the
weights and gradients the test records itself and Adam's second moment written out by hand."""

import json
import math

import pytest
import torch

from tests.conftest import FAST, make_job

BETA2 = 0.999  # torch's AdamW default


def test_movement_and_adam_damping_by_hand(tmp_path):
    job = make_job(tmp_path, [*FAST, "task=glue/mrpc", "method=full_ft", "analysis.dynamics=true",
                              "trainer.max_steps=3", "trainer.max_grad_norm=null"])
    trainer = job.trainer
    model = trainer.unwrapped_model
    head = {"classifier.weight", "classifier.bias"}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []  # per step: the weights the gradient was taken at, and the body's gradient

    def record(t):
        seen.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                     {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if n not in head and p.grad is not None}))

    trainer.gradient_callbacks.insert(0, record)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dynamics = [r for r in records if r.get("split") == "dynamics"]
    assert [r["step"] for r in dynamics] == [1, 2, 3]
    v = {}
    for step, (record_, (weights, grads)) in enumerate(zip(dynamics, seen), start=1):
        body = math.sqrt(sum(((weights[n] - start[n]) ** 2).sum().item() for n in start if n not in head))
        moved_head = math.sqrt(sum(((weights[n] - start[n]) ** 2).sum().item() for n in head))
        assert record_["body_movement"] == pytest.approx(body, rel=1e-5, abs=1e-9)
        assert record_["head_movement"] == pytest.approx(moved_head, rel=1e-5, abs=1e-9)
        ratios = []
        for n, g in grads.items():
            v[n] = BETA2 * v.get(n, torch.zeros_like(g)) + (1 - BETA2) * g * g
            nonzero = g != 0
            ratios.append((torch.sqrt(v[n] / (1 - BETA2**step))[nonzero] / g.abs()[nonzero]).reshape(-1))
        expected = torch.cat(ratios).median().item()
        assert record_["adam_v_ratio"] == pytest.approx(expected, rel=1e-4)
    # at the first step v_hat is g^2 itself
    assert dynamics[0]["body_movement"] == 0.0 and dynamics[0]["adam_v_ratio"] == pytest.approx(1.0)
