"""SAM, the Second-order Approximation Method (Fu et al., "On the Effectiveness of Parameter-Efficient
Fine-Tuning", AAAI 2023; code: github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, `bsearch` in
src/runner.py, run as `bsearch=0.005,burnin=600` by scripts/train.sh).

Under a constant diagonal Hessian, the mask that best lowers the second-order expansion of the loss keeps
the entries with the largest squared gradient. The gradients of a burn-in of `burnin_steps` optimizer steps
are summed with no update, and an entry's score is the size of that sum (the code ranks |sum of g|; summing
g^2 instead is the `fisher` baseline). Then only the chosen entries train, from the pre-trained weights.

Settings that make the paper's formula or the published code's rule:
- `scope`: `global` keeps the top floor(p * N) entries over all target tensors together (the paper's
  formula); `per_tensor` keeps the top floor(p * n) of each tensor of n entries (the published code).
- `clip_burnin`: each burn-in step's gradient of the whole model is first clipped to total norm
  `trainer.max_grad_norm` (the published code sums the gradients its training step has clipped to 1).
- `target_modules=all_params`: every tensor of the pre-trained model, embeddings, biases and LayerNorm
  included (the published code's every `encoder.*` tensor); the default is SIFT's attention weights.
experiment=sam_glue_superglue runs the published rule. What still differs from the code: the burn-in sums
all `burnin_steps` step gradients (the code's burnin=600 sums 599 and scores at the 600th); it runs over the
first training batches, which training then starts with again (the code trains on from the batches after
them); and training takes its full number of steps after the burn-in (the code counts the burn-in's
iterations among its steps, though not its scheduler's).
"""

from dataclasses import dataclass

from omegaconf import MISSING

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count
from sift_cli.methods.sparse import SCOPES, SparseMethod, SparseSettings, gradient_statistic, select_top


@dataclass
class BurnInSettings(SparseSettings):
    burnin_steps: int = MISSING  # optimizer steps whose gradients are summed, with no update
    clip_burnin: bool = MISSING  # clip each step's gradient to trainer.max_grad_norm first (the published code)

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.burnin_steps), "burnin_steps", "a positive integer")
        if self.clip_burnin and run is not None and not run.trainer.max_grad_norm:
            self.refuse(f"{self.where}.clip_burnin clips to trainer.max_grad_norm, which is "
                        f"{run.trainer.max_grad_norm!r}")


def burnin_gradients(run, cfg, targets, statistic) -> dict:
    """Sum over the burn-in's steps (method.burnin_steps) of `statistic(step gradient)` for each target, each
    step's gradient clipped first if method.clip_burnin says so."""
    accum = int(run.tcfg.grad_accum)
    clip = float(run.tcfg.max_grad_norm) if cfg.clip_burnin else None
    return gradient_statistic(run, targets, int(cfg.burnin_steps) * accum, statistic, micro_batches=accum, clip=clip)


@dataclass
class SAMSettings(BurnInSettings):
    scope: str = MISSING  # global | per_tensor

    def check(self, run) -> None:
        super().check(run)
        self.need(self.scope in SCOPES, "scope", f"one of {', '.join(SCOPES)}")


@register_method
class SAM(SparseMethod):
    name = "sam"
    Settings = SAMSettings

    @property
    def scope(self) -> str:
        return self.cfg.scope

    def choose(self, run, targets):
        summed = burnin_gradients(run, self.cfg, targets, lambda g: g)
        return select_top({name: total.abs_() for name, total in summed.items()}, float(self.cfg.sparse_rate),
                          self.scope)
