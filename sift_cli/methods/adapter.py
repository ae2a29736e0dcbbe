"""Bottleneck adapters on every layer (Houlsby et al., 2019; Pfeiffer et al., 2021); the task head trains too.

peft has no bottleneck adapter, so the modules are ours (sift_cli/methods/layers.py, shared with `s4`).
Houlsby placement puts one after the attention output projection and one after the FFN; Pfeiffer
placement only the one after the FFN. The bottleneck is `method.bottleneck`, or hidden size divided by
`method.reduction_factor` (exactly one of the two is set).
"""

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from sift_cli.errors import SiftError
from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import PLACEMENTS, adapter_cost, attach_adapters, encoder_layers, train_only


def bottleneck_size(cfg, hidden: int) -> int:
    """`method.bottleneck`, or the hidden size divided by `method.reduction_factor` (settings give one)."""
    size = cfg.bottleneck if cfg.bottleneck is not None else int(hidden // cfg.reduction_factor)
    if not isinstance(size, int) or size < 1:
        raise SiftError(f"method=adapter: the bottleneck must be a positive integer, got {size!r} "
                        f"(hidden size {hidden}, reduction factor {cfg.reduction_factor})")
    return size


@dataclass
class AdapterSettings(Settings):
    placement: str = MISSING  # houlsby | pfeiffer
    reduction_factor: Optional[float] = MISSING  # bottleneck = hidden size / reduction_factor ...
    bottleneck: Optional[int] = MISSING  # ... or given directly (exactly one of the two)

    def check(self, run) -> None:
        super().check(run)
        self.need(self.placement in PLACEMENTS, "placement", f"one of {', '.join(PLACEMENTS)}")
        if (self.bottleneck is None) == (self.reduction_factor is None):
            self.refuse(f"method=adapter: set exactly one of {self.where}.bottleneck and {self.where}.reduction_factor")
        self.need(self.bottleneck is None or is_count(self.bottleneck), "bottleneck", "a positive integer")
        self.need(self.reduction_factor is None or self.reduction_factor > 0, "reduction_factor", "> 0")


@register_method
class AdapterTuning(Method):
    name = "adapter"
    Settings = AdapterSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info = {}

    def check_model(self, model):
        layers = encoder_layers(model, self.name)
        bottleneck_size(self.cfg, layers[0].attention.self.key.in_features)

    def prepare(self, model, ctx):
        placement = self.cfg.placement
        layers = encoder_layers(model, self.name)
        size = bottleneck_size(self.cfg, layers[0].attention.self.key.in_features)
        added = [adapter for layer in layers for adapter in attach_adapters(layer, size, placement)]
        train_only(model, added, [], ctx.new_params)
        self.info = {"placement": placement, "bottleneck": size, "layers": len(layers),
                     "adapter_params": adapter_cost(layers[0], placement).at(size) * len(layers)}
        return model

    def memory_plan(self, parts):
        parts.encoder_only(self.name)
        h = parts.arch.hidden
        width = bottleneck_size(self.cfg, h)
        places = PLACEMENTS[self.cfg.placement]
        adapters = parts.arch.layers * len(places) * (2 * h * width + width + h)  # down and up, with biases
        training = Training(parts.head_modes, norms="frozen", embeddings=False, adapter_width=width,
                            adapter_places=places)
        w = parts.weight_bytes
        return Plan(training, [(adapters + parts.head_params, w)], added=[(adapters, w)])

    def summary(self):
        return self.info
