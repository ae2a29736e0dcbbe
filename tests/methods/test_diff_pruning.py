"""Diff pruning: a hard-concrete gated diff trains in an L0 phase; its floor(p * N) largest entries over all
targets are kept and fine-tuned from W0 + delta, with every other entry back at (and staying at) W0."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

import sift_cli.methods.diff_pruning as diff_pruning
from sift_cli.methods.diff_pruning import HardConcreteDiff
from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, assert_trains_only_its_entries, budget, global_top_sets,
                                          index_sets, pretrained)


def gated_layer(log_alpha: float, lower=-1.5, upper=1.5, temperature=1.0, size=(300, 300)):
    """A linear layer whose weight is W0 + z * w, through the L0 phase's parametrization."""
    linear = nn.Linear(size[1], size[0])
    linear.weight.requires_grad_(False)
    gate = HardConcreteDiff(linear.weight, 0.0, lower, upper, temperature)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
        gate.diff.normal_()
    pretrained = linear.weight.detach().clone()
    parametrize.register_parametrization(linear, "weight", gate, unsafe=True)
    return linear, gate, pretrained


def test_open_gates_follow_the_hard_concrete_distribution():
    torch.manual_seed(0)
    _, gate, _ = gated_layer(0.7, lower=-0.1, upper=1.1, temperature=2 / 3)  # Louizos et al.'s stretch, temperature
    z = gate.gate()
    assert z.min() == 0 and z.max() == 1  # the stretch puts mass on exact zeros and ones
    expected = 1 / (1 + math.exp(-(0.7 - 2 / 3 * math.log(0.1 / 1.1))))  # P(z != 0)
    assert abs((z > 0).float().mean().item() - expected) < 0.01
    assert torch.allclose(gate.expected_open_gates() / z.numel(), torch.tensor(expected))


def test_the_gated_layer_computes_with_w0_plus_gate_times_diff_and_trains_both():
    layer, gate, pretrained = gated_layer(5.0)  # sigmoid(5) * 3 - 1.5 > 1: the deterministic gate is fully open
    x = torch.randn(4, 300)
    layer.eval()
    expected = nn.functional.linear(x, pretrained + gate.diff, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(gate.gate(), torch.ones(300, 300))
    layer.train()
    layer(x).sum().backward()
    assert gate.diff.grad.abs().sum() > 0 and gate.log_alpha.grad.abs().sum() > 0
    assert layer.parametrizations.weight.original.grad is None
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert torch.equal(layer.weight, pretrained)  # the phase leaves the pre-trained weight as it was


def test_the_kept_entries_are_the_largest_learned_diffs_and_start_from_them(tmp_path, monkeypatch):
    scored = {}

    def spy(scores, rate, scope):
        scored.update({name: s.clone() for name, s in scores.items()})
        assert scope == "global"
        return real(scores, rate, scope)

    real = diff_pruning.select_top
    monkeypatch.setattr(diff_pruning, "select_top", spy)
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=diff_pruning", "method.sparse_rate=0.02", "method.l0_steps=2",
                              "method.diff_lr=1e-2"])
    layers = job.method.layers
    assert index_sets({n: layer.index for n, layer in layers.items()}) == global_top_sets(scored, budget(0.02))
    assert sum(layer.index.numel() for layer in layers.values()) == budget(0.02)
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, layer in layers.items():
        start = layer.values.detach() - layer.initial
        torch.testing.assert_close(start.abs(), scored[name].reshape(-1)[layer.index])
        assert torch.count_nonzero(start) == layer.index.numel()  # the L0 phase learned every kept entry
        torch.testing.assert_close(layer.initial, before[name].reshape(-1)[layer.index])
        moved = params[name].reshape(-1) != before[name].reshape(-1)
        assert set(torch.nonzero(moved).reshape(-1).tolist()) == set(layer.index.tolist())
    assert not torch.equal(params["classifier.weight"], before["classifier.weight"])  # the head trained too
    exported = job.method.export(job.trainer.unwrapped_model)
    name = next(iter(layers))
    torch.testing.assert_close(exported[f"{name}.sparse_delta"], layers[name].values.detach() - layers[name].initial)


def test_a_diff_pruning_run_trains_only_its_entries_and_the_head(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=diff_pruning", "method.l0_steps=2"])
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
    assert job.method.summary()["open_gates_after_l0"] > 0


def test_the_l0_phase_gates_every_tensor_with_all_params_and_leaves_them_as_they_were(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=diff_pruning", "method.l0_steps=2", "method.target_modules=all_params"])
    entries = sum(tensor.numel() for tensor in job.method.targets.values())
    assert entries == sum(v.numel() for n, v in before.items() if not n.startswith("classifier"))
    assert job.method.summary()["open_gates_after_l0"] == entries  # gates start open (log_alpha 5): all were gated
    assert sum(layer.index.numel() for layer in job.method.layers.values()) == int(0.005 * entries)
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, value in before.items():  # every tensor the phase gated is back to W0, but at its kept entries
        off = torch.ones(value.numel(), dtype=torch.bool)
        if name in job.method.layers:
            layer = job.method.layers[name]
            assert torch.equal(layer.initial, value.reshape(-1)[layer.index])
            off[layer.index] = False
        if name in params and not name.startswith("classifier"):
            assert torch.equal(params[name].reshape(-1)[off], value.reshape(-1)[off]), name
