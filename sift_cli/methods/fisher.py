"""Fisher-information masks (ChildPruning in the SAM paper's table: ChildTuning-D, Xu et al., "Raise a
Child in Large Language Model", EMNLP 2021): an entry's importance is its empirical Fisher information,
the sum of its squared gradients over the first `burnin_steps` optimizer steps (no update); the top
floor(p * n) entries of each target tensor of n entries train. It is the published SAM code's
`bsearch,fisher` variant (github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, src/runner.py): SAM's
per-tensor rule with sum(g^2) in place of |sum g|, the burn-in gradients clipped as SAM's are
(`clip_burnin`). ChildTuning-D itself sums over the whole training set; set `burnin_steps` to an epoch to
match it.
"""

from sift_cli.methods import register_method
from sift_cli.methods.sam import BurnInSettings, burnin_gradients
from sift_cli.methods.sparse import SparseMethod, select_top


@register_method
class Fisher(SparseMethod):
    name = "fisher"
    Settings = BurnInSettings
    scope = "per_tensor"

    def choose(self, run, targets):
        scores = burnin_gradients(run, self.cfg, targets, lambda g: g.square())
        return select_top(scores, float(self.cfg.sparse_rate), self.scope)
