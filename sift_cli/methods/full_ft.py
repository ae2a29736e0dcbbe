"""Full fine-tuning: every parameter trains; the reference for every cost ratio."""

from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, freeze_all_but


@register_method
class FullFineTuning(Method):
    name = "full_ft"

    def prepare(self, model, ctx):
        freeze_all_but(model, lambda name: True)
        return model

    def memory_plan(self, parts):
        return Plan(Training(parts.dense_modes), [(parts.everything, parts.weight_bytes)])
