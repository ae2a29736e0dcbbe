"""LoRA (Hu et al., 2022) through peft: low-rank updates on the target modules; the task head trains densely.

alpha 16 at r 8 is Hu et al.'s RoBERTa GLUE setting (scaling alpha / r = 2); AdapterHub's LoRAConfig, which
the S4 code uses, has alpha = r (scaling 1): `method.alpha=8` gives it.
"""

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING, OmegaConf
from peft import LoraConfig, get_peft_model

from sift_cli.errors import SiftError
from sift_cli.memory.model import LORA_BYTES, Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count

# peft's task types wrap the model for its head; kinds without one (multiple choice) get plain LoRA
_TASK_TYPES = {"classification": "SEQ_CLS", "wsc": "SEQ_CLS", "instruct": "CAUSAL_LM"}
DEFAULT_TARGETS = {"encoder": ["query", "value"], "decoder": ["q_proj", "v_proj"]}  # peft's defaults


@dataclass
class LoRASettings(Settings):
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Optional[List[str]] = MISSING  # null: peft's default for the architecture

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.r), "r", "a positive integer")
        self.need(self.alpha > 0, "alpha", "> 0")
        self.need(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        self.need(self.target_modules is None or bool(self.target_modules), "target_modules",
                  "null or a non-empty list of module names")


def module_suffix_matches(model, targets) -> bool:
    """Whether some module's name is a target or ends with '.target' (peft's rule for target_modules)."""
    return any(name == t or name.endswith("." + t) for name, _ in model.named_modules() for t in targets)


@register_method
class LoRA(Method):
    name = "lora"
    Settings = LoRASettings

    def check_model(self, model):
        targets = self.cfg.target_modules
        if targets is not None and not module_suffix_matches(model, targets):
            raise SiftError(f"method.target_modules={list(targets)} matches no module of this model")

    def prepare(self, model, ctx):
        targets = self.cfg.target_modules
        config = LoraConfig(
            task_type=_TASK_TYPES.get(ctx.task_kind),
            r=int(self.cfg.r),
            lora_alpha=float(self.cfg.alpha),
            lora_dropout=float(self.cfg.dropout),
            target_modules=OmegaConf.to_container(targets) if targets is not None else None,
            modules_to_save=ctx.head_modules or None,
        )
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            raise SiftError(f"method=lora: {str(err).splitlines()[0]}") from None

    def memory_plan(self, parts):
        """A and B on the targets (fp32, as peft keeps them); peft's modules_to_save trains a copy of the head
        and keeps the original beside it."""
        rank = int(self.cfg.r)
        targets = self.cfg.target_modules or DEFAULT_TARGETS[parts.arch.family]
        chosen, _ = parts.matching(targets)
        if not chosen:
            raise SiftError(f"method=lora: target_modules={list(targets)} matches no linear layer of this architecture")
        lora = parts.arch.layers * rank * sum(lin.fan_in + lin.fan_out for lin in chosen)
        modes = {**{lin.name: "lora" for lin in chosen}, **parts.head_modes}
        training = Training(modes, norms="frozen", embeddings=False, lora_rank=rank,
                            lora_dropout=float(self.cfg.dropout) > 0)
        head = (parts.head_params, parts.weight_bytes)
        return Plan(training, [(lora, LORA_BYTES), head], added=[(lora, LORA_BYTES), head])
