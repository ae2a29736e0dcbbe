"""Random masks (the "Random" sparse baseline of Fu et al., AAAI 2023, Table 1; the published code's
`randmask`): fixed entries of each target weight drawn uniformly at random, with the same budget as SAM
(floor(p * N) entries split over the tensors in proportion to their sizes). The draw uses its own
generator seeded with the run's seed, so every process picks the same entries and the rest of the run's
randomness is untouched.
"""

import torch

from sift_cli.methods import register_method
from sift_cli.methods.sparse import SparseMethod, split_budget


@register_method
class RandomMask(SparseMethod):
    name = "random_mask"

    def choose(self, run, targets):
        generator = torch.Generator().manual_seed(int(run.cfg.seed))
        budgets = split_budget({name: m.weight.numel() for name, m in targets.items()}, float(self.cfg.sparse_rate))
        return {name: torch.randperm(m.weight.numel(), generator=generator)[: budgets[name]].to(m.weight.device)
                for name, m in targets.items()}
