"""Batches bounded by tokens, not rows: what an evaluation holds at once is set by `trainer.eval_tokens`,
whatever the prompt length or the number of examples, and a training step that would keep more activations
than `trainer.train_tokens` allows runs its batch in slices of rows (`micro_batches`), whose gradients add up
to the whole batch's.

Rows are sorted longest first and packed while rows x longest row (the padded batch) stays within the
budget; a row longer than the budget runs alone. Every process scores its share of the batches (as many
batches on each) and the results are put back in the order of the set. Full-vocabulary logits are computed only for the positions
that are scored, at most `LOGIT_ELEMENTS` of them at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EVAL_TOKENS = {"cpu": 8192, "cuda": 32768}  # trainer.eval_tokens=auto, per device type
LOGIT_ELEMENTS = 2**24  # full-vocabulary logits computed at once: 64 MiB in fp32 (a 49k vocabulary: 341 positions)


def eval_tokens(tcfg, device_type: str) -> int:
    """`trainer.eval_tokens` (checked by sift_cli/config.py), with `auto` resolved for the device type."""
    if tcfg.eval_tokens == "auto":
        return EVAL_TOKENS["cuda" if device_type == "cuda" else "cpu"]
    return int(tcfg.eval_tokens)


def logit_positions(vocab: int) -> int:
    """How many positions' full-vocabulary logits fit in LOGIT_ELEMENTS (at least one)."""
    return max(1, LOGIT_ELEMENTS // vocab)


def row_widths(input_ids) -> tuple[list[int], list[int]]:
    """Each row's padded width and how many sequences it holds (a multiple-choice row: one per choice)."""
    widths, counts = [], []
    for row in input_ids:
        nested = len(row) > 0 and not isinstance(row[0], int)
        widths.append(max(len(choice) for choice in row) if nested else len(row))
        counts.append(len(row) if nested else 1)
    return widths, counts


def token_batches(widths: Sequence[int], max_tokens: int, max_rows: int | None = None,
                  counts: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices in batches, longest rows first: each batch's sequences times its longest width is at most
    `max_tokens` (a row wider than that alone), with at most `max_rows` rows."""
    counts = counts or [1] * len(widths)
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    sequences = width = 0
    for i in order:
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (sequences + counts[i]) * width > max_tokens):
            batches.append(current)
            current, sequences = [], 0
        if not current:
            width = widths[i]  # the longest of its batch: rows come longest first
        current.append(i)
        sequences += counts[i]
    if current:
        batches.append(current)
    return batches


def micro_batches(batch: dict, max_tokens: int | None) -> list[tuple[dict, float]]:
    """A padded training batch as consecutive slices of rows of at most `max_tokens` tokens each (sequences x
    width; one row at least), each with its share of the batch's loss terms, so that the sum of share x the
    slice's mean loss is the batch's mean loss. The terms are what the loss averages over: the labelled tokens
    of a language model (labels other than -100, shifted by one as causal LMs predict the next token), else
    the rows. A slice without a labelled token is left out (its mean loss is 0/0): its share is zero."""
    rows = len(batch["input_ids"])
    per_row = batch["input_ids"][0].numel()
    size = rows if max_tokens is None else max(1, max_tokens // per_row)
    if size >= rows:
        return [(batch, 1.0)]
    slices = [{key: value[start:start + size] if torch.is_tensor(value) and value.dim() > 0
               and len(value) == rows else value for key, value in batch.items()}
              for start in range(0, rows, size)]
    terms = [loss_terms(part) for part in slices]
    total = sum(terms)
    if total == 0:  # no labelled token at all: the whole batch, whose loss says so
        return [(batch, 1.0)]
    return [(part, count / total) for part, count in zip(slices, terms) if count]


def loss_terms(batch: dict) -> int:
    """How many terms a batch's mean loss averages: its labelled next tokens when labels are per token, else
    its rows."""
    labels = batch.get("labels")
    if labels is None or labels.dim() < 2:
        return len(batch["input_ids"])
    return int((labels[..., 1:] != -100).sum())


def shard(batches: list[list[int]], process_index: int, num_processes: int) -> list[tuple[list[int], bool]]:
    """One process's batches, each with whether its results count: every num_processes-th batch, so that long
    and short ones spread evenly, and then, on a process with one batch fewer, the last (smallest) batch again,
    not counted, so that every process runs as many forward passes (collectives in a wrapped model's forward
    stay matched)."""
    mine = [(batch, True) for batch in batches[process_index::num_processes]]
    if len(mine) < -(-len(batches) // num_processes):
        mine.append((batches[-1], False))
    return mine


def restore_order(indices: list[list[int]], values: list[torch.Tensor], size: int) -> torch.Tensor:
    """Per-row results of batches (from any process) back in the order of the set: row `indices[b][j]` is
    `values[b][j]`."""
    order = torch.tensor([i for batch in indices for i in batch], dtype=torch.long)
    if len(order) != size or len(set(order.tolist())) != size:
        raise RuntimeError(f"evaluation scored {len(order)} rows ({len(set(order.tolist()))} distinct) of {size}")
    stacked = torch.cat(values)
    ordered = torch.empty_like(stacked)
    ordered[order] = stacked
    return ordered
