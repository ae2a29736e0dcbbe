"""Prefix tuning: one reparameterised prefix per layer, injected into self-attention, masks respected."""

import pytest
import torch

from sift_cli.errors import SiftError
from tests.methods.layer_helpers import SENTENCES, hidden_states, prepared, trainable

BATCHES = {"padded": SENTENCES, "unpadded": SENTENCES[:1]}

HIDDEN = 32  # tiny-bert (key/value width equals the hidden size)


def prefix_params(length: int, mlp_hidden: int) -> int:
    return length * HIDDEN + HIDDEN * mlp_hidden + mlp_hidden + mlp_hidden * 2 * HIDDEN + 2 * HIDDEN


def test_every_self_attention_gets_a_prefix_and_only_prefixes_and_head_train():
    m, model, loaded, _ = prepared("prefix", "method.length=5", "method.mlp_hidden=7")
    for layer in model.bert.encoder.layer:
        assert layer.attention.self.prefix.embedding.shape == (5, HIDDEN)
    names = trainable(model)
    assert names == {n for n in names if ".prefix." in n} | loaded.new_params
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == 2 * prefix_params(5, 7) + head


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_changes_the_output(attention, batch):
    _, model, _, tokenizer = prepared("prefix", attention=attention)
    _, plain, _, _ = prepared("full_ft", attention=attention)
    change = hidden_states(model, tokenizer, BATCHES[batch]) - hidden_states(plain, tokenizer, BATCHES[batch])
    assert change.abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_does_not_change_the_unpadded_rows(attention):
    _, model, _, tokenizer = prepared("prefix", attention=attention)
    batch = hidden_states(model, tokenizer)
    alone = hidden_states(model, tokenizer, SENTENCES[:1])  # unpadded: the extended mask must keep padding out
    assert batch.shape[1] > alone.shape[1]
    assert torch.allclose(batch[0, : alone.shape[1]], alone[0], atol=1e-5)


def own_mlp(module):
    return module.prefix.mlp(module.prefix.embedding)  # (length, [keys | values])


def shared_mlp(module, model, layer=0):
    """AdapterHub's layout: the pool's output viewed as (length, layers x 2, hidden); layer i's keys are at 2i."""
    pool = model.bert.encoder.prefix_pool
    out = pool.mlp(pool.embedding).view(pool.length, 2 * len(model.bert.encoder.layer), HIDDEN)
    return torch.cat([out[:, 2 * layer], out[:, 2 * layer + 1]], dim=-1)


VARIANTS = {  # method and settings, how the prefix is made, whether a gate scales the layer's own keys and values
    "per_layer": (["prefix"], lambda module, model: own_mlp(module), False),
    "shared": (["prefix", "method.shared=true"], shared_mlp, False),
    "unipelt": (["unipelt"], shared_mlp, True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_self_attention_output_is_attention_over_prefix_and_tokens(attention, variant):
    """The first layer's self-attention, recomputed by hand from its weights, its prefix MLP and the padding."""
    method, generate, gated = VARIANTS[variant]
    _, model, _, tokenizer = prepared(*method, attention=attention)
    module = model.bert.encoder.layer[0].attention.self
    seen = {}
    module.register_forward_hook(lambda mod, args, kwargs, out: seen.update(h=args[0] if args else
                                 kwargs["hidden_states"], out=out[0]), with_kwargs=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)
        h, heads, prefix = seen["h"], module.num_attention_heads, module.prefix
        size = HIDDEN // heads
        split = lambda x: x.view(x.shape[0], -1, heads, size).transpose(1, 2)  # (batch, heads, positions, size)
        generated = generate(module, model)
        gate = torch.sigmoid(h @ prefix.gate.weight.T + prefix.gate.bias).mean(1).view(2, 1, 1, 1) if gated else 1
        keys = torch.cat([generated[:, :HIDDEN].view(1, -1, heads, size).transpose(1, 2).expand(2, -1, -1, -1),
                          gate * split(module.key(h))], dim=2)
        values = torch.cat([generated[:, HIDDEN:].view(1, -1, heads, size).transpose(1, 2).expand(2, -1, -1, -1),
                            gate * split(module.value(h))], dim=2)
        scores = split(module.query(h)) @ keys.transpose(-1, -2) / size**0.5
        visible = torch.cat([torch.ones(2, prefix.length, dtype=torch.bool), batch["attention_mask"].bool()], 1)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ values).transpose(1, 2).reshape(2, -1, HIDDEN)
    assert keys.shape[2] == prefix.length + batch["input_ids"].shape[1]
    assert torch.allclose(seen["out"], expected, atol=1e-5)


def test_a_shared_prefix_trains_one_mlp_for_every_layer_and_keeps_its_output():
    m, model, loaded, _ = prepared("prefix", "method.shared=true", "method.length=5", "method.mlp_hidden=7")
    layers = len(model.bert.encoder.layer)
    mlp = 5 * HIDDEN + HIDDEN * 7 + 7 + 7 * layers * 2 * HIDDEN + layers * 2 * HIDDEN  # free vectors and MLP
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == mlp + head
    assert m.summary()["prefix_kept"] == 5 * layers * 2 * HIDDEN
    assert not any(".attention.self.prefix." in n for n in trainable(model))  # the layers hold no parameters


def test_an_attention_that_skips_the_prefix_fails_loudly():
    _, model, _, tokenizer = prepared("prefix")
    model.config._attn_implementation = "sdpa"  # as if a release bypassed the prefix-aware attention
    with pytest.raises(SiftError, match="ran without its prefix"):
        hidden_states(model, tokenizer)


def test_sdpa_and_eager_attention_agree_with_a_prefix():
    _, sdpa, _, tokenizer = prepared("prefix")  # prepared() seeds, so both get the same prefix
    _, eager, _, _ = prepared("prefix", attention="eager")
    assert torch.allclose(hidden_states(sdpa, tokenizer), hidden_states(eager, tokenizer), atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
def test_gradients_reach_the_prefix_embedding_and_mlp(batch):
    _, model, _, tokenizer = prepared("prefix")
    model.train()
    inputs = tokenizer(BATCHES[batch], padding=True, return_tensors="pt")
    model(**inputs, labels=torch.tensor([0, 1])[: len(BATCHES[batch])]).loss.backward()
    prefix = model.bert.encoder.layer[0].attention.self.prefix
    assert prefix.embedding.grad.abs().sum() > 0 and prefix.mlp[0].weight.grad.abs().sum() > 0
