"""Full fine-tuning: every parameter trains; the reference for every cost ratio.

Two settings make it the baseline matched to PAC-tuning's regime (the same head learning rate and frozen
embeddings): `new_lr`, the learning rate of the parameters the checkpoint lacks (the task head), and
`freeze_embeddings`.
"""

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from sift_cli.errors import SiftError
from sift_cli.memory.model import Plan, Training
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, freeze_all_but, freeze_embeddings


@dataclass
class FullFTSettings(Settings):
    new_lr: Optional[float] = MISSING  # lr of the new parameters (the head); null = trainer.lr
    freeze_embeddings: bool = MISSING

    def check(self, run) -> None:
        super().check(run)
        self.need(self.new_lr is None or self.new_lr > 0, "new_lr", "> 0 or null")


@register_method
class FullFineTuning(Method):
    name = "full_ft"
    Settings = FullFTSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.new_params: set[str] = set()

    def prepare(self, model, ctx):
        freeze_all_but(model, lambda name: True)
        if self.cfg.freeze_embeddings:
            freeze_embeddings(model)
        self.new_params = set(ctx.new_params)
        return model

    def param_groups(self, model, weight_decay):
        """The usual groups; with `new_lr`, the new parameters in groups of their own at that rate."""
        groups = super().param_groups(model, weight_decay)
        if self.cfg.new_lr is None:
            return groups
        new = {id(p) for name, p in model.named_parameters() if name in self.new_params}
        split = []
        for group in groups:
            for is_new in (False, True):
                params = [p for p in group["params"] if (id(p) in new) == is_new]
                if params:
                    split.append({**group, "params": params, **({"lr": float(self.cfg.new_lr)} if is_new else {})})
        return split

    def memory_plan(self, parts):
        if self.cfg.freeze_embeddings:
            raise SiftError("method=full_ft with freeze_embeddings=true is not modelled by sift-memory")
        return Plan(Training(parts.dense_modes), [(parts.everything, parts.weight_bytes)])
