"""Linear probing: only the parameters the checkpoint lacks (the task head) train; the pre-trained model stays
as it is. The floor every fine-tuning method must beat, and the control that tells a method which moves the
body from one that, in effect, trains the head alone (PAC-tuning's matched baselines)."""

from sift_cli.errors import SiftError
from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, freeze_all_but


@register_method
class LinearProbe(Method):
    name = "linear_probe"

    def prepare(self, model, ctx):
        if not ctx.new_params:
            raise SiftError("method=linear_probe has nothing to train: the model has no new head")
        freeze_all_but(model, lambda name: name in ctx.new_params)
        return model

    def memory_plan(self, parts):
        """The head alone."""
        if not parts.head:
            raise SiftError("method=linear_probe: this architecture has no new head to train")
        return Plan(Training(parts.head_modes, norms="frozen", embeddings=False),
                    [(parts.head_params, parts.weight_bytes)])
