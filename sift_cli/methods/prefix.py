"""Prefix tuning (Li & Liang, 2021) on every layer, with the reparameterisation MLP; the task head trains too.

Our own implementation (sift_cli/methods/layers.py), not peft's PrefixTuningConfig, although peft's runs
on BERT: peft puts one prefix on every layer through a model-wide cache and cannot leave layers out,
which the S4 designs need (prefix on some groups only). Using the same module here makes `prefix` and
the prefix inside `s4` the same strategy with the same parameter count, so they compare directly.
Each layer's prefix is `method.length` positions; its MLP has `method.mlp_hidden` hidden units.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import attach_prefix, encoder_layers, prefix_cost, train_only


@dataclass
class PrefixSettings(Settings):
    length: int = MISSING  # prefix positions per layer
    mlp_hidden: int = MISSING  # hidden units of each layer's reparameterisation MLP

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
        added = [prefix for layer in layers for prefix in attach_prefix(model, layer, length, mlp_hidden)]
        train_only(model, added, [], ctx.new_params)
        self.info = {"length": length, "mlp_hidden": mlp_hidden, "layers": len(layers),
                     "prefix_params": prefix_cost(layers[0], mlp_hidden).at(length) * len(layers)}
        return model

    def memory_plan(self, parts):
        """Each layer's free vectors and reparameterisation MLP, and the head."""
        parts.encoder_only(self.name)
        h, kv, length, mlp = parts.arch.hidden, parts.arch.kv_width, int(self.cfg.length), int(self.cfg.mlp_hidden)
        prefixes = parts.arch.layers * (h * mlp + mlp + mlp * 2 * kv + 2 * kv + length * h)
        training = Training(parts.head_modes, norms="frozen", embeddings=False, prefix=length)
        w = parts.weight_bytes
        return Plan(training, [(prefixes + parts.head_params, w)], added=[(prefixes, w)])

    def summary(self):
        return self.info
