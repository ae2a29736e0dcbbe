"""Fisher masks keep, per tensor, the entries with the largest sum of squared step gradients (steps under
gradient accumulation average their micro-batches first), and train only those."""

import torch

from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, assert_trains_only_its_entries, chosen, per_batch_gradients,
                                          per_tensor_top, pretrained)


def statistics(tmp_path):
    """Sum of squared batch gradients, and square of the summed batch gradients."""
    grads = per_batch_gradients(tmp_path / "dense", 2)
    fisher = {n: grads[0][n].square() + grads[1][n].square() for n in grads[0]}
    squared_sum = {n: (grads[0][n] + grads[1][n]).square() for n in grads[0]}
    return fisher, squared_sum


def test_selection_is_the_top_summed_squared_gradient_per_tensor(tmp_path):
    fisher, squared_sum = statistics(tmp_path)
    job = make_job(tmp_path / "steps", [*SETTING, "method=fisher", "method.sparse_rate=0.02", "method.burnin_steps=2"])
    assert chosen(job) == per_tensor_top(fisher, 0.02)  # two steps of one batch: the squares add up
    assert sum(len(s) for s in chosen(job).values()) == 8 * 20  # floor(0.02 * 1024) of each of the 8 tensors
    assert chosen(job) != per_tensor_top(squared_sum, 0.02)  # SAM's statistic picks other entries here


def test_accumulated_micro_batches_make_one_step_gradient(tmp_path):
    fisher, squared_sum = statistics(tmp_path)
    job = make_job(tmp_path / "accum", [*SETTING, "method=fisher", "method.sparse_rate=0.02", "method.burnin_steps=1",
                                        "trainer.grad_accum=2"])
    assert chosen(job) == per_tensor_top(squared_sum, 0.02)  # one step of two micro-batches: squared once


def test_a_fisher_run_trains_only_its_entries_and_the_head(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path, [*SETTING, "method=fisher", "method.burnin_steps=2"])
    params = dict(job.trainer.unwrapped_model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in before.items())  # the burn-in updates nothing
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, before)
