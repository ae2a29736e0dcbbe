"""SAM keeps the floor(p * N) entries with the largest squared summed burn-in gradient, over all targets
(global) or per tensor, without changing any weight during the burn-in."""

import pytest
import torch

from sift_cli.errors import SiftError
from sift_cli.methods.sparse import select_top, split_budget
from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, TARGET_ENTRIES, assert_trains_only_its_entries, budget,
                                          global_top_sets, index_sets, per_batch_gradients, pretrained, top_sets)


def test_global_and_per_tensor_rules_pick_different_entries():
    # One tensor's scores dwarf the other's: the global rule spends the whole budget there, the per-tensor
    # rule gives each tensor its proportional share.
    scores = {"big": torch.arange(100.0) + 1000, "small": torch.arange(300.0)}
    per_tensor = index_sets(select_top(dict(scores), 0.1, "per_tensor"))
    assert per_tensor == {"big": set(range(90, 100)), "small": set(range(270, 300))}
    assert index_sets(select_top(dict(scores), 0.1, "global")) == {"big": set(range(60, 100))}


def test_the_budget_is_split_exactly_in_proportion_to_sizes():
    sizes = {"a": 10, "b": 30, "c": 60, "d": 7}
    budgets = split_budget(sizes, 0.05)
    assert sum(budgets.values()) == 5  # floor(0.05 * 107)
    assert all(abs(budgets[n] - 5 * sizes[n] / 107) < 1 for n in sizes)
    with pytest.raises(SiftError, match="sparse_rate"):
        split_budget(sizes, 1.5)
    with pytest.raises(SiftError, match="selects no entry"):
        split_budget(sizes, 0.001)
    with pytest.raises(SiftError, match="method.scope"):
        select_top({"a": torch.ones(4)}, 0.5, "layerwise")


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_selection_is_the_top_squared_summed_burn_in_gradient(tmp_path, scope):
    job = make_job(tmp_path / "sam", [*SETTING, "method=sam", "method.sparse_rate=0.02", "method.burnin_steps=2",
                                      f"method.scope={scope}"])
    grads = per_batch_gradients(tmp_path / "dense", 2)
    summed_square = {name: (grads[0][name] + grads[1][name]).square() for name in grads[0]}
    k = budget(0.02)
    if scope == "global":
        expected = global_top_sets(summed_square, k)
    else:
        shares = split_budget({n: s.numel() for n, s in summed_square.items()}, 0.02)
        expected = top_sets(summed_square, shares.get)
    chosen = index_sets({name: layer.index for name, layer in job.method.layers.items()})
    assert chosen == expected
    assert sum(len(s) for s in chosen.values()) == k
    # (sum g)^2, not sum g^2: the Fisher statistic would choose other entries here.
    fisher = {name: grads[0][name].square() + grads[1][name].square() for name in grads[0]}
    assert chosen != (global_top_sets(fisher, k) if scope == "global" else top_sets(fisher, shares.get))
    assert job.method.summary()["selected_entries"] == k
    assert job.method.summary()["target_entries"] == TARGET_ENTRIES


def test_the_burn_in_changes_no_weight_and_training_only_the_chosen_entries(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=sam", "method.burnin_steps=3"])
    params = dict(job.trainer.unwrapped_model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in before.items())
    assert all(p.grad is None for p in params.values())
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
