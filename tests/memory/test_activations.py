"""The activation model: what autograd keeps, op by op, for BERT and LLaMA blocks."""

import pytest
import torch

from sift_cli.memory.activations import Activations, Tape
from sift_cli.memory.measure import SavedActivations
from sift_cli.memory.model import (KNOWN_ARCHITECTURES, Architecture, Setting, Training, architecture_of,
                                   block_linears, load_architecture, predict)

LLAMA_7B = KNOWN_ARCHITECTURES["llama-7b"]
PAPER = {"batch": 1, "seq": 2048, "precision": "bf16", "attention": "eager"}


@pytest.mark.parametrize("precision, attention, kv_heads, tied", [
    ("bf16", "eager", 4, False),  # LLaMA-7B's shape, as in the paper
    ("fp32", "eager", 4, False),
    ("fp32", "sdpa", 2, True),  # grouped-query attention and a tied head (SmolLM2's shape), a fused kernel
    ("bf16", "sdpa", 2, True),
])
def test_llama_activations_equal_what_autograd_keeps(precision, attention, kv_heads, tied):
    """The decoder rules behind the paper's table, on a tiny random LLaMA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         intermediate_size=172, vocab_size=1000, tie_word_embeddings=tied,
                         attn_implementation=attention)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    ids = torch.randint(0, 1000, (2, 32))
    with SavedActivations(model) as saved:
        model(input_ids=ids, labels=ids).loss.backward()
    setting = Setting(batch=2, seq=32, precision=precision, attention=attention, device="cpu")
    assert predict(architecture_of(model.config), "full_ft", setting).activations == pytest.approx(saved.peak, abs=8)


def test_a_bert_block_is_korthikanti_et_al_s_34_plus_5as_over_h():
    """With 2-byte activations, 1-byte dropout masks and i = 4h, a trained BERT layer keeps sbh(34 + 5as/h) bytes,
    plus the LayerNorms' fp32 mean and 1/std (16 bytes per token)."""
    s, b, h, a = 512, 2, 1024, 16
    arch = Architecture("encoder", hidden=h, layers=1, heads=a, intermediate=4 * h, vocab=100)
    walk = Activations(arch, Setting(batch=b, seq=s, precision="bf16", attention="eager"),
                       Training({lin.name: "dense" for lin in block_linears(arch)}))
    tape = Tape()
    walk.block(tape, True)
    assert tape.total == s * b * h * (34 + 5 * a * s / h) + 16 * s * b


def test_a_llama_block_adapts_it_to_the_gated_mlp_and_fp32_softmax():
    """docs/memory.md: sbh(24 + 8i/h + 6as/h) + 8sb bytes for a trained LLaMA layer in bf16 (141.5 sbh for 7B)."""
    s, b, h, a, i = 2048, 1, LLAMA_7B.hidden, LLAMA_7B.heads, LLAMA_7B.intermediate
    walk = Activations(LLAMA_7B, Setting(**PAPER), Training({lin.name: "dense" for lin in block_linears(LLAMA_7B)}))
    tape = Tape()
    walk.block(tape, True)
    assert tape.total == s * b * h * (24 + 8 * i / h + 6 * a * s / h) + 8 * s * b
    assert tape.total == 141.5 * s * b * h + 8 * s * b


@pytest.mark.parametrize("model", ["tiny-bert", "llama-7b"])
@pytest.mark.parametrize("method", ["full_ft", "lora", "sift"])
def test_activations_grow_linearly_in_batch_and_faster_than_linearly_in_sequence(model, method):
    arch = load_architecture(model)

    def activations(**step):
        return predict(arch, method, Setting(**{"batch": 1, "seq": 256, "attention": "eager", **step})).activations

    # linear in the batch, up to the rotary tables every sequence shares (a few KB)
    assert activations(batch=8) == pytest.approx(8 * activations(batch=1), rel=1e-4)

    def beyond_linear(seq):  # c + a*seq + b*seq^2 gives 2*b*seq^2: the attention scores and probabilities
        return activations(seq=seq) - 2 * activations(seq=2 * seq) + activations(seq=3 * seq)

    assert beyond_linear(256) > 0
    assert beyond_linear(512) == pytest.approx(4 * beyond_linear(256), rel=1e-9)
    fused = predict(arch, method, Setting(seq=512)).activations / predict(arch, method, Setting(seq=256)).activations
    assert fused == pytest.approx(2, rel=1e-3)  # a fused attention kernel keeps nothing of size seq^2


@pytest.mark.parametrize("model", ["tiny-bert", "llama-7b"])
@pytest.mark.parametrize("method", ["full_ft", "lora", "bitfit", "sift"])
def test_gradient_checkpointing_lowers_activations(model, method):
    arch = load_architecture(model)
    if method == "bitfit" and arch.family == "decoder":
        pytest.skip("LLaMA has no bias terms")
    plain = predict(arch, method, Setting(seq=1024))
    checkpointed = predict(arch, method, Setting(seq=1024, grad_checkpointing=True))
    assert plain.recompute == 0
    assert checkpointed.activations + checkpointed.recompute < plain.activations
    assert checkpointed.weights + checkpointed.optimizer == plain.weights + plain.optimizer
