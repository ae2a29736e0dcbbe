"""Bottleneck adapters on every layer (Houlsby et al., 2019; Pfeiffer et al., 2021); the task head trains too.

peft has no bottleneck adapter, so the modules are ours (sift_cli/methods/layers.py, shared with `s4`),
computing what AdapterHub's HoulsbyConfig and PfeifferConfig compute (the S4 code is built on AdapterHub):
Houlsby placement adapts the attention output and the FFN output before their residual sums, with swish;
Pfeiffer placement adapts the FFN only, reading LN(h + x) and feeding h + f + x to the same LayerNorm again,
with relu. Weights start as AdapterHub's (`init: bert`, N(0, 0.02)), so the adapted model does not start
exactly as the pre-trained one (`init: identity` does). The bottleneck is `method.bottleneck`, or hidden size
divided by `method.reduction_factor` (exactly one of the two is set). Left as AdapterHub leaves it: no
dropout inside the adapter, no gate (`gated: true` adds UniPELT's).
"""

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from sift_cli.errors import SiftError
from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import (
    ADAPTER_ACTIVATIONS, ADAPTER_INITS, PLACEMENT_ACTIVATION, PLACEMENTS, adapter_cost, attach_adapters,
    encoder_layers, train_only,
)


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
    activation: Optional[str] = MISSING  # relu | swish | gelu; null: AdapterHub's for the placement
    init: str = MISSING  # bert | houlsby | identity
    gated: bool = MISSING

    def check(self, run) -> None:
        super().check(run)
        self.need(self.placement in PLACEMENTS, "placement", f"one of {', '.join(PLACEMENTS)}")
        if (self.bottleneck is None) == (self.reduction_factor is None):
            self.refuse(f"method=adapter: set exactly one of {self.where}.bottleneck and {self.where}.reduction_factor")
        self.need(self.bottleneck is None or is_count(self.bottleneck), "bottleneck", "a positive integer")
        self.need(self.reduction_factor is None or self.reduction_factor > 0, "reduction_factor", "> 0")
        self.need(self.activation is None or self.activation in ADAPTER_ACTIVATIONS, "activation",
                  f"one of {', '.join(ADAPTER_ACTIVATIONS)} or null")
        self.need(self.init in ADAPTER_INITS, "init", f"one of {', '.join(ADAPTER_INITS)}")


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
        activation, gated = self.activation, bool(self.cfg.gated)
        added = [adapter for layer in layers
                 for adapter in attach_adapters(layer, size, placement, activation, self.cfg.init, gated)]
        train_only(model, added, [], ctx.new_params)
        self.info = {"placement": placement, "bottleneck": size, "activation": activation, "init": self.cfg.init,
                     "gated": gated, "layers": len(layers),
                     "adapter_params": adapter_cost(layers[0], placement, gated).at(size) * len(layers)}
        return model

    @property
    def activation(self) -> str:
        return self.cfg.activation or PLACEMENT_ACTIVATION[self.cfg.placement]

    def memory_plan(self, parts):
        parts.encoder_only(self.name)
        h = parts.arch.hidden
        width = bottleneck_size(self.cfg, h)
        places = PLACEMENTS[self.cfg.placement]
        gate = h + 1 if self.cfg.gated else 0
        adapters = parts.arch.layers * len(places) * (2 * h * width + width + h + gate)  # down, up (, gate)
        training = Training(parts.head_modes, norms="frozen", embeddings=False, adapter_width=width,
                            adapter_places=places, adapter_activation=self.activation,
                            adapter_reads_norm=self.cfg.placement == "pfeiffer")
        w = parts.weight_bytes
        return Plan(training, [(adapters + parts.head_params, w)], added=[(adapters, w)])

    def summary(self):
        return self.info
