"""One sparse-update mechanism for every method that trains chosen entries of pre-trained weights.

A selector (SIFT's first-batch gradient, SAM's accumulated squared gradient, a random or magnitude mask,
...) picks flat indices per target weight; each target `nn.Linear` then becomes a `SparseLinear` whose only
trainable tensor is `values`: the current weights at those indices. The optimizer therefore holds state for
k entries per tensor, never for dense tensors, and its weight decay acts on exactly those entries, as a
dense AdamW restricted to them would.

After every optimizer step `values` are written back into the dense weight (`sync`), so every forward sees
the latest update and the last update is applied (the published SIFT code merges step t only during step
t+1's backward). Two ways to get the gradient of `values`:

- `sampled` (default): a custom backward computes the weight gradient only at the selected entries, a
  sampled dense-dense product of the output gradients and the inputs at the selected rows and columns,
  so no dense weight gradient is ever formed;
- `dense`: autograd through a scatter of `values` into the weight; the dense gradient exists only inside
  that backward step. It is the reference the sampled path is tested against.

Selectors share the budget rules here: `select_top` keeps floor(rate * N) of the N target entries, either
over all target tensors together (`global`) or split over the tensors in proportion to their sizes
(`per_tensor`), so every method given the same `sparse_rate` trains exactly the same number of entries.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING, OmegaConf
from torch import nn

from sift_cli.errors import SiftError
from sift_cli.memory.model import INDEX_BYTES, Plan, Training
from sift_cli.methods.base import Method, ModelContext, Settings, freeze_all_but, make_optimizer

if TYPE_CHECKING:
    from sift_cli.context import RunContext

GRAD_MODES = ("sampled", "dense")
SCOPES = ("global", "per_tensor")


def csr_rows(index: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The CSR row pointers of sorted flat indices into an (out_features, in_features) weight."""
    counts = torch.bincount(index // in_features, minlength=out_features)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def sampled_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, crow: torch.Tensor,
                        cols: torch.Tensor) -> torch.Tensor:
    """The entries of grad_out^T @ inputs at the CSR pattern (crow, cols), in float32: one dot product over
    the tokens per entry (torch.sparse.sampled_addmm), never the dense (out x in) product."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), device=cols.device),
                                          size=(grad_out.shape[1], inputs.shape[1]), check_invariants=False)
        product = torch.sparse.sampled_addmm(pattern, grad_out.float().T, inputs.float(), beta=0.0)
    return product.values()


class _SampledLinear(torch.autograd.Function):
    """y = x W^T + b, whose backward gives the gradient of the selected entries of W only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, index, crow, layer):
        ctx.save_for_backward(x, weight, index, crow)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.layer = layer
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index, crow = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[3]:
            cols = index % x.shape[-1]  # derived here rather than held: 8 bytes an entry less for the run
            grad_values = sampled_weight_grad(flat_grad, x.reshape(-1, x.shape[-1]), crow, cols)
        if ctx.layer.capture_dense_grad:
            ctx.layer.add_dense_grad(flat_grad.float().T @ x.reshape(-1, x.shape[-1]).float())
        if ctx.bias_needs_grad:
            grad_bias = flat_grad.float().sum(0)
        return grad_x, None, grad_bias, grad_values, None, None, None


class SparseLinear(nn.Module):
    """A linear layer whose weight trains only at fixed flat indices; everything else stays frozen."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor, grad_mode: str = "sampled"):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise SiftError(f"method.grad_mode must be one of {', '.join(GRAD_MODES)}, got '{grad_mode}'")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.grad_mode = grad_mode
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        index = index.to(self.weight.device, torch.long).unique(sorted=True)
        self.register_buffer("index", index)
        self.register_buffer("crow", csr_rows(index, self.out_features, self.in_features), persistent=False)
        self.register_buffer("initial", self.weight.detach().reshape(-1)[index].clone())
        self.values = nn.Parameter(self.initial.clone())
        # The gradient-sparsity analysis asks for the full weight gradient, which training never forms:
        # when set, each backward adds it (float32, summed over micro-batches) to `dense_grad`.
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.values.requires_grad):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.grad_mode == "sampled":
            return _SampledLinear.apply(x, self.weight, self.bias, self.values, self.index, self.crow, self)
        weight = self.weight.detach().reshape(-1).index_put((self.index,), self.values).view_as(self.weight)
        if self.capture_dense_grad:
            weight.register_hook(lambda grad: self.add_dense_grad(grad.float()))
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def add_dense_grad(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad if self.dense_grad is None else self.dense_grad + grad

    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained values into the dense weight."""
        self.weight.view(-1)[self.index] = self.values.to(self.weight.dtype)

    def increment(self) -> torch.Tensor:
        return (self.values.detach() - self.initial).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, trainable={self.index.numel()}, grad={self.grad_mode}"


def find_targets(model: nn.Module, target_modules, exclude: set[str]) -> dict[str, nn.Linear]:
    """The linear layers a sparse method may train: `all_linear`, or modules whose name ends with a target."""
    wanted = "all_linear" if target_modules == "all_linear" else list(OmegaConf.to_container(target_modules)
                                                                      if OmegaConf.is_config(target_modules)
                                                                      else target_modules)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if wanted == "all_linear" or any(name == t or name.endswith("." + t) for t in wanted):
            found[name] = module
    if not found:
        raise SiftError(f"method.target_modules={target_modules} matches no linear layer of this model")
    return found


def budget_of(numel: int, rate: float) -> int:
    return max(1, math.floor(rate * numel))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores (ties broken the same way on every process)."""
    return torch.topk(scores.reshape(-1).float(), k, sorted=False).indices


def total_budget(sizes: dict[str, int], rate: float) -> int:
    """floor(rate * N) entries of the N target entries: the one budget every sparse baseline spends."""
    if not 0 < rate <= 1:
        raise SiftError(f"method.sparse_rate must be in (0, 1], got {rate}")
    budget = math.floor(rate * sum(sizes.values()))
    if budget < 1:
        raise SiftError(f"method.sparse_rate={rate} selects no entry of the {sum(sizes.values())} target entries")
    return budget


def split_budget(sizes: dict[str, int], rate: float) -> dict[str, int]:
    """The total budget split over tensors in proportion to their sizes (largest remainders get the
    leftover entries), so a per-tensor rule spends exactly what a global one does."""
    total, grand = total_budget(sizes, rate), sum(sizes.values())
    shares = {name: divmod(total * numel, grand) for name, numel in sizes.items()}
    leftover = total - sum(whole for whole, _ in shares.values())
    by_remainder = sorted(sizes, key=lambda name: (-shares[name][1], name))
    return {name: shares[name][0] + (name in by_remainder[:leftover]) for name in sizes}


def global_top_indices(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices, per tensor, of the k largest scores over all tensors together.

    Empties `scores` while it copies them into one vector, so the peak memory is one copy of the scores.
    """
    sizes = {name: score.numel() for name, score in scores.items()}
    first = next(iter(scores.values()))
    flat = torch.empty(sum(sizes.values()), dtype=torch.float32, device=first.device)
    offset = 0
    for name in sizes:
        flat[offset:offset + sizes[name]] = scores.pop(name).reshape(-1)
        offset += sizes[name]
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    del flat
    out, offset = {}, 0
    for name, numel in sizes.items():
        low, high = torch.searchsorted(chosen, torch.tensor([offset, offset + numel], device=chosen.device))
        out[name] = chosen[low:high] - offset
        offset += numel
    return out


def select_top(scores: dict[str, torch.Tensor], rate: float, scope: str) -> dict[str, torch.Tensor]:
    """The highest-scoring floor(rate * N) entries, over all tensors (`global`) or per tensor (`per_tensor`)."""
    if scope not in SCOPES:
        raise SiftError(f"method.scope must be one of {', '.join(SCOPES)}, got '{scope}'")
    sizes = {name: score.numel() for name, score in scores.items()}
    if scope == "global":
        return global_top_indices(scores, total_budget(sizes, rate))
    budgets = split_budget(sizes, rate)
    return {name: top_indices(score, budgets[name]) for name, score in scores.items()}


def _all_reduce_mean(tensor: torch.Tensor, run: "RunContext") -> torch.Tensor:
    if run.accelerator.num_processes > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= run.accelerator.num_processes
    return tensor


def gradient_statistic(run: "RunContext", targets: dict[str, nn.Linear], batches: int, statistic,
                       micro_batches: int = 1) -> dict:
    """Sum over `batches` training batches of `statistic(grad)` for each target weight, with no update.

    With `micro_batches` > 1, the gradients of that many consecutive batches (one optimizer step under
    gradient accumulation) are averaged before `statistic` sees them. Each step's weight gradient is
    averaged over processes first (so every process selects the same entries) and freed as soon as it is
    folded into the sum; nothing else accumulates gradients.
    """
    model = run.unwrapped_model
    states = {name: p.requires_grad for name, p in model.named_parameters()}
    totals = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in targets.items()}
    pending: dict[str, torch.Tensor] = {}
    position = [0]  # the batch being back-propagated
    handles = []

    def fold(name):
        def hook(param):
            grad = param.grad.float()
            param.grad = None
            if micro_batches > 1:
                grad = pending.pop(name, 0) + grad
                if position[0] % micro_batches != micro_batches - 1:
                    pending[name] = grad
                    return
                grad = grad / micro_batches
            totals[name] += statistic(_all_reduce_mean(grad, run))
        return hook

    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, module in targets.items():
            module.weight.requires_grad_(True)
            handles.append(module.weight.register_post_accumulate_grad_hook(fold(name)))
        was_training = model.training
        model.train()
        for step, batch in enumerate(run.first_batches(batches)):
            position[0] = step
            with run.accelerator.autocast():
                loss = model(**batch).loss
            loss.backward()
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(states[name])
            param.grad = None
    return totals


def train_briefly(run: "RunContext", param_groups: list[dict], steps: int, loss_of) -> None:
    """`steps` steps of `trainer.optimizer` (no weight decay) on `param_groups` over the first training
    batches, for selectors that look at a short training run (a warm-up, an L0 phase) before choosing entries.

    Gradients are averaged over `trainer.grad_accum` micro-batches and over processes, and clipped like
    the main loop's, so every process takes the same steps and ends with the same weights.
    """
    model = run.unwrapped_model
    accum = int(run.tcfg.grad_accum)
    max_norm = run.tcfg.max_grad_norm
    params = [p for group in param_groups for p in group["params"]]
    optimizer = make_optimizer(param_groups, run.tcfg, weight_decay=0.0)
    was_training = model.training
    model.train()
    for position, batch in enumerate(run.first_batches(steps * accum)):
        with run.accelerator.autocast():
            loss = loss_of(batch) / accum
        loss.backward()
        if position % accum == accum - 1:
            for param in params:
                if param.grad is not None:
                    _all_reduce_mean(param.grad, run)
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, float(max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.train(was_training)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def is_target_list(value) -> bool:
    return value == "all_linear" or (isinstance(value, list) and bool(value)
                                     and all(isinstance(t, str) and t for t in value))


@dataclass
class SparseSettings(Settings):
    sparse_rate: float = MISSING  # share of the target entries that train
    target_modules: Any = MISSING  # all_linear, or suffixes of linear-layer names
    grad_mode: str = MISSING  # sampled | dense

    def check(self, run) -> None:
        super().check(run)
        self.need(0 < self.sparse_rate <= 1, "sparse_rate", "in (0, 1]")
        self.need(is_target_list(self.target_modules), "target_modules",
                  "all_linear or a non-empty list of module-name suffixes")
        self.need(self.grad_mode in GRAD_MODES, "grad_mode", f"one of {', '.join(GRAD_MODES)}")


class SparseMethod(Method):
    """Trains a fixed set of entries of the target weights (chosen by `choose`) plus the new task head."""

    Settings = SparseSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        # Empty until `prepare` and `select`, so a run that fails before them can still be summarised.
        self.targets: dict[str, nn.Linear] = {}
        self.layers: dict[str, SparseLinear] = {}

    def check_model(self, model: nn.Module) -> None:
        find_targets(model, self.cfg.target_modules, exclude=set())

    def prepare(self, model: nn.Module, ctx: ModelContext) -> nn.Module:
        self.ctx = ctx
        freeze_all_but(model, lambda name: name in ctx.new_params)
        exclude = set(ctx.head_modules)
        self.targets = find_targets(model, self.cfg.target_modules, exclude)
        return model

    def choose(self, run: "RunContext", targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """Flat indices to train, per target layer name."""
        raise NotImplementedError

    def select(self, run: "RunContext") -> None:
        """Wrap each target with the chosen entries; a target a global rule gave nothing stays frozen."""
        model = run.unwrapped_model
        chosen = self.choose(run, self.targets)
        for name, index in chosen.items():
            if index.numel() == 0:
                continue
            layer = SparseLinear(self.targets[name], index, self.cfg.grad_mode)
            replace_module(model, name, layer)
            self.layers[name] = layer

    def count_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def after_optimizer_step(self, run: "RunContext") -> None:
        for layer in self.layers.values():
            layer.sync()

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        for layer in self.layers.values():
            layer.sync()

    def export(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Indices and increments of the sparse layers, and the dense head: megabytes, not a model."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.sparse_index"] = layer.index.cpu()
            out[f"{name}.sparse_delta"] = layer.increment().cpu()
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith(".values"):
                out[name] = param.detach().cpu().clone()
        return out

    def budget(self, sizes: list[int]) -> int:
        """Entries trained over target tensors of these sizes: floor(rate * N) (SIFT: per tensor)."""
        return math.floor(float(self.cfg.sparse_rate) * sum(sizes))

    def memory_plan(self, parts):
        """The selected entries of the target weights and the head.

        `sift-run` layout (SparseLinear): per entry a `values` parameter and an `initial` copy in the weight
        dtype and an int64 index; per target row a CSR row pointer. `paper` layout: entries of every
        parameter updated in place in the weights, so an entry costs only its gradient and AdamW state
        (indices left uncounted).
        """
        w = parts.weight_bytes
        if parts.setting.sparse_layout == "paper":
            modes = {lin.name: "sparse" for lin in parts.blocks + parts.top}
            return Plan(Training({**modes, **parts.head_modes}),
                        [(math.floor(float(self.cfg.sparse_rate) * parts.everything), w)])
        chosen, chosen_top = parts.matching(self.cfg.target_modules)
        sizes = [lin.fan_in * lin.fan_out for lin in chosen] * parts.arch.layers
        sizes += [lin.fan_in * lin.fan_out for lin in chosen_top]
        if not sizes:
            raise SiftError(f"method={self.name}: target_modules={self.cfg.target_modules} matches no linear layer "
                            "of this architecture")
        entries = self.budget(sizes)
        modes = {**{lin.name: "sparse" for lin in chosen + chosen_top}, **parts.head_modes}
        rows = sum(lin.fan_out + 1 for lin in chosen) * parts.arch.layers + sum(lin.fan_out + 1 for lin in chosen_top)
        return Plan(Training(modes, norms="frozen", embeddings=False), [(entries, w), (parts.head_params, w)],
                    added=[(entries, w)], buffers=entries * (INDEX_BYTES + w) + rows * INDEX_BYTES)

    def summary(self) -> dict:
        selected = sum(layer.index.numel() for layer in self.layers.values())
        total = sum(target.weight.numel() for target in self.targets.values())
        return {"selected_entries": selected, "target_entries": total,
                "selected_share": selected / total if total else 0.0, "target_layers": len(self.layers),
                "grad_mode": self.cfg.grad_mode}


@torch.no_grad()
def apply_export(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a fine-tuned model from the pre-trained one and an exported increment (`SparseMethod.export`)."""
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.endswith(".sparse_index"):
            name = key[: -len(".sparse_index")]
            weight = params[f"{name}.weight"]
            delta = tensors[f"{name}.sparse_delta"].to(weight.device, weight.dtype)
            weight.view(-1).index_add_(0, value.to(weight.device), delta)
        elif not key.endswith(".sparse_delta"):
            if key not in params:
                raise SiftError(f"the export holds '{key}', which this model does not have")
            params[key].copy_(value)
    return model
