"""Shared by the tests of the sparse methods: tiny-bert runs on two distinct batches with no dropout, the
batches the loop trains on re-derived from the data and the seed, and references computed from them by
autograd and by hand."""

import math

import torch
from torch import nn

from tests.conftest import FAST, make_job

NO_DROPOUT = ["+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]
# 8 training examples in batches of 4: two different batches per epoch, so sums over batches differ
# from sums of squares over batches.
SETTING = [*FAST, *NO_DROPOUT, "trainer.batch_size=4"]
TARGET_ENTRIES = 8 * 32 * 32  # 2 layers x query/key/value/attention-output, 32 x 32 each
ATTENTION = ("query", "key", "value", "attention.output.dense")  # the default targets, as BERT names them


def loop_batches(job, count: int) -> list[dict]:
    """The first `count` batches the loop trains on, from the run's training rows and its seed alone: each
    epoch's order is torch.randperm of the rows under a generator seeded with seed + epoch (accelerate's
    seedable sampler, seeded by the run), cut into batches of trainer.batch_size, the last one short."""
    rows, size, seed = job.trainer.data.train, int(job.cfg.trainer.batch_size), int(job.cfg.seed)
    batches, epoch = [], 0
    while len(batches) < count:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [job.trainer.data.collator([rows[i] for i in order[start:start + size]])
                    for start in range(0, len(rows), size)]
        epoch += 1
    return batches[:count]


def attention_weights(model) -> dict[str, torch.Tensor]:
    """The default targets, by parameter name: the weights of BERT's attention linear layers."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(ATTENTION)}


def dense_job(tmp_path, extra=()):
    """Full fine-tuning with SETTING: the same pre-trained weights and head as any sparse run with it."""
    return make_job(tmp_path, [*SETTING, "method=full_ft", *extra])


def per_batch_gradients(tmp_path, batches: int, every_tensor: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per target tensor (the attention weights, or every parameter outside the head), the gradient of each
    of the first `batches` training batches, by autograd on the dense model."""
    job = dense_job(tmp_path)
    model = job.trainer.unwrapped_model
    names = ({n for n, _ in model.named_parameters() if not n.startswith("classifier")} if every_tensor
             else set(attention_weights(model)))
    grads = []
    for batch in loop_batches(job, batches):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if name in names})
    return grads


def pretrained(tmp_path) -> dict[str, torch.Tensor]:
    """The parameters every run with SETTING starts from (the seed fixes the head)."""
    return {n: p.detach().clone() for n, p in dense_job(tmp_path).trainer.unwrapped_model.named_parameters()}


def index_sets(indices: dict[str, torch.Tensor]) -> dict[str, set[int]]:
    return {name: set(index.tolist()) for name, index in indices.items() if index.numel()}


def chosen(job) -> dict[str, set[int]]:
    """The entries a sparse run trains, per target tensor."""
    return index_sets({name: layer.index for name, layer in job.method.layers.items()})


def top_sets(scores: dict[str, torch.Tensor], k_of) -> dict[str, set[int]]:
    """Per tensor, the indices of its k_of(name) largest scores."""
    return {name: set(torch.topk(s.reshape(-1), k_of(name)).indices.tolist()) for name, s in scores.items()
            if k_of(name)}


def per_tensor_top(scores: dict[str, torch.Tensor], rate: float) -> dict[str, set[int]]:
    """The published per-tensor rule, by hand: each tensor's floor(rate * n) largest scores."""
    return top_sets(scores, lambda name: math.floor(rate * scores[name].numel()))


def global_top_sets(scores: dict[str, torch.Tensor], k: int) -> dict[str, set[int]]:
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    chosen, out, offset = set(torch.topk(flat, k).indices.tolist()), {}, 0
    for name in names:
        numel = scores[name].numel()
        picked = {i - offset for i in chosen if offset <= i < offset + numel}
        if picked:
            out[name] = picked
        offset += numel
    return out


def budget(rate: float) -> int:
    return math.floor(rate * TARGET_ENTRIES)


def assert_trains_only_its_entries(job, before: dict[str, torch.Tensor]) -> None:
    """After fit: target weights moved only at the selected entries, nothing else but the head moved, and
    the optimizer holds the selected entries and the head, nothing dense."""
    model = job.trainer.unwrapped_model
    params = dict(model.named_parameters())
    for name, layer in job.method.layers.items():
        moved = torch.nonzero((params[name] - before[name]).reshape(-1)).reshape(-1)
        assert set(moved.tolist()) <= set(layer.index.tolist())
        assert moved.numel() > 0
    untouched = [n for n in before if not n.startswith("classifier") and n in params and n not in job.method.layers
                 and not n.endswith(".values")]
    assert untouched and all(torch.equal(params[n], before[n]) for n in untouched)
    optimizer = job.method.create_optimizer(model, job.cfg.trainer)
    held = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    head = sum(p.numel() for n, p in params.items() if n.startswith("classifier"))
    assert held == sum(layer.index.numel() for layer in job.method.layers.values()) + head
