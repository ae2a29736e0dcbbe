"""One sparse-update mechanism for every method that trains chosen entries of pre-trained tensors.

A selector (SIFT's first-batch gradient, SAM's summed burn-in gradient, a random or magnitude mask, ...)
picks flat indices per target tensor (`target_modules`: the weights of named linear layers, `all_linear`,
or `all_params`: every pre-trained tensor, biases, LayerNorm and embeddings included, as SAM's published
code considers). Each target then trains only at those indices, through a trainable `values` parameter
holding the tensor's entries there: the optimizer holds state for k entries per tensor, never for dense
tensors.

- A linear layer's weight becomes a `SparseLinear`. After every optimizer step `values` are written back
  into the dense weight (`sync`), so every forward sees the latest update and the last update is applied
  (the published SIFT code merges step t only during step t+1's backward). Two ways to get the gradient of
  `values`: `sampled` (default), a custom backward that computes the weight gradient only at the selected
  entries (a sampled dense-dense product of the output gradients and the inputs at the selected rows and
  columns), so no dense weight gradient is ever formed; `dense`, autograd through a scatter of `values`
  into the weight (the dense gradient exists only inside that backward step), the reference the sampled
  path is tested against.
- Any other tensor (a bias, a LayerNorm weight, an embedding table) gets a `SparseEntries`
  parametrization (torch.nn.utils.parametrize): the module sees the pre-trained tensor with its selected
  entries replaced by `values`, a dense copy that, like its gradient, lives only within a step.

Weight decay of the selected entries (`decay`): `weights` decays them toward zero, as a dense AdamW whose
gradient is masked to them (SAM's published code, on jiant); `increment` decays their increment, toward
the pre-trained value; `none` leaves them undecayed (the official SIFT update, whose decay acts on an
increment that is zero at every step). Biases and LayerNorm entries are never decayed (NO_DECAY).

Budgets (`select_top`): `global` keeps the top floor(rate * N) of the N target entries together;
`per_tensor` keeps the top floor(rate * n) of each tensor of n entries, as the published SAM code does
(a tensor with rate * n < 1 stays frozen).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING, OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from sift_cli.errors import SiftError
from sift_cli.memory.model import INDEX_BYTES, Plan, Training
from sift_cli.methods.base import NO_DECAY, Method, ModelContext, Settings, freeze_all_but

if TYPE_CHECKING:
    from sift_cli.context import RunContext

GRAD_MODES = ("sampled", "dense")
SCOPES = ("global", "per_tensor")
DECAYS = ("weights", "increment", "none")
ALL_PARAMS = "all_params"


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


class SparseEntries(nn.Module):
    """A parametrization that trains a tensor only at fixed flat indices: the module sees the frozen tensor
    with those entries replaced by `values`."""

    def __init__(self, tensor: torch.Tensor, index: torch.Tensor):
        super().__init__()
        index = index.to(tensor.device, torch.long).unique(sorted=True)
        self.register_buffer("index", index)
        self.register_buffer("initial", tensor.detach().reshape(-1)[index].clone())
        self.values = nn.Parameter(self.initial.clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        flat = original.detach().reshape(-1).index_put((self.index,), self.values.to(original.dtype))
        return flat.view_as(original)

    def sync(self) -> None:
        """Nothing to write back: every access rebuilds the tensor from `values`."""

    def increment(self) -> torch.Tensor:
        return (self.values.detach() - self.initial).to(self.initial.dtype)

    def extra_repr(self) -> str:
        return f"trainable={self.index.numel()}"


def find_targets(model: nn.Module, target_modules, exclude: set[str]) -> dict[str, nn.Linear]:
    """The linear layers a sparse method may train: `all_linear`, or modules whose name ends with a target."""
    wanted = "all_linear" if target_modules == "all_linear" else list(OmegaConf.to_container(target_modules)
                                                                      if OmegaConf.is_config(target_modules)
                                                                      else target_modules)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _excluded(name, exclude):
            continue
        if wanted == "all_linear" or any(name == t or name.endswith("." + t) for t in wanted):
            found[name] = module
    if not found:
        raise SiftError(f"method.target_modules={target_modules} matches no linear layer of this model")
    return found


def _excluded(name: str, exclude: set[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def find_tensors(model: nn.Module, target_modules, exclude: set[str]) -> dict[str, nn.Parameter]:
    """The tensors a sparse method may train, by parameter name: the weights of the linear layers that
    `target_modules` names (`find_targets`), or with `all_params` every parameter outside `exclude`."""
    if target_modules != ALL_PARAMS:
        linears = find_targets(model, target_modules, exclude)
        return {f"{name}.weight": linear.weight for name, linear in linears.items()}
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found = {}
    for name, param in model.named_parameters():
        if _excluded(name, exclude):
            continue
        if owners[id(param)] > 1:
            raise SiftError(f"method.target_modules={ALL_PARAMS}: {name} is tied to another layer's weight, which "
                            "the sparse mechanism cannot train; name linear layers instead")
        found[name] = param
    if not found:
        raise SiftError(f"method.target_modules={ALL_PARAMS} leaves no parameter of this model outside the head")
    return found


def is_linear_weight(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr == "weight" and isinstance(model.get_submodule(module_name), nn.Linear)


def budget_of(numel: int, rate: float) -> int:
    return max(1, math.floor(rate * numel))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores (ties broken the same way on every process)."""
    return torch.topk(scores.reshape(-1).float(), k, sorted=False).indices


def rule_budget(sizes: list[int], rate: float, scope: str) -> int:
    """Entries a rule keeps over target tensors of these sizes: floor(rate * N) of all N together (`global`),
    or the sum over tensors of floor(rate * n) (`per_tensor`)."""
    if scope == "global":
        return math.floor(rate * sum(sizes))
    return sum(math.floor(rate * numel) for numel in sizes)


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
    """The highest scores: the top floor(rate * N) over all tensors (`global`), or the top floor(rate * n)
    of each tensor (`per_tensor`)."""
    if scope not in SCOPES:
        raise SiftError(f"method.scope must be one of {', '.join(SCOPES)}, got '{scope}'")
    if not 0 < rate <= 1:
        raise SiftError(f"method.sparse_rate must be in (0, 1], got {rate}")
    sizes = [score.numel() for score in scores.values()]
    total = rule_budget(sizes, rate, scope)
    if total < 1:
        raise SiftError(f"method.sparse_rate={rate} selects no entry of the {sum(sizes)} target entries "
                        f"(scope {scope})")
    if scope == "global":
        return global_top_indices(scores, total)
    return {name: top_indices(score, math.floor(rate * score.numel())) for name, score in scores.items()}


def _all_reduce_mean(tensor: torch.Tensor, run: "RunContext") -> torch.Tensor:
    if run.accelerator.num_processes > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= run.accelerator.num_processes
    return tensor


def gradient_statistic(run: "RunContext", targets: dict[str, torch.Tensor], batches: int, statistic,
                       micro_batches: int = 1, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Sum over `batches` training batches of `statistic(grad)` for each target tensor, with no update.

    With `micro_batches` > 1, the gradients of that many consecutive batches (one optimizer step under
    gradient accumulation) are averaged before `statistic` sees them; each step's gradient is averaged
    over processes too (so every process selects the same entries). Without `clip`, each target's gradient
    is freed as soon as it is folded into the sum and nothing else accumulates gradients. With `clip`, each
    step's gradient of the whole model is first clipped to total norm `clip`, as the published SAM code
    clips every burn-in step (so every parameter's gradient is formed, as in full fine-tuning).
    """
    model = run.unwrapped_model
    states = {name: p.requires_grad for name, p in model.named_parameters()}
    totals = {name: torch.zeros_like(tensor, dtype=torch.float32) for name, tensor in targets.items()}
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

    def fold_clipped():
        grads = {id(p): _all_reduce_mean(p.grad.float() / micro_batches, run)
                 for p in model.parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        norm = torch.nn.utils.get_total_norm(list(grads.values()))
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for name, tensor in targets.items():
            totals[name] += statistic(grads.pop(id(tensor)) * scale)

    try:
        for param in model.parameters():
            param.requires_grad_(clip is not None)
        for name, tensor in targets.items():
            tensor.requires_grad_(True)
            if clip is None:
                handles.append(tensor.register_post_accumulate_grad_hook(fold(name)))
        was_training = model.training
        model.train()
        for step, batch in enumerate(run.first_batches(batches)):
            position[0] = step
            with run.accelerator.autocast():
                loss = model(**batch).loss
            loss.backward()
            if clip is not None and step % micro_batches == micro_batches - 1:
                fold_clipped()
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(states[name])
            param.grad = None
    return totals


def train_briefly(run: "RunContext", optimizer: torch.optim.Optimizer, steps: int, loss_of, scheduler=None) -> None:
    """`steps` steps of `optimizer` (and `scheduler`) over the first training batches, for selectors that
    look at a short training run (a warm-up, an L0 phase) before choosing entries.

    Gradients are averaged over `trainer.grad_accum` micro-batches and over processes, and clipped like
    the main loop's, so every process takes the same steps and ends with the same weights.
    """
    model = run.unwrapped_model
    accum = int(run.tcfg.grad_accum)
    max_norm = run.tcfg.max_grad_norm
    params = [p for group in optimizer.param_groups for p in group["params"]]
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
            if scheduler is not None:
                scheduler.step()
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
    target_modules: Any = MISSING  # all_params, all_linear, or suffixes of linear-layer names
    grad_mode: str = MISSING  # sampled | dense
    decay: str = MISSING  # what trainer.weight_decay pulls the selected entries toward: weights | increment | none

    def check(self, run) -> None:
        super().check(run)
        self.need(0 < self.sparse_rate <= 1, "sparse_rate", "in (0, 1]")
        self.need(self.target_modules == ALL_PARAMS or is_target_list(self.target_modules), "target_modules",
                  f"all_linear or a non-empty list of module-name suffixes, or {ALL_PARAMS}")
        self.need(self.grad_mode in GRAD_MODES, "grad_mode", f"one of {', '.join(GRAD_MODES)}")
        self.need(self.decay in DECAYS, "decay", f"one of {', '.join(DECAYS)}")


class SparseMethod(Method):
    """Trains a fixed set of entries of the target tensors (chosen by `choose`) plus the new task head."""

    Settings = SparseSettings
    scope = "global"  # the budget rule of `choose` (`select_top`), for the memory plan

    def __init__(self, cfg):
        super().__init__(cfg)
        # Empty until `prepare` and `select`, so a run that fails before them can still be summarised.
        self.targets: dict[str, nn.Parameter] = {}  # by parameter name
        self.layers: dict[str, SparseLinear | SparseEntries] = {}  # by the name of the tensor they train

    def check_model(self, model: nn.Module) -> None:
        find_tensors(model, self.cfg.target_modules, exclude=set())

    def prepare(self, model: nn.Module, ctx: ModelContext) -> nn.Module:
        self.ctx = ctx
        freeze_all_but(model, lambda name: name in ctx.new_params)
        self.targets = find_tensors(model, self.cfg.target_modules, set(ctx.head_modules))
        return model

    def choose(self, run: "RunContext", targets: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Flat indices to train, per target tensor name."""
        raise NotImplementedError

    def select(self, run: "RunContext") -> None:
        """Make each target train at its chosen entries: a linear weight through a SparseLinear (first, since
        it takes its layer's bias as it is), any other tensor through a SparseEntries parametrization. A
        target given no entry stays frozen."""
        model = run.unwrapped_model
        chosen = {name: index for name, index in self.choose(run, self.targets).items() if index.numel()}
        for name in sorted(chosen, key=lambda name: not is_linear_weight(model, name)):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(module, nn.Linear) and attr == "weight":
                self.layers[name] = SparseLinear(module, chosen[name], self.cfg.grad_mode)
                replace_module(model, module_name, self.layers[name])
            else:
                self.layers[name] = SparseEntries(getattr(module, attr), chosen[name])
                parametrize.register_parametrization(module, attr, self.layers[name])

    def count_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ---- weight decay of the selected entries ------------------------------------------------------
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """The head as every method groups it; the selected entries by `decay` (never those of a bias or a
        LayerNorm). `increment` decays toward the pre-trained values in `create_optimizer`'s step hook."""
        values = {id(layer.values) for layer in self.layers.values()}
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in values]}
                  for group in super().param_groups(model, weight_decay)]
        mode = self.cfg.decay
        decayed, undecayed = [], []
        for name, layer in self.layers.items():
            decays = mode != "none" and not any(key in name for key in NO_DECAY)
            (decayed if decays else undecayed).append(layer.values)
        if mode == "increment":
            groups.append({"params": decayed, "weight_decay": 0.0, "increment_decay": weight_decay})
        else:
            groups.append({"params": decayed, "weight_decay": weight_decay})
        groups.append({"params": undecayed, "weight_decay": 0.0})
        return [group for group in groups if group["params"]]

    def create_optimizer(self, model: nn.Module, tcfg) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model, tcfg)
        if self.cfg.decay == "increment":
            optimizer.register_step_pre_hook(self._decay_increments)
        return optimizer

    @torch.no_grad()
    def _decay_increments(self, optimizer, args, kwargs) -> None:
        """Decoupled weight decay of the increments, values - initial, at the step's learning rate, before
        the update: AdamW's decay, applied to the increment instead of the weights."""
        initial = {id(layer.values): layer.initial for layer in self.layers.values()}
        for group in optimizer.param_groups:
            rate = group.get("increment_decay", 0.0) * group["lr"]
            if rate:
                for values in group["params"]:
                    values.sub_((values - initial[id(values)].to(values.dtype)) * rate)

    # ---- hooks and what is kept ----------------------------------------------------------------------
    def after_optimizer_step(self, run: "RunContext") -> None:
        for layer in self.layers.values():
            layer.sync()

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        for layer in self.layers.values():
            layer.sync()

    def export(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Indices and increments of the sparse tensors, and the dense head: megabytes, not a model."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.sparse_index"] = layer.index.cpu()
            out[f"{name}.sparse_delta"] = layer.increment().cpu()
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith(".values"):
                out[name] = param.detach().cpu().clone()
        return out

    # ---- what it costs -------------------------------------------------------------------------------
    def budget(self, sizes: list[int]) -> int:
        """Entries trained over target tensors of these sizes, by the method's rule (`scope`)."""
        return rule_budget(sizes, float(self.cfg.sparse_rate), self.scope)

    def memory_plan(self, parts):
        """The selected entries of the target tensors and the head.

        `sift-run` layout: per entry a `values` parameter and an `initial` copy in the weight dtype and an
        int64 index; per row of a target linear weight a CSR row pointer. `paper` layout: entries of every
        parameter updated in place in the weights, so an entry costs only its gradient and AdamW state
        (indices left uncounted).
        """
        w = parts.weight_bytes
        if parts.setting.sparse_layout == "paper":
            modes = {lin.name: "sparse" for lin in parts.blocks + parts.top}
            return Plan(Training({**modes, **parts.head_modes}),
                        [(math.floor(float(self.cfg.sparse_rate) * parts.everything), w)])
        if self.cfg.target_modules == ALL_PARAMS:
            chosen, chosen_top = parts.blocks, parts.top
            sizes = parts.pretrained_tensor_sizes
            training = Training({**{lin.name: "sparse" for lin in chosen + chosen_top}, **parts.head_modes})
        else:
            chosen, chosen_top = parts.matching(self.cfg.target_modules)
            sizes = [lin.fan_in * lin.fan_out for lin in chosen] * parts.arch.layers
            sizes += [lin.fan_in * lin.fan_out for lin in chosen_top]
            training = Training({**{lin.name: "sparse" for lin in chosen + chosen_top}, **parts.head_modes},
                                norms="frozen", embeddings=False)
        if not sizes:
            raise SiftError(f"method={self.name}: target_modules={self.cfg.target_modules} matches no linear layer "
                            "of this architecture")
        entries = self.budget(sizes)
        rows = sum(lin.fan_out + 1 for lin in chosen) * parts.arch.layers + sum(lin.fan_out + 1 for lin in chosen_top)
        return Plan(training, [(entries, w), (parts.head_params, w)],
                    added=[(entries, w)], buffers=entries * (INDEX_BYTES + w) + rows * INDEX_BYTES)

    def summary(self) -> dict:
        selected = sum(layer.index.numel() for layer in self.layers.values())
        total = sum(target.numel() for target in self.targets.values())
        return {"selected_entries": selected, "target_entries": total,
                "selected_share": selected / total if total else 0.0, "target_layers": len(self.layers),
                "grad_mode": self.cfg.grad_mode, "decay": self.cfg.decay}


@torch.no_grad()
def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model as its forward sees it (trained entries included), under the name it has in
    the pre-trained model: the export of a method that changed every tensor."""
    out = {}
    for name, param in model.named_parameters():
        if name.endswith(".values"):  # held in the dense tensor (SparseLinear) or applied by its parametrization
            continue
        if ".parametrizations." in name:  # MODULE.parametrizations.ATTR.original
            module_name, _, rest = name.partition(".parametrizations.")
            attr = rest.split(".")[0]
            name, param = f"{module_name}.{attr}", getattr(model.get_submodule(module_name), attr)
        out[name] = param.detach().cpu().clone()
    return out


@torch.no_grad()
def apply_export(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a fine-tuned model from the pre-trained one and an exported increment (`SparseMethod.export`)."""
    params = dict(model.named_parameters())

    def tensor(key: str) -> torch.Tensor:
        if key not in params:
            raise SiftError(f"the export holds '{key}', which this model does not have")
        return params[key]

    for key, value in tensors.items():  # dense tensors first: an increment may be relative to one of them
        if not key.endswith((".sparse_index", ".sparse_delta")):
            tensor(key).copy_(value)
    for key, value in tensors.items():
        if key.endswith(".sparse_index"):
            name = key[: -len(".sparse_index")]
            target = tensor(name if name in params else f"{name}.weight")  # earlier exports name the layer
            delta = tensors[f"{name}.sparse_delta"].to(target.device, target.dtype)
            target.view(-1).index_add_(0, value.to(target.device), delta)
    return model
