"""Batches by token budget: evaluation's packing, its bound, the shares of processes and the order restored;
training's micro-batches and the share of the batch's loss each carries."""

import random

import pytest
import torch

from sift_cli.batching import (EVAL_TOKENS, eval_tokens, micro_batches, restore_order, row_widths, shard,
                               token_batches)
from tests.conftest import compose_config


def test_rows_are_packed_longest_first_within_the_budget():
    # widths 10 | 5 5 (2 x 5 = 10) | 3 1 (adding the 3 to the 5s would make 3 x 5 = 15 > 10)
    assert token_batches([3, 10, 5, 5, 1], max_tokens=10) == [[1], [2, 3], [0, 4]]


def test_a_row_longer_than_the_budget_runs_alone():
    assert token_batches([20, 2, 30], max_tokens=10) == [[2], [0], [1]]


def test_a_row_cap_and_multiple_choice_rows_count():
    assert token_batches([1] * 5, max_tokens=100, max_rows=2) == [[0, 1], [2, 3], [4]]
    # a row of 4 choices of width 3 holds 4 sequences: 4 x 3 = 12 tokens
    assert token_batches([3, 3, 3], max_tokens=24, counts=[4, 4, 4]) == [[0, 1], [2]]


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_and_every_batch_within_the_bound(seed):
    rng = random.Random(seed)
    widths = [rng.randint(1, 300) for _ in range(500)]
    counts = [rng.choice([1, 2, 4]) for _ in widths]
    budget = rng.choice([64, 256, 1000])
    batches = token_batches(widths, budget, max_rows=37, counts=counts)
    assert sorted(i for batch in batches for i in batch) == list(range(len(widths)))
    for batch in batches:
        padded = sum(counts[i] for i in batch) * max(widths[i] for i in batch)
        assert (padded <= budget or len(batch) == 1) and len(batch) <= 37


def test_row_widths_of_plain_and_multiple_choice_rows():
    assert row_widths([[1, 2, 3], [4]]) == ([3, 1], [1, 1])
    assert row_widths([[[1, 2], [3, 4, 5]], [[6], [7]]]) == ([3, 1], [2, 2])


def test_processes_share_the_batches_once_in_as_many_forward_passes():
    batches = [[i] for i in range(7)]
    shares = [shard(batches, rank, 3) for rank in range(3)]
    assert sorted(b for share in shares for b, counted in share if counted) == batches
    assert [len(share) for share in shares] == [3, 3, 3]
    assert shares[1][-1] == shares[2][-1] == ([6], False)  # the smallest batch again, not counted
    assert shard(batches, 0, 1) == [(b, True) for b in batches] and shard([], 1, 2) == []


def test_results_come_back_in_the_order_of_the_set():
    indices = [[2, 0], [3], [1]]
    values = [torch.tensor([[2.0], [0.0]]), torch.tensor([[3.0]]), torch.tensor([[1.0]])]
    assert restore_order(indices, values, 4).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="scored 3 rows"):
        restore_order(indices[:2], values[:2], 4)
    with pytest.raises(RuntimeError, match="3 distinct"):
        restore_order([[2, 0], [2], [1]], values, 4)


def test_the_budget_is_a_number_or_auto_per_device():
    tcfg = compose_config([]).trainer
    assert tcfg.eval_tokens == "auto" and tcfg.eval_batch_size is None
    assert eval_tokens(tcfg, "cpu") == EVAL_TOKENS["cpu"] and eval_tokens(tcfg, "cuda") == EVAL_TOKENS["cuda"]
    assert eval_tokens(compose_config(["trainer.eval_tokens=512"]).trainer, "cuda") == 512


def test_a_training_batch_splits_into_consecutive_rows_within_the_budget():
    batch = {"input_ids": torch.arange(5 * 4).view(5, 4), "labels": torch.tensor([0, 1, 0, 1, 1]), "note": "kept"}
    parts = micro_batches(batch, max_tokens=9)  # two rows of 4 tokens a slice
    assert [part["input_ids"][:, 0].tolist() for part, _ in parts] == [[0, 4], [8, 12], [16]]
    assert [share for _, share in parts] == pytest.approx([2 / 5, 2 / 5, 1 / 5])  # a class label per row
    assert all(part["note"] == "kept" for part, _ in parts)
    assert micro_batches(batch, None) == [(batch, 1.0)] and micro_batches(batch, 20) == [(batch, 1.0)]
    assert len(micro_batches(batch, 1)) == 5  # a row wider than the budget runs alone
    # a multiple-choice row of 2 choices x 3 tokens holds 6 tokens
    choices = {"input_ids": torch.zeros(4, 2, 3, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
    assert [len(part["input_ids"]) for part, _ in micro_batches(choices, 12)] == [2, 2]


def test_a_language_models_slices_weigh_by_their_labelled_next_tokens():
    ignore = -100
    labels = torch.tensor([[ignore, 5, 6, 7],          # 3 predicted tokens (the first position predicts nothing)
                           [9, ignore, ignore, 4],      # 1: its first label is never a target
                           [ignore, ignore, ignore, ignore],
                           [ignore, ignore, 2, 3]])     # 2
    batch = {"input_ids": torch.ones(4, 4, dtype=torch.long), "labels": labels}
    parts = micro_batches(batch, max_tokens=4)
    # the row without a labelled token is left out: its mean loss is 0/0 and its share 0
    assert [share for _, share in parts] == pytest.approx([3 / 6, 1 / 6, 2 / 6])
    assert [part["labels"][0, -1].item() for part, _ in parts] == [7, 4, 3]
    empty = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.full((2, 4), ignore)}
    assert micro_batches(empty, 4) == [(empty, 1.0)]  # nothing to learn from: the whole batch says so (NaN)
