"""Fisher-information masks (ChildPruning in the SAM paper's table: ChildTuning-D, Xu et al., "Raise a
Child in Large Language Model", EMNLP 2021): an entry's importance is its empirical Fisher information,
the sum of its squared gradients over the first `burnin_steps` optimizer steps (no update); the top
entries of each target tensor train. It is the published SAM code's `bsearch,fisher` variant
(github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, src/runner.py): SAM with sum(g^2) in place of
(sum g)^2, per tensor, with the same budget as SAM (floor(p * N) entries split in proportion to sizes).
ChildTuning-D itself sums over the whole training set; set `burnin_steps` to an epoch to match it.
"""

from sift_cli.methods import register_method
from sift_cli.methods.sam import BurnInSettings
from sift_cli.methods.sparse import SparseMethod, gradient_statistic, select_top


@register_method
class Fisher(SparseMethod):
    name = "fisher"
    Settings = BurnInSettings

    def choose(self, run, targets):
        accum = int(run.tcfg.grad_accum)
        scores = gradient_statistic(run, targets, int(self.cfg.burnin_steps) * accum, lambda g: g.square(),
                                    micro_batches=accum)
        return select_top(scores, float(self.cfg.sparse_rate), "per_tensor")
