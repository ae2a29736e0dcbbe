"""BitFit (Ben Zaken et al., 2022): train only the bias terms, plus the newly initialised task head."""

from sift_cli.errors import SiftError
from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, freeze_all_but


@register_method
class BitFit(Method):
    name = "bitfit"

    def prepare(self, model, ctx):
        freeze_all_but(model, lambda name: name.endswith(".bias") or name in ctx.new_params)
        if not any(p.requires_grad for p in model.parameters()):  # LLaMA-style models have no bias terms
            raise SiftError(f"method=bitfit has nothing to train: {type(model).__name__} has no bias terms "
                            f"and no new head")
        return model

    def memory_plan(self, parts):
        """Every bias (the LayerNorms' too) and the head."""
        arch = parts.arch
        if arch.family == "decoder":
            raise SiftError("method=bitfit: this architecture has no bias terms to train")
        biases = arch.layers * (sum(lin.fan_out for lin in parts.blocks if lin.bias) + 2 * arch.hidden)
        biases += sum(lin.fan_out for lin in parts.top if lin.bias) + arch.hidden  # + the embedding LayerNorm's
        modes = {**{lin.name: "bias" for lin in parts.blocks + parts.top}, **parts.head_modes}
        return Plan(Training(modes, norms="bias", embeddings=False),
                    [(biases + parts.head_params, parts.weight_bytes)])
