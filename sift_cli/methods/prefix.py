"""Prefix tuning (Li & Liang, 2021) on every layer, with the reparameterisation MLP; the task head trains too.

Our own implementation (sift_cli/methods/layers.py), not peft's PrefixTuningConfig, although peft's runs
on BERT: peft puts one prefix on every layer through a model-wide cache and cannot leave layers out,
which the S4 designs need (prefix on some groups only). Using the same module here makes `prefix` and
the prefix inside `s4` the same strategy with the same parameter count, so they compare directly.
Each layer's prefix is `method.length` positions; its MLP has `method.mlp_hidden` hidden units.
"""

from sift_cli.errors import SiftError
from sift_cli.methods import register_method
from sift_cli.methods.base import Method
from sift_cli.methods.layers import attach_prefix, encoder_layers, prefix_cost, train_only


def _positive(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SiftError(f"method.{key} must be a positive integer, got {value!r}")
    return value


@register_method
class PrefixTuning(Method):
    name = "prefix"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info = {}

    def prepare(self, model, ctx):
        length = _positive(self.cfg.length, "length")
        mlp_hidden = _positive(self.cfg.mlp_hidden, "mlp_hidden")
        layers = encoder_layers(model, self.name)
        added = [prefix for layer in layers for prefix in attach_prefix(model, layer, length, mlp_hidden)]
        train_only(model, added, [], ctx.new_params)
        self.info = {"length": length, "mlp_hidden": mlp_hidden, "layers": len(layers),
                     "prefix_params": prefix_cost(layers[0], mlp_hidden).at(length) * len(layers)}
        return model

    def summary(self):
        return self.info
