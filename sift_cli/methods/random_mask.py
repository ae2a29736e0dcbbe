"""Random masks (the "Random" sparse baseline of Fu et al., AAAI 2023, Table 1), as the published code draws
them (`randmask` in src/runner.py of github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune): every entry
of every target tensor is kept independently with probability `sparse_rate` (a Bernoulli draw), so a
tensor keeps about p * n entries and the whole about p * N, not exactly floor(p * N) as SAM does; the
memory plan counts the expected floor(p * N). The draw uses its own generator seeded with the run's seed,
one uniform number per entry in the order of the model's parameters, so every process picks the same
entries and the rest of the run's randomness is untouched.
"""

import torch

from sift_cli.methods import register_method
from sift_cli.methods.sparse import SparseMethod


@register_method
class RandomMask(SparseMethod):
    name = "random_mask"

    def choose(self, run, targets):
        generator = torch.Generator().manual_seed(int(run.cfg.seed))
        rate = float(self.cfg.sparse_rate)
        return {name: torch.nonzero(torch.rand(tensor.numel(), generator=generator) < rate).reshape(-1)
                .to(tensor.device) for name, tensor in targets.items()}
