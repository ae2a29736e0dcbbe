"""Mixout: full fine-tuning in which each linear layer mixes its weight's input columns back to W0 with
probability p (rescaled so the expected weight is W), in place of dropout."""

import torch
from torch import nn

from sift_cli.methods.mixout import MixoutLinear
from tests.conftest import make_job
from tests.methods.layer_helpers import prepared, trainable


def effective_weight(layer: MixoutLinear) -> torch.Tensor:
    """The weight one forward used: the layer applied to the identity, minus the bias."""
    return (layer(torch.eye(layer.in_features)) - layer.bias).T


def test_each_input_column_is_either_mixed_back_to_w0_or_rescaled():
    torch.manual_seed(0)
    linear = nn.Linear(50, 20)
    layer = MixoutLinear(linear, p=0.6)
    w0 = layer.target.clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    rescaled = w0 + (layer.weight.detach() - w0) / 0.4
    layer.train()
    draws, mixed_columns = [], 0
    for _ in range(400):
        used = effective_weight(layer).detach()
        mixed = torch.isclose(used, w0, atol=1e-5).all(0)
        kept = torch.isclose(used, rescaled, atol=1e-5).all(0)
        assert torch.all(mixed ^ kept)  # whole columns, one or the other
        mixed_columns += int(mixed.sum())
        draws.append(used)
    assert abs(mixed_columns / (400 * 50) - 0.6) < 0.02
    torch.testing.assert_close(torch.stack(draws).mean(0), layer.weight.detach(), atol=0.35, rtol=0)  # E = W
    layer.eval()
    torch.testing.assert_close(effective_weight(layer), layer.weight.detach())


def test_the_gradient_is_that_of_the_mixed_weight():
    layer = MixoutLinear(nn.Linear(6, 3), p=0.5)
    layer.train()
    torch.manual_seed(1)
    x = torch.randn(2, 6)
    layer(x).sum().backward()
    torch.manual_seed(1)
    assert torch.equal(torch.randn(2, 6), x)
    keep = torch.empty(6).bernoulli_(0.5)  # the forward's draw, replayed
    assert 0 < keep.sum() < 6
    expected = (torch.ones(2, 3).T @ x) * keep / 0.5
    torch.testing.assert_close(layer.weight.grad, expected)


def test_prepare_wraps_every_linear_layer_keeps_names_and_turns_dropout_off():
    method, model, loaded, _ = prepared("mixout")
    names = {n for n, _ in model.named_parameters()}
    assert trainable(model) == names  # full fine-tuning: every parameter trains
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert len(method.layers) == 2 * 6 + 2  # per layer q, k, v, attention output, intermediate, output; pooler, head
    assert "classifier" in method.layers
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert names == {n for n, _ in loaded.model.named_parameters()}


def test_a_mixout_run_optimizes_every_parameter(tmp_path):
    from tests.conftest import FAST

    job = make_job(tmp_path, [*FAST, "method=mixout"])
    model = job.trainer.unwrapped_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = job.method.create_optimizer(model, job.cfg.trainer)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == job.total_params
    job.method.fit(job.trainer.loop)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("intermediate" in n for n in changed) and any("query" in n for n in changed)
    layer = job.method.layers["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(layer.target, before["bert.encoder.layer.0.attention.self.query.weight"])  # W0 stays
