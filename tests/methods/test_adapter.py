"""Bottleneck adapters: where they sit, what they compute (AdapterHub's configurations), what trains."""

import pytest
import torch
import torch.nn.functional as F

from sift_cli.errors import SiftError
from tests.methods.layer_helpers import hidden_states, prepared, trainable

HIDDEN = 32  # tiny-bert


def adapter_params(bottleneck: int) -> int:
    return HIDDEN * bottleneck + bottleneck + bottleneck * HIDDEN + HIDDEN  # down + up, with biases


def test_houlsby_puts_adapters_after_attention_and_ffn_of_every_layer():
    m, model, loaded, _ = prepared("adapter", "method.bottleneck=4", "method.reduction_factor=null")
    for layer in model.bert.encoder.layer:
        assert layer.attention.output.adapter.down.out_features == 4
        assert layer.output.adapter.down.out_features == 4
    names = trainable(model)
    assert names == {n for n in names if ".adapter." in n} | loaded.new_params
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == 2 * 2 * adapter_params(4) + head
    assert m.summary()["adapter_params"] == 2 * 2 * adapter_params(4)


def test_pfeiffer_puts_one_adapter_after_the_ffn():
    m, model, loaded, _ = prepared("adapter", "method.placement=pfeiffer")  # reduction 16: 32 -> 2
    for layer in model.bert.encoder.layer:
        assert not hasattr(layer.attention.output, "adapter")
        assert layer.output.adapter.down.out_features == 2
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == 2 * adapter_params(2) + head


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_start_as_identity_and_sit_in_the_forward_pass(placement):
    _, model, _, tokenizer = prepared("adapter", f"method.placement={placement}", "method.init=identity")
    _, plain, _, _ = prepared("full_ft")
    assert torch.allclose(hidden_states(model, tokenizer), hidden_states(plain, tokenizer), atol=1e-6)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.adapter.up.weight.normal_()  # not constant: LayerNorm would remove it
    assert not torch.allclose(hidden_states(model, tokenizer), hidden_states(plain, tokenizer), atol=1e-3)


def test_gradients_reach_the_adapters():
    _, model, _, tokenizer = prepared("adapter")
    model.train()
    batch = tokenizer(["a b c", "d e"], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    ups = [a.up.weight.grad for l in model.bert.encoder.layer for a in (l.attention.output.adapter, l.output.adapter)]
    assert all(g is not None for g in ups) and sum(g.abs().sum() for g in ups) > 0


def ffn_by_hand(output, inter, x, read_norm: bool, activation, gated: bool):
    """AdapterHub's bottleneck layer re-derived: h = dense(inter); a = h (Houlsby) or LN(h + x) (Pfeiffer);
    f = up(act(down(a))), times mean_s sigmoid(gate(a)) if gated; the sub-layer's LayerNorm of h + f + x."""
    adapter, norm = output.adapter, output.LayerNorm
    h = inter @ output.dense.weight.T + output.dense.bias
    a = F.layer_norm(h + x, (h.shape[-1],), norm.weight, norm.bias, norm.eps) if read_norm else h
    f = activation(a @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    if gated:
        f = f * torch.sigmoid(a @ adapter.gate.weight.T + adapter.gate.bias).mean(dim=1, keepdim=True)
    return F.layer_norm(h + f + x, (h.shape[-1],), norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("placement, gated, activation", [
    ("houlsby", False, F.silu),  # HoulsbyConfig: swish
    ("pfeiffer", False, F.relu),  # PfeifferConfig: relu, reads LN(h + x), the LayerNorm applied again
    ("pfeiffer", True, F.relu),  # UniPELT's gated adapter
])
def test_the_ffn_adapter_computes_what_adapterhub_computes(placement, gated, activation):
    _, model, _, _ = prepared("adapter", f"method.placement={placement}", f"method.gated={str(gated).lower()}")
    output = model.bert.encoder.layer[0].output.eval()
    torch.manual_seed(1)
    inter, x = torch.randn(2, 5, output.dense.in_features), torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(output(inter, x), ffn_by_hand(output, inter, x, placement == "pfeiffer", activation,
                                                            gated), atol=1e-5)


def test_weights_start_as_adapterhubs_bert_init():
    _, model, _, _ = prepared("adapter", "method.bottleneck=16", "method.reduction_factor=null")
    adapters = [a for l in model.bert.encoder.layer for a in (l.attention.output.adapter, l.output.adapter)]
    for part in ("down", "up"):
        weights = torch.cat([getattr(a, part).weight.reshape(-1) for a in adapters])  # 4 x 512 entries
        assert 0.018 < weights.std() < 0.022 and abs(weights.mean()) < 0.002
        assert all(getattr(a, part).bias.abs().sum() == 0 for a in adapters)


def test_a_gate_adds_its_parameters_to_the_count():
    m, model, loaded, _ = prepared("adapter", "method.placement=pfeiffer", "method.gated=true")
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == 2 * (adapter_params(2) + HIDDEN + 1) + head


@pytest.mark.parametrize("overrides, message", [
    (["method.bottleneck=4"], "exactly one"),
    (["method.reduction_factor=64"], "positive integer"),  # 32 // 64 = 0
    (["method.placement=middle"], "houlsby, pfeiffer"),
    (["method.activation=tanh"], "relu, swish, gelu or null"),
    (["method.init=zeros"], "bert, houlsby, identity"),
])
def test_bad_adapter_config_is_one_line(overrides, message):
    with pytest.raises(SiftError, match=message):
        prepared("adapter", *overrides)
