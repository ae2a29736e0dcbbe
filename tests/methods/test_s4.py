"""S4 designs: the budget rule, placement of each strategy on its groups' layers only, counts, real training."""

import pytest
import torch

from sift_cli.errors import SiftError
from sift_cli.methods.layers import LayerCost
from sift_cli.methods.s4 import derive_sizes
from tests.methods.layer_helpers import SENTENCES, hidden_states, prepared, trainable

FOUR_LAYERS = ["model.config.num_hidden_layers=4"]
HIDDEN, FFN = 32, 64  # tiny-bert


# ---- the budget rule ---------------------------------------------------------------------------------
def layer_counts(costs, sizes):
    return [sum(c.at(s.get(name, 0)) for name, c in group.items()) for group, s in zip(costs, sizes)]


def test_one_sized_strategy_fills_its_share_exactly():
    sizes = derive_sizes([{"lora": LayerCost(0, 100)}], [2], budget_params=1000)
    assert sizes == [{"lora": 5}]


def test_uniform_rule_gives_every_layer_the_same_count_and_meets_the_budget():
    costs = [{"adapter": LayerCost(64, 130), "lora": LayerCost(0, 128)},
             {"prefix": LayerCost(840, 32), "bitfit": LayerCost(288, 0)},
             {"adapter": LayerCost(64, 130), "prefix": LayerCost(840, 32), "bitfit": LayerCost(288, 0),
              "lora": LayerCost(0, 128)}]
    groups, budget = [1, 2, 1], 12000
    sizes = derive_sizes(costs, groups, budget)
    counts = layer_counts(costs, sizes)
    assert max(counts) - min(counts) <= 130 / 2 + 32  # within half the coarsest unit of the 3000 target
    total = sum(n * c for n, c in zip(groups, counts))
    assert abs(total - budget) <= 0.05 * budget
    assert sizes[2]["adapter"] >= 1 and sizes[2]["prefix"] >= 1 and sizes[2]["lora"] >= 1


def test_strategies_of_a_group_share_its_layers_evenly():
    sizes = derive_sizes([{"adapter": LayerCost(0, 100), "lora": LayerCost(0, 100)}], [1], budget_params=1000)
    assert sizes == [{"adapter": 5, "lora": 5}]


def test_bitfit_alone_keeps_its_fixed_size_and_the_rest_goes_to_the_other_layers():
    sizes = derive_sizes([{"bitfit": LayerCost(200, 0)}, {"lora": LayerCost(0, 100)}], [1, 2], budget_params=1200)
    assert sizes == [{}, {"lora": 5}]  # (1200 - 200) / 2 layers


def test_increasing_allocation_gives_deeper_groups_more():
    costs = [{"lora": LayerCost(0, 10)}] * 3
    sizes = derive_sizes(costs, [1, 1, 1], budget_params=600, allocation="increasing")
    assert [s["lora"] for s in sizes] == [10, 20, 30]


def test_a_budget_too_small_for_the_assignment_is_one_line():
    with pytest.raises(SiftError, match="too small for group 1 \\(adapter\\+prefix\\)"):
        derive_sizes([{"adapter": LayerCost(64, 130), "prefix": LayerCost(840, 32)}], [2], budget_params=1000)


def test_a_fixed_size_design_far_from_the_budget_is_refused():
    with pytest.raises(SiftError, match="more than 5% away from the budget"):
        derive_sizes([{"bitfit": LayerCost(200, 0)}], [2], budget_params=1000)


# ---- placement and counts ----------------------------------------------------------------------------
def test_each_strategy_attaches_only_to_the_layers_of_its_groups():
    m, model, loaded, _ = prepared("s4", *FOUR_LAYERS, "method.groups=[1,2,1]", "method.budget=0.02",
                                   "method.assignment=[[adapter,bitfit],[prefix],[lora,bitfit]]")
    layers = model.bert.encoder.layer
    assert [hasattr(l.output, "adapter") for l in layers] == [True, False, False, False]
    assert [hasattr(l.attention.output, "adapter") for l in layers] == [True, False, False, False]  # houlsby
    assert [hasattr(l.attention.self, "prefix") for l in layers] == [False, True, True, False]
    assert [hasattr(l.attention.self.query, "lora_A") for l in layers] == [False, False, False, True]
    assert [hasattr(l.attention.self.value, "lora_A") for l in layers] == [False, False, False, True]

    def trains(index, kind):
        prefix = f"bert.encoder.layer.{index}."
        return any(n.startswith(prefix) and kind(n[len(prefix):]) for n in trainable(model))

    original_bias = lambda n: n.endswith("bias") and not any(k in n for k in ("adapter", "prefix", "lora_"))
    assert [trains(i, original_bias) for i in range(4)] == [True, False, False, True]
    new_module = ("adapter", "prefix", "lora_")
    others = {n for n in trainable(model) if not any(k in n for k in new_module)} - loaded.new_params
    assert others and all(n.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.3.")) and n.endswith("bias")
                          for n in others)  # BitFit: the biases of groups 1 and 3, nothing else of the checkpoint
    assert loaded.new_params <= trainable(model)


def test_trainable_count_matches_the_derived_sizes():
    m, model, loaded, _ = prepared("s4", *FOUR_LAYERS, "method.groups=[1,2,1]", "method.budget=0.02",
                                   "method.assignment=[[adapter,bitfit],[prefix],[lora,bitfit]]")
    info = m.summary()
    plans = info["group_plans"]
    adapter, length, rank = (plans[0]["sizes"]["adapter_bottleneck"], plans[1]["sizes"]["prefix_length"],
                             plans[2]["sizes"]["lora_rank"])
    mlp = info["prefix_mlp_hidden"]
    bitfit = 3 * HIDDEN + HIDDEN + HIDDEN + FFN + HIDDEN + HIDDEN  # q, k, v, attention out, 2 LayerNorms, FFN in/out
    by_hand = (2 * (2 * HIDDEN * adapter + adapter + HIDDEN) + bitfit  # group 1: houlsby adapters + biases
               + 2 * (length * HIDDEN + HIDDEN * mlp + mlp + mlp * 2 * HIDDEN + 2 * HIDDEN)  # group 2: prefixes
               + 2 * rank * (HIDDEN + HIDDEN) + bitfit)  # group 3: LoRA on query and value + biases
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert info["strategy_params"] == by_hand == sum(len(p["layers"]) * p["params_per_layer"] for p in plans)
    assert m.count_trainable(model) == by_hand + head
    assert abs(by_hand - info["budget_params"]) <= 0.05 * info["budget_params"]
    assert info["budget_params"] == round(0.02 * loaded.total_params)


def test_all_four_strategies_on_one_group_change_the_forward_pass_and_get_gradients():
    _, model, _, tokenizer = prepared("s4", "method.groups=[2]", "method.budget=0.01",
                                      "method.assignment=[[adapter,prefix,bitfit,lora]]")
    model.train()
    batch = tokenizer(["a fine film .", "dull"], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    silent = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    # LoRA's A gets no gradient while the zero-initialised B is zero (AdapterHub's adapters start non-zero)
    assert silent == {n for n in trainable(model) if "lora_A" in n}
    assert any(".prefix." in n for n in trainable(model))


def test_roberta_takes_the_same_strategies_and_padding_stays_masked():
    m, model, loaded, tokenizer = prepared("s4", "model.config.model_type=roberta", "method.groups=[1,1]",
                                           "method.budget=0.01", "method.assignment=[[adapter,prefix,bitfit,lora],[prefix]]")
    layers = model.roberta.encoder.layer
    assert hasattr(layers[0].output, "adapter") and hasattr(layers[0].attention.self.query, "lora_A")
    assert [hasattr(l.attention.self, "prefix") for l in layers] == [True, True]
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == m.summary()["strategy_params"] + head
    batch, alone = hidden_states(model, tokenizer), hidden_states(model, tokenizer, SENTENCES[:1])
    assert torch.allclose(batch[0, : alone.shape[1]], alone[0], atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["method.groups=[1,2]"], "covers 3 layers, but the model has 2"),
    (["method.groups=[1,1]", "method.assignment=[[adapter],[dropout]]"], "distinct strategies"),
    (["method.groups=[1,1]", "method.assignment=[[adapter]]"], "one set of strategies per group"),
    (["method.groups=[1,1]", "method.assignment=[[],[]]"], "tunes no group"),
    (["method.groups=[1,1]", "method.assignment=[[lora],[lora]]", "method.allocation=random"], "allocation"),
    (["method.groups=[1,1]", "method.assignment=[[prefix],[prefix]]", "method.budget=0.0005"], "too small"),
    (["method.budget=2"], "fraction"),
])
def test_bad_designs_are_one_line(overrides, message):
    with pytest.raises(SiftError, match=message):
        prepared("s4", *overrides)


# ---- real data -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_four_strategies_on_one_group_learn_sst2(real_data):
    """MiniLM, one group of all 6 layers with adapter+prefix+bitfit+lora, 16-shot SST-2: loss falls, beats chance."""
    from torch.utils.data import DataLoader

    from sift_cli.methods import ModelContext, build_method
    from sift_cli.models import load_tokenizer
    from sift_cli.tasks.classification import ClassificationTask
    from tests.conftest import compose_config

    cfg = compose_config(["model=minilm-l6", "method=s4", "method.groups=[6]", "method.budget=0.01",
                          "method.assignment=[[adapter,prefix,bitfit,lora]]", f"data.dir={real_data}",
                          "data.max_eval_samples=128", "task.k_shot_pool=all"])  # the draw it was measured on
    torch.manual_seed(0)
    task = ClassificationTask(cfg, load_tokenizer(cfg.model))
    data = task.load()  # 16 examples per class
    loaded = task.load_model(cfg.model, seed=0)
    method = build_method(cfg.method)
    model = method.prepare(loaded.model, ModelContext(new_params=loaded.new_params))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)

    def mean_loss_and_accuracy(dataset):
        model.eval()
        with torch.no_grad():
            outputs = [(model(**b), b["labels"]) for b in DataLoader(dataset, batch_size=128, collate_fn=data.collator)]
        model.train()
        loss = sum(out.loss.item() * len(labels) for out, labels in outputs) / len(dataset)
        hits = torch.cat([out.logits.argmax(-1) == labels for out, labels in outputs])
        return loss, hits.float().mean().item()

    before, _ = mean_loss_and_accuracy(data.train)
    for _ in range(5):  # 5 epochs of 2 batches
        for batch in DataLoader(data.train, batch_size=16, shuffle=True, collate_fn=data.collator):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after, _ = mean_loss_and_accuracy(data.train)
    _, accuracy = mean_loss_and_accuracy(data.tests[0].dataset)  # measured: 0.69 -> 0.27, accuracy 0.62
    assert after < 0.7 * before
    assert accuracy > 0.55
