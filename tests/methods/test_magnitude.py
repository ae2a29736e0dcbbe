"""Magnitude masks rank |theta| of the warmed-up weights, then training restarts from the pre-trained
weights and changes only the chosen entries (and the head)."""

import torch

from sift_cli.methods.sparse import split_budget
from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, assert_trains_only_its_entries, budget, index_sets, pretrained,
                                          targets_of, top_sets)

WARMUP_LR = 0.05  # large, so that two warm-up steps reorder the magnitudes


def chosen(job):
    return index_sets({name: layer.index for name, layer in job.method.layers.items()})


def warmed_up_magnitudes(tmp_path, steps: int) -> dict[str, torch.Tensor]:
    """The reference warm-up: full fine-tuning with AdamW, clipped to norm 1, on the first batches."""
    job = make_job(tmp_path, [*SETTING, "method=full_ft"])
    model = job.trainer.unwrapped_model
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    for batch in job.trainer.first_batches(steps):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: layer.weight.detach().abs() for name, layer in targets_of(model).items()}


def test_selection_ranks_the_warmed_up_weights_and_restarts_from_the_pretrained_ones(tmp_path):
    before = pretrained(tmp_path / "dense")
    warmed = warmed_up_magnitudes(tmp_path / "reference", steps=2)
    shares = split_budget({n: w.numel() for n, w in warmed.items()}, 0.02)
    job = make_job(tmp_path / "magnitude", [*SETTING, "method=magnitude", "method.sparse_rate=0.02",
                                            "method.warmup_steps=2", f"method.warmup_lr={WARMUP_LR}"])
    assert chosen(job) == top_sets(warmed, shares.get)
    assert sum(len(s) for s in chosen(job).values()) == budget(0.02)
    pretrained_magnitudes = {name: before[f"{name}.weight"].abs() for name in warmed}
    assert chosen(job) != top_sets(pretrained_magnitudes, shares.get)  # the warm-up mattered
    params = dict(job.trainer.unwrapped_model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in before.items())  # restarted, head included


def test_without_warm_up_the_pretrained_magnitudes_decide(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path / "magnitude", [*SETTING, "method=magnitude", "method.warmup_steps=0"])
    magnitudes = {name: before[f"{name}.weight"].abs() for name in job.method.targets}
    shares = split_budget({n: m.numel() for n, m in magnitudes.items()}, float(job.cfg.method.sparse_rate))
    assert chosen(job) == top_sets(magnitudes, shares.get)


def test_a_magnitude_run_trains_only_its_entries_and_the_head(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=magnitude", "method.warmup_steps=2"])
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
