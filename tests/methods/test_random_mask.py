"""Random masks, as the published code draws them: each entry of each target tensor kept independently with
probability p, from the run's seed only (the same on every process and whatever the global random state),
and only those entries train."""

import torch

from tests.conftest import make_job
from tests.methods.sparse_helpers import SETTING, TARGET_ENTRIES, assert_trains_only_its_entries, chosen, pretrained


def test_every_entry_is_an_independent_draw_from_the_seed(tmp_path):
    torch.manual_seed(0)
    first = make_job(tmp_path / "a", [*SETTING, "method=random_mask", "method.sparse_rate=0.02"])
    torch.manual_seed(123)  # another global random state: the same mask
    again = make_job(tmp_path / "b", [*SETTING, "method=random_mask", "method.sparse_rate=0.02"])
    other = make_job(tmp_path / "c", [*SETTING, "method=random_mask", "method.sparse_rate=0.02", "seed=7"])
    assert chosen(first) == chosen(again) != chosen(other)
    # The draw by hand: one uniform number per entry of the targets in the model's order, kept below p.
    generator = torch.Generator().manual_seed(int(first.cfg.seed))
    expected = {name: set(torch.nonzero(torch.rand(tensor.numel(), generator=generator) < 0.02).reshape(-1).tolist())
                for name, tensor in first.method.targets.items()}
    assert chosen(first) == {name: kept for name, kept in expected.items() if kept}
    sizes = [len(s) for s in chosen(first).values()]
    assert len(sizes) == 8 and len(set(sizes)) > 1  # equal tensors, unequal draws: not a fixed share each
    mean, std = 0.02 * TARGET_ENTRIES, (0.02 * 0.98 * TARGET_ENTRIES) ** 0.5
    assert abs(sum(sizes) - mean) < 4 * std


def test_the_draw_covers_every_tensor_with_all_params(tmp_path):
    job = make_job(tmp_path, [*SETTING, "method=random_mask", "method.sparse_rate=0.2",
                              "method.target_modules=all_params"])
    assert {"bert.embeddings.LayerNorm.bias", "bert.encoder.layer.1.output.LayerNorm.weight",
            "bert.pooler.dense.bias", "bert.embeddings.word_embeddings.weight"} <= set(job.method.layers)
    assert not any(name.startswith("classifier") for name in job.method.layers)  # the head trains densely


def test_a_random_mask_run_trains_only_its_entries_and_the_head(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=random_mask"])
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
