"""The sparse-update mechanism: exactly a dense AdamW restricted to the selected entries, and no more."""

import copy

import pytest
import torch

from sift_cli.methods import ModelContext
from sift_cli.methods.sparse import SparseLinear, apply_export, csr_rows, find_targets, sampled_weight_grad
from sift_cli.models import load_tokenizer
from sift_cli.tasks.classification import ClassificationTask
from tests.conftest import compose_config

TARGETS = ["query", "key", "value", "attention.output.dense"]


def tiny_model(dropout: float = 0.0):
    cfg = compose_config(["model=tiny-bert", f"+model.config.hidden_dropout_prob={dropout}",
                          f"+model.config.attention_probs_dropout_prob={dropout}"])
    task = ClassificationTask(cfg, load_tokenizer(cfg.model))
    return task.load_model(cfg.model, seed=0)


def batches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(1000, 2000, (4, 7), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "labels": torch.randint(0, 2, (4,), generator=gen)}


def random_indices(targets, rate: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(m.weight.numel(), generator=gen)[: int(rate * m.weight.numel())]
            for name, m in targets.items()}


def sparsify(model, indices, grad_mode):
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier")}
    for name, param in model.named_parameters():
        param.requires_grad_(name in head)
    modules = dict(model.named_modules())
    layers = {}
    for name, index in indices.items():
        parent, _, child = name.rpartition(".")
        layers[name] = SparseLinear(modules[name], index, grad_mode)
        setattr(modules[parent], child, layers[name])
    return layers


def train_sparse(model, layers, steps, lr=1e-2, weight_decay=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.eval()  # no dropout: both sides see the same function
    for batch in batches(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in layers.values():
            layer.sync()
    return optimizer


def train_dense_restricted(model, indices, steps, lr=1e-2, weight_decay=0.1):
    """The reference: dense gradients, then AdamW over the selected entries (and the head) only. `indices`
    name tensors, or linear layers for their weights."""
    params = dict(model.named_parameters())
    weights = {name: params[name] if name in params else params[f"{name}.weight"] for name in indices}
    selected = {name: torch.nn.Parameter(weights[name].detach().view(-1)[idx].clone()) for name, idx in indices.items()}
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    optimizer = torch.optim.AdamW([*selected.values(), *head], lr=lr, weight_decay=weight_decay)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in [*weights.values(), *head]:
        param.requires_grad_(True)
    model.eval()
    for batch in batches(steps):
        model(**batch).loss.backward()
        for name, idx in indices.items():
            selected[name].grad = weights[name].grad.view(-1)[idx].clone()
            weights[name].grad = None
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, idx in indices.items():
                weights[name].view(-1)[idx] = selected[name]


@pytest.mark.parametrize("grad_mode", ["sampled", "dense"])
def test_n_steps_equal_a_dense_adamw_restricted_to_the_indices(grad_mode):
    loaded = tiny_model()
    pretrained = copy.deepcopy(loaded.model)
    reference = copy.deepcopy(loaded.model)
    targets = find_targets(loaded.model, TARGETS, {"classifier"})
    indices = random_indices(targets, 0.05)
    layers = sparsify(loaded.model, indices, grad_mode)
    train_sparse(loaded.model, layers, steps=4)
    train_dense_restricted(reference, indices, steps=4)

    trained = dict(loaded.model.named_parameters())
    before = dict(pretrained.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=1e-5, atol=1e-6)
    for name, idx in indices.items():
        increment = (trained[f"{name}.weight"] - before[f"{name}.weight"]).view(-1)
        off = torch.ones_like(increment, dtype=torch.bool)
        off[idx] = False
        assert torch.count_nonzero(increment[off]) == 0  # bit for bit untouched off the indices
        assert torch.count_nonzero(increment[idx]) == idx.numel()  # every selected entry moved
    frozen = [n for n in before if "intermediate" in n or "embeddings" in n]
    assert frozen and all(torch.equal(trained[n], before[n]) for n in frozen)
    batch = next(batches(1, seed=9))  # the forward sees every update, the last one included
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, reference(**batch).logits)


def test_optimizer_state_holds_only_the_selected_entries():
    loaded = tiny_model()
    targets = find_targets(loaded.model, TARGETS, {"classifier"})
    indices = random_indices(targets, 0.01)
    layers = sparsify(loaded.model, indices, "sampled")
    optimizer = train_sparse(loaded.model, layers, steps=1)
    state_entries = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    head = sum(p.numel() for n, p in loaded.model.named_parameters() if n.startswith("classifier"))
    assert state_entries == 2 * (sum(i.numel() for i in indices.values()) + head)
    assert all(layer.weight.grad is None and not layer.weight.requires_grad for layer in layers.values())


def test_sampled_gradient_equals_the_dense_product_at_the_indices():
    gen = torch.Generator().manual_seed(0)
    grad_out, inputs = torch.randn(50, 6, generator=gen), torch.randn(50, 9, generator=gen)
    index = torch.tensor([0 * 9 + 8, 3 * 9 + 2, 3 * 9 + 4, 5 * 9 + 0])  # rows 0, 3, 3, 5 (row 1, 2, 4 empty)
    crow = csr_rows(index, 6, 9)
    assert crow.tolist() == [0, 1, 1, 1, 3, 3, 4]
    expected = (grad_out.T @ inputs).reshape(-1)[index]
    torch.testing.assert_close(sampled_weight_grad(grad_out, inputs, crow, index % 9), expected)


def test_gradient_accumulation_sums_micro_batches():
    loaded = tiny_model()
    targets = find_targets(loaded.model, TARGETS, {"classifier"})
    indices = random_indices(targets, 0.05)
    dense = copy.deepcopy(loaded.model)
    layers = sparsify(loaded.model, indices, "sampled")
    loaded.model.eval()
    dense.eval()
    for batch in batches(2):
        loaded.model(**batch).loss.backward()
        dense(**batch).loss.backward()
    dense_params = dict(dense.named_parameters())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.values.grad, dense_params[f"{name}.weight"].grad.view(-1)[layer.index])


def test_export_rebuilds_the_fine_tuned_model_from_the_pretrained_one():
    from sift_cli.methods.sift import SIFT

    loaded = tiny_model()
    pretrained = copy.deepcopy(loaded.model)
    method = SIFT(compose_config(["method=sift"]).method)
    method.prepare(loaded.model, ModelContext(new_params=loaded.new_params))
    targets = find_targets(loaded.model, TARGETS, {"classifier"})  # layer names: an earlier export's keys
    method.layers = sparsify(loaded.model, random_indices(targets, 0.05), "sampled")
    train_sparse(loaded.model, method.layers, steps=3)
    exported = method.export(loaded.model)
    assert set(exported) >= {"bert.encoder.layer.0.attention.self.query.sparse_index", "classifier.weight"}
    size = sum(t.numel() for t in exported.values())
    assert size < 0.2 * sum(p.numel() for p in pretrained.parameters())
    rebuilt = apply_export(pretrained, exported)
    trained = dict(loaded.model.named_parameters())
    for name, param in rebuilt.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-7)


def test_all_params_refuses_tied_weights_before_anything_loads():
    from sift_cli.errors import SiftError
    from sift_cli.run import check_config

    # tiny-llama ties its output layer to its embedding, as SmolLM2 does
    cfg = compose_config(["model=tiny-llama", "task=instruct/alpaca", "method=sift", "method.target_modules=all_params"])
    with pytest.raises(SiftError, match="model.embed_tokens.weight is tied to another layer's weight"):
        check_config(cfg)


def test_every_kind_of_tensor_trains_as_a_dense_adamw_restricted_to_its_entries():
    """With target_modules=all_params, biases, LayerNorm weights and embedding tables train through
    SparseEntries (linear weights through SparseLinear, their biases too): n steps equal dense gradients and
    AdamW over the selected entries, and the optimizer holds those entries and the head only."""
    from types import SimpleNamespace

    from sift_cli.methods.sift import SIFT
    from sift_cli.methods.sparse import SparseEntries

    loaded = tiny_model()
    reference = copy.deepcopy(loaded.model)
    method = SIFT(compose_config(["method=sift", "method.target_modules=all_params"]).method)
    method.prepare(loaded.model, ModelContext(new_params=loaded.new_params))
    gen = torch.Generator().manual_seed(3)
    indices = {name: torch.randperm(t.numel(), generator=gen)[: max(1, t.numel() // 20)]
               for name, t in method.targets.items()}
    method.choose = lambda run, targets: indices
    method.select(SimpleNamespace(unwrapped_model=loaded.model))
    # (a SparseLinear whose bias is parametrized becomes a subclass, ParametrizedSparseLinear)
    kinds = {kind.__name__ for layer in method.layers.values() for kind in (SparseLinear, SparseEntries)
             if isinstance(layer, kind)}
    assert kinds == {"SparseLinear", "SparseEntries"} and len(method.layers) == len(indices)
    assert isinstance(method.layers["bert.encoder.layer.0.attention.self.query.bias"], SparseEntries)

    trained = train_sparse(loaded.model, method.layers, steps=3)
    train_dense_restricted(reference, indices, steps=3)
    probe = next(batches(1, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**probe).logits, reference(**probe).logits, rtol=1e-4, atol=1e-5)
    held = sum(state["exp_avg"].numel() for state in trained.state.values())
    head = sum(p.numel() for n, p in loaded.model.named_parameters() if n.startswith("classifier"))
    assert held == sum(idx.numel() for idx in indices.values()) + head
