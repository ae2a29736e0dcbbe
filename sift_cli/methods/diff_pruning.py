"""Diff pruning (Guo, Rush and Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", ACL 2021;
code: github.com/dguo98/DiffPruning), with the hard-concrete L0 relaxation of Louizos, Welling and
Kingma ("Learning Sparse Neural Networks through L0 Regularization", ICLR 2018).

Three phases, as in Guo et al.'s pipeline (run_glue_diffpruning.py, run_glue_mag.py,
run_glue_fixmask_finetune.py):

1. L0 phase (`l0_steps` optimizer steps, inside selection): every target tensor becomes W0 + z * w, with a
   dense diff w (from 0) and a gate z ~ HardConcrete(log_alpha) per entry:
   s = sigmoid((log u - log(1 - u) + log_alpha) / temperature), z = clamp(s * (upper - lower) + lower, 0, 1).
   The loss is the task loss plus `sparsity_penalty` times the expected number of open gates,
   sum sigmoid(log_alpha - temperature * log(-lower / upper)). w (and the task head) train at `diff_lr`,
   log_alpha at `alpha_lr` (the code's separate optimizer at 0.1), with constant rates and no decay.
2. Final top-k: the learned diff delta = z_hat * w, with the deterministic gate
   z_hat = clamp(sigmoid(log_alpha) * (upper - lower) + lower, 0, 1), keeps its floor(p * N) largest |delta|
   over all target tensors together (the code's magnitude pruning by a global threshold; it uses one
   sampled z instead of z_hat), the same budget as SAM.
3. Fine-tuning with the mask fixed, on the sparse mechanism, starting from W0 + delta at the kept entries
   (and from the head of phase 1); the exported increment is relative to W0, so it includes delta.

Phase 1 holds a dense diff, gate and their AdamW states for every target tensor (six copies in float32).

This is not the variant behind the DiffPruning row of SAM's table (`diffprun` in src/runner.py of
github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune), which differs from Guo et al.'s, and so from this
method, in that: it gates every parameter, the task head's too, so after its burn-in the head also trains
at the kept share p only; the gate logits start at sigmoid(N(0, 1)), in (0, 1), not at a constant; the
stretch is (-3, 3) and the penalty the mean, not the sum, of the open-gate probabilities, weighted 1; the
burn-in (500 steps: 499 updates) trains w and the logits at the run's learning rate under its schedule
(with the published schedule, nearly zero), with weight decay 0.01 on w; it keeps the top floor(p * n)
entries of each tensor by |log_alpha|, not by |delta|; and the kept entries go on from W0 + w (the gate
dropped) with the same optimizer. Any of these can change the numbers; the SAM table's row is not what
this method reproduces.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn
from torch.nn.utils import parametrize

from sift_cli.methods import register_method
from sift_cli.methods.base import is_count, make_optimizer
from sift_cli.methods.sparse import SparseMethod, SparseSettings, select_top, train_briefly


class HardConcreteDiff(nn.Module):
    """A parametrization for the L0 phase: a frozen tensor W0 becomes W0 + z * w."""

    def __init__(self, tensor: torch.Tensor, alpha_init: float, lower: float, upper: float, temperature: float):
        super().__init__()
        self.lower, self.upper, self.temperature = lower, upper, temperature
        self.diff = nn.Parameter(torch.zeros_like(tensor, dtype=torch.float32))
        self.log_alpha = nn.Parameter(torch.full_like(tensor, alpha_init, dtype=torch.float32))

    def gate(self) -> torch.Tensor:
        """A sampled gate in training; Louizos et al.'s deterministic test-time gate z_hat otherwise."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.upper - self.lower) + self.lower).clamp(0, 1)

    def expected_open_gates(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.lower / self.upper)).sum()

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original + (self.gate() * self.diff).to(original.dtype)


@dataclass
class DiffPruningSettings(SparseSettings):
    l0_steps: int = MISSING
    diff_lr: float = MISSING
    alpha_lr: float = MISSING
    alpha_init: float = MISSING
    concrete_lower: float = MISSING
    concrete_upper: float = MISSING
    temperature: float = MISSING
    sparsity_penalty: float = MISSING

    def check(self, run) -> None:
        super().check(run)
        self.need(is_count(self.l0_steps, 0), "l0_steps", "a non-negative integer")
        for key in ("diff_lr", "alpha_lr", "temperature"):
            self.need(getattr(self, key) > 0, key, "> 0")
        self.need(self.sparsity_penalty >= 0, "sparsity_penalty", ">= 0")
        if not self.concrete_lower < 0 < self.concrete_upper:
            self.refuse(f"{self.where}.concrete_lower must be < 0 < {self.where}.concrete_upper, got "
                        f"{self.concrete_lower} and {self.concrete_upper}")


@register_method
class DiffPruning(SparseMethod):
    name = "diff_pruning"
    Settings = DiffPruningSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.open_gates: int | None = None  # entries whose gate is still open after the L0 phase

    def choose(self, run, targets):
        cfg = self.cfg
        model = run.unwrapped_model
        gated = {name: HardConcreteDiff(tensor, float(cfg.alpha_init), float(cfg.concrete_lower),
                                        float(cfg.concrete_upper), float(cfg.temperature))
                 for name, tensor in targets.items()}
        head = [p for name, p in model.named_parameters() if name in self.ctx.new_params]
        penalty = float(cfg.sparsity_penalty)

        def loss_of(batch):
            return model(**batch).loss + penalty * sum(gate.expected_open_gates() for gate in gated.values())

        for name, gate in gated.items():
            module_name, _, attr = name.rpartition(".")
            parametrize.register_parametrization(model.get_submodule(module_name), attr, gate, unsafe=True)
        try:
            optimizer = make_optimizer([
                {"params": [g.diff for g in gated.values()] + head, "lr": float(cfg.diff_lr)},
                {"params": [g.log_alpha for g in gated.values()], "lr": float(cfg.alpha_lr)}],
                run.tcfg, weight_decay=0.0)
            train_briefly(run, optimizer, int(cfg.l0_steps), loss_of)
        finally:
            for name in gated:
                module_name, _, attr = name.rpartition(".")
                parametrize.remove_parametrizations(model.get_submodule(module_name), attr, leave_parametrized=False)
        with torch.no_grad():  # z_hat, not a sampled z: the same on every process
            gates = {name: gate.eval().gate() for name, gate in gated.items()}
            self.open_gates = int(sum(torch.count_nonzero(gate) for gate in gates.values()))
            diffs = {name: gates.pop(name) * gate.diff for name, gate in gated.items()}
        gated.clear()  # frees the L0 phase's diffs and gate logits
        chosen = select_top({name: diff.abs() for name, diff in diffs.items()}, float(cfg.sparse_rate), "global")
        # Sorted, as the sparse layers keep their index, so the start values line up with it.
        chosen = {name: index.sort().values for name, index in chosen.items()}
        self.start_values = {name: diffs[name].view(-1)[index] for name, index in chosen.items()}
        return chosen

    def select(self, run) -> None:
        """The fine-tuning phase starts from W0 + delta at the kept entries, its increment measured from W0."""
        super().select(run)
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.values += self.start_values[name].to(layer.values.dtype)
                layer.sync()
        del self.start_values

    def summary(self) -> dict:
        return {**super().summary(), "l0_steps": int(self.cfg.l0_steps),
                "open_gates_after_l0": self.open_gates}
