"""SIFT, Sparse Increment Fine-Tuning ("Sparse is Enough in Fine-tuning Pre-trained Large Language Models",
Song et al., ICML 2024): gradients of fine-tuning are quasi-sparse, so train only the top
`sparse_rate * numel` entries of each target weight by |gradient| on the first training batch(es).
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
