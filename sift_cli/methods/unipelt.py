"""UniPELT (Mao et al., ACL 2022) as the S4 code builds it: its `PEFT` adapter configuration, the repository's
own baseline, is a gated union of prefix tuning, a Pfeiffer adapter and LoRA on every layer.

As in that code (AdapterHub's ConfigUnion of PrefixTuningConfig(prefix_length=10),
PfeifferConfig(reduction_factor=16) and LoRAConfig(r=8), each with use_gating=True): one shared 512-wide
MLP makes every layer's prefix, and a gate on the layer input scales the layer's own keys and values; the
Pfeiffer adapter reads LN(h + x), with relu and N(0, 0.02) weights, its output scaled by a gate; LoRA on the
query and value projections, its update scaled by a gate in place of alpha / r. Every gate is the mean over
positions of sigmoid(Linear(input, 1)). The task head trains too.
"""

from dataclasses import dataclass
from typing import List

from omegaconf import MISSING

from sift_cli.errors import SiftError
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import (
    attach_adapters, attach_gated_lora, attach_shared_prefix, encoder_layers, lora_cost, train_only,
)


@dataclass
class UniPELTSettings(Settings):
    prefix_length: int = MISSING
    prefix_mlp_hidden: int = MISSING  # width of the MLP shared by every layer's prefix
    adapter_reduction_factor: int = MISSING  # bottleneck = hidden size / this
    lora_r: int = MISSING
    lora_targets: List[str] = MISSING

    def check(self, run) -> None:
        super().check(run)
        for key in ("prefix_length", "prefix_mlp_hidden", "adapter_reduction_factor", "lora_r"):
            self.need(is_count(getattr(self, key)), key, "a positive integer")
        self.need(len(self.lora_targets) > 0, "lora_targets", "a non-empty list of module names")


def _entries(modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


@register_method
class UniPELT(Method):
    name = "unipelt"
    Settings = UniPELTSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info = {}

    def bottleneck(self, layers) -> int:
        hidden = layers[0].attention.self.key.in_features
        size = hidden // int(self.cfg.adapter_reduction_factor)
        if size < 1:
            raise SiftError(f"method=unipelt: adapter_reduction_factor {self.cfg.adapter_reduction_factor} leaves "
                            f"no bottleneck of a {hidden}-wide model")
        return size

    def check_model(self, model):
        layers = encoder_layers(model, self.name)
        self.bottleneck(layers)
        lora_cost(layers[0], list(self.cfg.lora_targets))  # the targets are Linear modules of each layer

    def prepare(self, model, ctx):
        cfg = self.cfg
        layers = encoder_layers(model, self.name)
        size, targets = self.bottleneck(layers), list(cfg.lora_targets)
        prefixes = attach_shared_prefix(model, int(cfg.prefix_length), int(cfg.prefix_mlp_hidden), gated=True)
        adapters = [a for layer in layers for a in attach_adapters(layer, size, "pfeiffer", "relu", "bert", True)]
        loras = [m for layer in layers for m in attach_gated_lora(layer, targets, int(cfg.lora_r))]
        train_only(model, prefixes + adapters + loras, [], ctx.new_params)
        self.info = {"prefix_params": _entries(prefixes), "adapter_params": _entries(adapters),
                     "lora_params": _entries(loras), "adapter_bottleneck": size, "layers": len(layers)}
        return model

    def summary(self):
        return self.info
