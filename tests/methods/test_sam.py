"""SAM keeps the entries with the largest summed burn-in gradient, over all targets (the paper's global
formula) or floor(p * n) per tensor (the published code), without changing any weight during the burn-in;
with the published rule, each burn-in step's gradient of the whole model is clipped first, over every
tensor of the model."""

import pytest
import torch

from sift_cli.errors import SiftError
from sift_cli.methods.sparse import select_top
from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, TARGET_ENTRIES, assert_trains_only_its_entries, budget, chosen,
                                          dense_job, global_top_sets, index_sets, loop_batches, per_batch_gradients,
                                          per_tensor_top, pretrained)


def test_global_and_per_tensor_rules_pick_different_entries():
    # One tensor's scores dwarf the other's: the global rule spends the whole budget there, the per-tensor
    # rule keeps a tenth of each.
    scores = {"big": torch.arange(100.0) + 1000, "small": torch.arange(300.0)}
    per_tensor = index_sets(select_top(dict(scores), 0.1, "per_tensor"))
    assert per_tensor == {"big": set(range(90, 100)), "small": set(range(270, 300))}
    assert index_sets(select_top(dict(scores), 0.1, "global")) == {"big": set(range(60, 100))}


def test_the_per_tensor_rule_keeps_floor_p_n_of_each_tensor():
    scores = {name: torch.rand(n) for name, n in {"a": 10, "b": 30, "c": 60, "d": 7}.items()}
    kept = select_top(dict(scores), 0.05, "per_tensor")
    assert {name: index.numel() for name, index in kept.items()} == {"a": 0, "b": 1, "c": 3, "d": 0}
    assert sum(index.numel() for index in select_top(dict(scores), 0.05, "global").values()) == 5  # floor(0.05 * 107)
    with pytest.raises(SiftError, match="sparse_rate"):
        select_top(dict(scores), 1.5, "per_tensor")
    with pytest.raises(SiftError, match="selects no entry"):
        select_top(dict(scores), 0.01, "per_tensor")
    with pytest.raises(SiftError, match="method.scope"):
        select_top({"a": torch.ones(4)}, 0.5, "layerwise")


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_selection_is_the_top_summed_burn_in_gradient(tmp_path, scope):
    job = make_job(tmp_path / "sam", [*SETTING, "method=sam", "method.sparse_rate=0.02", "method.burnin_steps=2",
                                      f"method.scope={scope}"])
    grads = per_batch_gradients(tmp_path / "dense", 2)
    summed_square = {name: (grads[0][name] + grads[1][name]).square() for name in grads[0]}
    fisher = {name: grads[0][name].square() + grads[1][name].square() for name in grads[0]}
    if scope == "global":
        k = budget(0.02)
        expected, other = global_top_sets(summed_square, k), global_top_sets(fisher, k)
    else:
        expected, other, k = per_tensor_top(summed_square, 0.02), per_tensor_top(fisher, 0.02), 8 * 20  # floor(20.48)
    assert chosen(job) == expected
    assert sum(len(s) for s in chosen(job).values()) == k == job.method.summary()["selected_entries"]
    assert chosen(job) != other  # (sum g)^2, not sum g^2: the Fisher statistic would choose other entries here
    assert job.method.summary()["target_entries"] == TARGET_ENTRIES


def assert_top(index: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """`index` holds k entries with scores no smaller than any other entry's (ties at the boundary either way)."""
    assert index.numel() == len(set(index.tolist())) == k
    inside = torch.zeros(scores.numel(), dtype=torch.bool)
    inside[index] = True
    scores = scores.reshape(-1)
    slack = 1e-5 * float(scores.max())
    assert scores[inside].min() >= scores[~inside].max() - slack


def test_the_published_rule_clips_each_burn_in_step_over_the_model_and_keeps_p_n_of_every_tensor(tmp_path):
    # Batches of two: tiny-bert's gradient norm is about 0.015 on a batch with both labels and 1 on one with
    # a single label, so a clip at 0.01 rescales every step, the single-label one a hundred times more.
    clip, rate, run = 0.01, 0.05, ["trainer.batch_size=2", "trainer.max_grad_norm=0.01"]
    settings = [*SETTING, *run, "method=sam", f"method.sparse_rate={rate}", "method.burnin_steps=3",
                "method.target_modules=all_params", "method.scope=per_tensor", "method.clip_burnin=true"]
    job = make_job(tmp_path / "sam", settings)

    reference = dense_job(tmp_path / "dense", run)
    model = reference.trainer.unwrapped_model
    summed = {n: torch.zeros_like(p) for n, p in model.named_parameters() if not n.startswith("classifier")}
    unclipped = {n: torch.zeros_like(s) for n, s in summed.items()}
    norms = []
    for batch in loop_batches(reference, 3):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}  # the head's too: clipping sees the whole model
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        norms.append(float(norm))
        for name in summed:
            summed[name] += grads[name] * min(1.0, clip / (float(norm) + 1e-6))
            unclipped[name] += grads[name]
    assert min(norms) > clip and max(norms) > 10 * min(norms)  # the clip matters

    layers = job.method.layers
    for name, score in summed.items():
        k = int(rate * score.numel())
        if k:
            assert_top(layers[name].index, score.abs(), k)
        else:
            assert name not in layers  # too small for one entry: frozen, as in the published code
    assert {"bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.attention.self.query.bias", "bert.pooler.dense.weight"} <= set(layers)
    without_clipping = per_tensor_top({n: s.abs() for n, s in unclipped.items() if "embeddings" not in n}, rate)
    assert {n: s for n, s in chosen(job).items() if "embeddings" not in n} != without_clipping


def test_the_burn_in_changes_no_weight_and_training_only_the_chosen_entries(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=sam", "method.burnin_steps=3"])
    params = dict(job.trainer.unwrapped_model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in before.items())
    assert all(p.grad is None for p in params.values())
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
