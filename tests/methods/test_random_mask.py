"""Random masks: the same budget as SAM, drawn from the run's seed only (the same on every process and
whatever the global random state), and only those entries train."""

import torch

from tests.conftest import make_job
from tests.methods.sparse_helpers import SETTING, assert_trains_only_its_entries, budget, index_sets, pretrained


def chosen(job):
    return index_sets({name: layer.index for name, layer in job.method.layers.items()})


def test_the_mask_depends_on_the_seed_only_and_spends_the_budget(tmp_path):
    torch.manual_seed(0)
    first = make_job(tmp_path / "a", [*SETTING, "method=random_mask", "method.sparse_rate=0.02"])
    torch.manual_seed(123)  # another global random state: the same mask
    again = make_job(tmp_path / "b", [*SETTING, "method=random_mask", "method.sparse_rate=0.02"])
    other = make_job(tmp_path / "c", [*SETTING, "method=random_mask", "method.sparse_rate=0.02", "seed=7"])
    assert chosen(first) == chosen(again) != chosen(other)
    sizes = [len(s) for s in chosen(first).values()]
    assert sum(sizes) == budget(0.02) and len(sizes) == 8 and max(sizes) - min(sizes) <= 1  # equal tensors


def test_a_random_mask_run_trains_only_its_entries_and_the_head(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=random_mask"])
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
