"""Prefix tuning (Li & Liang, 2021) on every layer, with the reparameterisation MLP; the task head trains too.

Our own implementation (sift_cli/methods/layers.py), not peft's PrefixTuningConfig, although peft's runs
on BERT: peft puts one prefix on every layer through a model-wide cache and cannot leave layers out,
which the S4 designs need (prefix on some groups only). Using the same module here makes `prefix` and
the prefix inside `s4` the same strategy with the same parameter count, so they compare directly.
Each layer's prefix is `method.length` positions; its MLP has `method.mlp_hidden` hidden units.

A difference we keep by default: Li & Liang and AdapterHub (whose PrefixTuningConfig the S4 code uses: 30
positions, a 512-wide MLP) make every layer's prefix with one MLP shared across layers and keep only its output
after training; ours gives each layer a narrow MLP of its own, so that a layer's cost is its own (S4 allocates
a budget per layer) and prefix tuning stays near the other methods' budgets. `shared: true` builds theirs
(`length=30 mlp_hidden=512` for AdapterHub's defaults); `summary()` then also reports the entries kept.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import (
    attach_prefix, attach_shared_prefix, encoder_layers, prefix_cost, prefix_pool_cost, train_only,
)


@dataclass
class PrefixSettings(Settings):
    length: int = MISSING  # prefix positions per layer
    mlp_hidden: int = MISSING  # hidden units of each layer's reparameterisation MLP (of the shared one)
    shared: bool = MISSING  # one MLP makes every layer's prefix (Li & Liang, AdapterHub)

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.length), "length", "a positive integer")
        self.need(is_count(self.mlp_hidden), "mlp_hidden", "a positive integer")


@register_method
class PrefixTuning(Method):
    name = "prefix"
    Settings = PrefixSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info = {}

    def check_model(self, model):
        encoder_layers(model, self.name)

    def prepare(self, model, ctx):
        length, mlp_hidden = int(self.cfg.length), int(self.cfg.mlp_hidden)
        layers = encoder_layers(model, self.name)
        if self.cfg.shared:
            added = attach_shared_prefix(model, length, mlp_hidden)
            trained = sum(p.numel() for p in added[0].parameters())
            kept = {"prefix_kept": added[0].kept}  # what inference needs once the MLP is dropped
        else:
            added = [prefix for layer in layers for prefix in attach_prefix(model, layer, length, mlp_hidden)]
            trained, kept = prefix_cost(layers[0], mlp_hidden).at(length) * len(layers), {}
        train_only(model, added, [], ctx.new_params)
        self.info = {"length": length, "mlp_hidden": mlp_hidden, "shared": bool(self.cfg.shared),
                     "layers": len(layers), "prefix_params": trained, **kept}
        return model

    def memory_plan(self, parts):
        """The free vectors and reparameterisation MLPs, and the head."""
        parts.encoder_only(self.name)
        h, kv, length, mlp = parts.arch.hidden, parts.arch.kv_width, int(self.cfg.length), int(self.cfg.mlp_hidden)
        if self.cfg.shared:
            prefixes = prefix_pool_cost(h, kv, parts.arch.layers, length, mlp)
        else:
            prefixes = parts.arch.layers * (h * mlp + mlp + mlp * 2 * kv + 2 * kv + length * h)
        training = Training(parts.head_modes, norms="frozen", embeddings=False, prefix=length)
        w = parts.weight_bytes
        return Plan(training, [(prefixes + parts.head_params, w)], added=[(prefixes, w)])

    def summary(self):
        return self.info
