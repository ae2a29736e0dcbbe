"""SIFT, Sparse Increment Fine-Tuning ("Sparse is Enough in Fine-tuning Pre-trained Large Language Models",
Song et al., ICML 2024; code: github.com/song-wx/SIFT, sift/sift.py): gradients of fine-tuning are
quasi-sparse, so train only the top `sparse_rate * numel` entries of each target weight by |gradient| on
the first training batch(es).

Weight decay (`decay`, default `none`): the selected entries are not decayed. In the official code the
optimizer's parameter is the sparse increment itself, which its gradient hook adds into the weight and
then sets to zero during the next backward, so at every optimizer step AdamW's decoupled decay multiplies
a zero tensor: whatever `--weight_decay` says (0.1 for GLUE, 0.01 for Alpaca), the selected weights are
never pulled anywhere. `none` is that behaviour. `weights` decays the selected weights themselves, as a
dense AdamW restricted to them would: toward zero, by up to 55% over sift_glue's QQP schedule at 0.1.
`increment` decays the increment (weights minus pre-trained values) instead, which here carries over from
step to step: a pull toward the pre-trained model that the official code does not have. The other sparse
methods share the mechanism and the setting; SAM and its baselines default to `weights`, since their
published code (jiant's AdamW over whole weights with masked gradients) decays the weights.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count
from sift_cli.methods.sparse import SparseMethod, SparseSettings, budget_of, gradient_statistic, top_indices


@dataclass
class SIFTSettings(SparseSettings):
    select_batches: int = MISSING  # batches whose summed gradient picks the entries

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.select_batches), "select_batches", "a positive integer")


@register_method
class SIFT(SparseMethod):
    name = "sift"
    Settings = SIFTSettings

    def budget(self, sizes):
        return sum(budget_of(size, float(self.cfg.sparse_rate)) for size in sizes)

    def choose(self, run, targets):
        gradients = gradient_statistic(run, targets, int(self.cfg.select_batches), lambda g: g)
        rate = float(self.cfg.sparse_rate)
        return {name: top_indices(grad.abs(), budget_of(grad.numel(), rate)) for name, grad in gradients.items()}
