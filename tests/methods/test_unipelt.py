"""UniPELT as the design-spaces code builds it: gated prefix, Pfeiffer adapter and LoRA on every layer.

The prefix and the adapter are checked by hand in test_prefix.py and test_adapter.py; here the gated LoRA,
the parameter count and the settings.
"""

import pytest
import torch

from sift_cli.errors import SiftError
from tests.methods.layer_helpers import prepared, trainable

HIDDEN, LAYERS = 32, 2  # tiny-bert


def test_gated_lora_adds_the_gated_low_rank_update_in_place_of_alpha_over_r():
    _, model, _, _ = prepared("unipelt")
    query = model.bert.encoder.layer[0].attention.self.query
    lora = query.gated_lora
    torch.manual_seed(1)
    with torch.no_grad():
        lora.B.normal_()  # zero at the start, as LoRA's B
        x = torch.randn(2, 5, HIDDEN)
        gate = torch.sigmoid(x @ lora.gate.weight.T + lora.gate.bias).mean(dim=1, keepdim=True)  # (2, 1, 1)
        expected = x @ query.weight.T + query.bias + gate * (x @ lora.A.T @ lora.B.T)
        assert torch.allclose(query(x), expected, atol=1e-5)


def test_what_trains_is_the_three_gated_modules_and_the_head():
    m, model, loaded, _ = prepared("unipelt", "method.prefix_length=4", "method.prefix_mlp_hidden=6")
    prefix = 4 * HIDDEN + HIDDEN * 6 + 6 + 6 * LAYERS * 2 * HIDDEN + LAYERS * 2 * HIDDEN
    prefix_gates = LAYERS * (HIDDEN + 1)
    bottleneck = HIDDEN // 16
    adapters = LAYERS * (2 * HIDDEN * bottleneck + bottleneck + HIDDEN + HIDDEN + 1)  # down, up, gate
    loras = LAYERS * 2 * (8 * (HIDDEN + HIDDEN) + HIDDEN + 1)  # query and value: A, B, gate
    head = sum(p.numel() for n, p in model.named_parameters() if n in loaded.new_params)
    assert m.count_trainable(model) == prefix + prefix_gates + adapters + loras + head
    names = trainable(model)
    assert names == {n for n in names if any(k in n for k in ("prefix", ".adapter.", "gated_lora"))} | loaded.new_params


@pytest.mark.parametrize("overrides, message", [
    (["method.lora_r=0"], "method.lora_r must be a positive integer"),
    (["method.adapter_reduction_factor=64"], "leaves no bottleneck"),
    (["method.lora_targets=[nope]"], r"LoRA targets \['nope'\] must name Linear modules"),
])
def test_bad_settings_are_one_line(overrides, message):
    with pytest.raises(SiftError, match=message):
        prepared("unipelt", *overrides)
