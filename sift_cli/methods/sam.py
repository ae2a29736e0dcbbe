"""SAM, the Second-order Approximation Method (Fu et al., "On the Effectiveness of Parameter-Efficient
Fine-Tuning", AAAI 2023; code: github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, `bsearch` in
src/runner.py, run as `bsearch=0.005,burnin=600` by scripts/train.sh).

Under a constant diagonal Hessian, the mask that best lowers the second-order expansion of the loss keeps
the entries with the largest squared gradient. As in the published code, the gradients of a burn-in of
`burnin_steps` optimizer steps are summed with no update, and an entry's score is the square of that sum
(the code ranks |sum of g|; summing g^2 instead is the `fisher` baseline). Then only the chosen entries
train, from the pre-trained weights.

`scope`: `global` keeps the top floor(p * N) entries over all target tensors together (the paper's rule);
`per_tensor` keeps the top share p of each tensor (the published code's rule; here the same total,
split in proportion to the tensor sizes). Differences from the code: its burn-in gradients are clipped
to norm 1 over the whole model at every step, and it considers every encoder tensor (embeddings,
biases, LayerNorm); here the targets are linear weights (`target_modules`) and the statistic is the
unclipped gradient of the same first batches that training then starts with.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count
from sift_cli.methods.sparse import SCOPES, SparseMethod, SparseSettings, gradient_statistic, select_top


@dataclass
class BurnInSettings(SparseSettings):
    burnin_steps: int = MISSING  # optimizer steps whose gradients are summed, with no update

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.burnin_steps), "burnin_steps", "a positive integer")


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

    def choose(self, run, targets):
        accum = int(run.tcfg.grad_accum)
        summed = gradient_statistic(run, targets, int(self.cfg.burnin_steps) * accum, lambda g: g)
        scores = {name: total.square_() for name, total in summed.items()}
        return select_top(scores, float(self.cfg.sparse_rate), self.cfg.scope)
