"""PAC-tuning (Liu et al., EMNLP 2023): minimise a PAC-Bayes bound, then train with perturbed gradient descent.

Source: G. Liu, Z. Xue, X. Zhang, K. M. Johnson, R. Wang, "PAC-tuning: Fine-tuning Pretrained Language
Models with PAC-driven Perturbed Gradient Descent", EMNLP 2023 (arXiv:2310.17588), and its published
code (github.com/MSU-NLP-CSS/PAC-tuning: pac_tuning.py, utils.py), read for every constant below. The
bound is the one of Zhang, Ghosh, Liu and Wang (arXiv:2305.19243) for unbounded losses with a trainable
prior.

Every trainable tensor w of the base method (θ, initial value θ0) gets a per-entry log noise scale p and
one prior log scale b (per tensor). Each training step draws ε ~ N(0, 1), clipped to [-c, c], and takes
the loss at θ + exp(p) ⊙ ε, so autograd reaches θ and p (∂/∂p = ε·exp(p)·∂L/∂θ). Evaluation calls the
model itself: the noise exists only inside `training_loss`. Dropout is switched off (the noise replaces it).

Stage 1 minimises, over θ, p and b, with n training examples and L noisy tensors:

    J = L_train(θ + exp(p) ⊙ ε) + 3/2 · γ · K² + (KL + ln(1/δ) + c_b · L) / (n · γ)
    KL = Σ_w KL(N(θ_w, diag e^{2 p_w}) ‖ N(θ0_w, e^{2 b_w} I))
       = Σ_w ½ Σ_i [e^{2(p_i - b_w)} + (θ_i - θ0_i)² e^{-2 b_w} - 1 + 2 b_w - 2 p_i]
    γ  = clip(√(2 (KL + ln(1/δ) + c_b · L) / (3 n)) / K, γ_min, γ_max)     (the J-minimising γ, clipped)
    K  = K(exp(mean_w b_w))

(`get_kl_term_layer_pb`, `weight_decay_mulb` and the `loss2`/`gamma1` lines of the published code; there
ln(1/δ) = 10 and c_b = 3, the union-bound cost of learning each b on a grid.) K(σ) is the constant of
the exponential-moment condition E exp(γ (μ - ℓ)) ≤ exp(3/2 · γ² K²), estimated before training from
the per-example training losses ℓ of `k_samples` random models θ0 + σ·N(0, 1) (noise on the noisy
tensors only), μ their mean, at each prior std σ in exp(linspace(k_log_prior_std)) and γ in
exp(linspace(ln γ_min, ln γ_max)) (`compute_K_sample_transformer`, `func_sum`). We solve the condition in
closed form, K(σ) = max_γ √(2 ln M(γ) / (3 γ²)) with M(γ) the sample mean of exp(γ (μ - ℓ)); the
published code finds the same threshold by a multiplicative search that stops up to 10% below it. As
published, K is made non-decreasing in σ and interpolated piecewise-linearly in σ (constant below the
grid, extended with the last slope above it; the published `fun_K_auto` accumulates the slope changes
incorrectly past the second knot, which we do not copy), and differentiable in b.

Stage 2 freezes p, drops the bound and trains on the noisy training loss alone. A checkpointed run
resumes in its stage: `state_dict` holds p, b, θ0, K, the stage and the noise optimizer and generator.

Optimisers, as published: θ with AdamW (`trainer.optimizer`; the base's parameter groups), scheduled by
the trainer, at the learning rates of `arm`: `intended` trains the pre-trained tensors at trainer.lr and
those absent from the checkpoint (the head, adapters) at `new_lr`, as the code's two groups mean to
(lr4pretrain 5e-5, lr4clf 1e-2); `as_published` trains every tensor at `new_lr`, as the code runs: its
grouping tests `args.model in name`, which no parameter name of bert-base-uncased contains. p and b have
their own Adam without weight decay, stepped by this method after each optimizer step of stage 1: lr
`noise_lr` (p) and `prior_lr` (b) for pre-trained tensors, `new_noise_lr` · max(boost · decay^⌊t /
decay_steps⌋, 1) at noise step t for new tensors (`myAdam`). p and b start at POWER · ln(mean |θ0|) over
the group's tensors (2 for pre-trained tensors, 1 for new ones, `initialization`). Gradient clipping, when
set, applies to θ only.

Deviations: K is solved exactly (above); the pre-trained/new split of p and b follows the checkpoint (new =
not loaded from it: the head, adapters) rather than the name prefix; weight decay follows the base's
parameter groups (no decay on biases and LayerNorm; published: on all of θ). The published head (a linear
layer on the [CLS] state, no pooler) is `model.head=cls_linear`; experiment=pac_glue sets it, a constant
learning rate and whole-set batches of the 100 examples, as the published script runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch.func import functional_call
from torch.utils.data import DataLoader

from sift_cli.context import FitResult
from sift_cli.errors import SiftError
from sift_cli.methods import register_method
from sift_cli.methods.base import (HOOKS, Wrapper, WrapperSettings, freeze_embeddings, fused_kernel, is_count,
                                   make_optimizer)
from sift_cli.models import set_dropout

# The exponential-moment factor: E exp(γ(μ - ℓ)) ≤ exp(MOMENT γ² K²) gives the bound's MOMENT γ K² term.
MOMENT = 1.5

# Which learning rates θ trains at: the code's intent (body trainer.lr, head new_lr), or what it ran.
ARMS = ("intended", "as_published")

# A base may override only these hooks: any other changes how training proceeds or what its trainable state
# is (a trainable set chosen from data, sparse increments, masks, its own loss or optimizer), and noise on
# its tensors, fixed when the model is prepared, is not well defined. A hook added to the contract is
# refused until it is known to be harmless here.
_BASE_MAY_OVERRIDE = ("check_model", "prepare", "param_groups", "export", "state_dict", "load_state_dict",
                      "summary", "memory_plan")


@dataclass
class NoisyTensor:
    name: str
    weight: torch.nn.Parameter  # θ, trained by the θ optimizer
    init: torch.Tensor | None  # θ0, the prior's mean (dropped after stage 1)
    log_std: torch.nn.Parameter  # p, the posterior's per-entry log std
    is_new: bool  # not loaded from the checkpoint (head, adapters)
    prior_index: int  # entry of the group's prior vector b


@dataclass
class BoundTerms:
    kl: torch.Tensor
    K: torch.Tensor
    gamma: torch.Tensor
    complexity: torch.Tensor  # everything J adds to the training loss


def gaussian_kl(weight, init, log_std, prior_log_std) -> torch.Tensor:
    """KL(N(weight, diag e^{2 log_std}) ‖ N(init, e^{2 prior_log_std} I)) summed over entries, in float64."""
    count = weight.numel()
    variance_ratio = torch.exp(2 * (log_std - prior_log_std.to(log_std.dtype))).sum(dtype=torch.float64)
    distance = (weight - init).pow(2).sum(dtype=torch.float64) * torch.exp(-2 * prior_log_std.double())
    log_ratio = 2 * (count * prior_log_std.double() - log_std.sum(dtype=torch.float64))
    return (variance_ratio + distance - count + log_ratio) / 2


def moment_constant(losses: torch.Tensor, gammas) -> float:
    """Smallest K with mean(exp(γ(μ - ℓ))) ≤ exp(MOMENT γ² K²) for every γ; `losses` is (models, examples)."""
    losses = losses.double().flatten()
    centred = losses.mean() - losses
    best = 0.0
    for gamma in gammas:
        log_moment = (torch.logsumexp(gamma * centred, 0) - math.log(losses.numel())).item()
        best = max(best, math.sqrt(max(log_moment, 0.0) / (MOMENT * gamma**2)))
    return best


def interpolate(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear in x through (knots, values): constant left of the knots, last slope right of them."""
    if len(knots) == 1:
        return values[0] + 0 * x
    slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
    slope_changes = slopes - torch.cat([slopes.new_zeros(1), slopes[:-1]])
    return values[0] + (F.relu(x - knots[:-1]) * slope_changes).sum()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's training loss per example: squared error for one output, cross-entropy otherwise."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        return (logits[:, 0].float() - labels.float()) ** 2
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    raise SiftError("method=pac: K is estimated from per-example losses of a classifier or a regressor; "
                    f"this task's logits have shape {tuple(logits.shape)}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SiftError(f"method=pac: {message}")


@dataclass
class PACSettings(WrapperSettings):
    arm: str = MISSING  # intended | as_published: which θ learning rates (create_optimizer)
    freeze_embeddings: bool = MISSING
    stage1_epochs: int = MISSING
    noise_clip: Optional[float] = MISSING
    new_lr: Optional[float] = MISSING
    noise_lr: float = MISSING
    prior_lr: float = MISSING
    new_noise_lr: float = MISSING
    new_noise_lr_boost: float = MISSING
    new_noise_lr_decay: float = MISSING
    new_noise_lr_decay_steps: int = MISSING
    pretrained_scale_power: float = MISSING
    new_scale_power: float = MISSING
    gamma_min: float = MISSING
    gamma_max: float = MISSING
    log_inv_delta: float = MISSING
    prior_grid_log_count: float = MISSING
    k_log_prior_std: List[float] = MISSING
    k_prior_points: int = MISSING
    k_gamma_points: int = MISSING
    k_samples: int = MISSING

    def check(self, run) -> None:
        super().check(run)
        self.need(self.arm in ARMS, "arm", f"one of {', '.join(ARMS)}")
        self.need(is_count(self.stage1_epochs, 0), "stage1_epochs", "a non-negative integer")
        for key in ("noise_lr", "prior_lr", "new_noise_lr", "new_noise_lr_boost", "gamma_min", "gamma_max"):
            self.need(getattr(self, key) > 0, key, "a positive number")
        for key in ("log_inv_delta", "prior_grid_log_count"):
            self.need(getattr(self, key) >= 0, key, "a non-negative number")
        for key in ("new_noise_lr_decay_steps", "k_prior_points", "k_gamma_points", "k_samples"):
            self.need(is_count(getattr(self, key)), key, "a positive integer")
        self.need(0 < self.new_noise_lr_decay <= 1, "new_noise_lr_decay", "in (0, 1]")
        self.need(self.noise_clip is None or self.noise_clip > 0, "noise_clip", "> 0 or null")
        self.need(self.new_lr is None or self.new_lr > 0, "new_lr", "> 0 or null")
        if self.gamma_min > self.gamma_max:
            self.refuse(f"{self.where}.gamma_min ({self.gamma_min}) exceeds {self.where}.gamma_max ({self.gamma_max})")
        grid = self.k_log_prior_std
        self.need(len(grid) == 2 and grid[0] <= grid[1], "k_log_prior_std", "[low, high] with low <= high")
        _need(grid[0] < grid[1] or self.k_prior_points == 1, "method.k_log_prior_std spans no range for several points")
        if run is None:
            return
        t = run.trainer
        _need(t.precision != "fp16", "trainer.precision=fp16 is not supported: its loss scaling would reach the "
                                     "noise gradients; use bf16 or no")
        if run.task.kind == "instruct":  # K is estimated from per-example losses of whole-sequence predictions
            self.refuse("method=pac needs a task with one prediction per example (classification, multiple "
                        "choice), not task.kind=instruct")
        if t.max_steps is None and self.stage1_epochs > t.epochs:
            self.refuse(f"{self.where}.stage1_epochs={self.stage1_epochs} is longer than training "
                        f"(trainer.epochs={t.epochs}): stage 2 would never run")


def _mean_abs(params: list[torch.Tensor]) -> float:
    total = sum(p.detach().abs().sum(dtype=torch.float64).item() for p in params)
    return total / sum(p.numel() for p in params)


@register_method
class PACTuning(Wrapper):
    name = "pac"
    draws_weights = True
    Settings = PACSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        overridden = self.overridden_by_base([hook for hook in HOOKS if hook not in _BASE_MAY_OVERRIDE])
        _need(not overridden, f"base '{self.base.name}' cannot carry noise: it overrides {', '.join(overridden)}, "
                              "so its trainable state is not whole tensors trained by plain gradient steps")
        self.tensors: list[NoisyTensor] = []
        self.prior_log_std: dict[bool, torch.nn.Parameter] = {}  # b, one vector per group (is_new)
        self.stage = 1
        self.facts: dict = {}
        self._last_terms: dict = {}
        self._noise_optimizer: torch.optim.Optimizer | None = None
        self._noise_steps = 0
        self._names: tuple[int, list[str]] | None = None
        self._rng: torch.Generator | None = None
        self.k_prior_std: torch.Tensor | None = None
        self.k_values: torch.Tensor | None = None

    # ---- what trains -------------------------------------------------------------------------------
    def prepare(self, model, ctx):
        checkpoint = {id(p) for name, p in model.named_parameters() if name not in ctx.new_params}
        try:
            model = self.base.prepare(model, ctx)
        except SiftError as err:  # its keys are method.base_overrides.KEY here
            raise SiftError(f"method.base={self.base.name}: {err}") from None
        frozen = freeze_embeddings(model) if self.cfg.freeze_embeddings else 0
        dropouts = set_dropout(model, 0.0)
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        _need(trainable, f"base '{self.base.name}' leaves no trainable tensor to carry noise")
        for name, param in trainable:
            _need(param.is_floating_point(), f"trainable tensor '{name}' is not floating point; noise is undefined")
        groups = {False: [], True: []}
        for name, param in trainable:
            groups[id(param) not in checkpoint].append((name, param))
        for is_new, members in groups.items():
            if not members:
                continue
            scale = _mean_abs([p for _, p in members])
            power = "new_scale_power" if is_new else "pretrained_scale_power"
            _need(scale > 0, f"the {'new' if is_new else 'pre-trained'} trainable tensors are all zero, so their "
                             f"initial noise scale method.{power} * log(mean |w0|) is undefined")
            log_std = float(self.cfg[power]) * math.log(scale)
            device = members[0][1].device
            self.prior_log_std[is_new] = torch.nn.Parameter(torch.full((len(members),), log_std, device=device))
            for index, (name, param) in enumerate(members):
                self.tensors.append(NoisyTensor(
                    name=name, weight=param, init=param.detach().clone(), is_new=is_new, prior_index=index,
                    log_std=torch.nn.Parameter(torch.full_like(param, log_std, dtype=torch.float32))))
        self.facts.update(
            base=self.base.name,
            noisy_tensors=len(self.tensors),
            noise_params=sum(t.log_std.numel() for t in self.tensors),
            prior_params=sum(b.numel() for b in self.prior_log_std.values()),
            frozen_embedding_params=frozen,
            dropouts_disabled=dropouts,
            initial_log_std={("new" if is_new else "pretrained"): round(b[0].item(), 4)
                             for is_new, b in self.prior_log_std.items()},
        )
        return model

    # ---- how it is optimised -----------------------------------------------------------------------
    def create_optimizer(self, model, tcfg):
        """θ with `trainer.optimizer` (AdamW as published): the pre-trained tensors at trainer.lr and the new
        ones at `new_lr` (arm `intended`), or every tensor at `new_lr` (arm `as_published`: the published
        grouping matches no name, so the code trains all of θ at its head rate); p and b get their own
        Adam, stepped by this method."""
        new = {id(t.weight) for t in self.tensors if t.is_new}
        new_lr = float(self.cfg.new_lr or tcfg.lr)
        lrs = {False: new_lr if self.cfg.arm == "as_published" else float(tcfg.lr), True: new_lr}
        groups = []
        for group in self.base.param_groups(model, tcfg.weight_decay):
            for is_new, lr in lrs.items():
                params = [p for p in group["params"] if (id(p) in new) == is_new]
                if params:
                    groups.append({**group, "params": params, "lr": lr})
        noise_groups = []
        for is_new in (False, True):
            log_stds = [t.log_std for t in self.tensors if t.is_new == is_new]
            if log_stds:
                lrs = (self._new_noise_lr(1),) * 2 if is_new else (self.cfg.noise_lr, self.cfg.prior_lr)
                noise_groups.append({"params": log_stds, "lr": lrs[0], "is_new": is_new})
                noise_groups.append({"params": [self.prior_log_std[is_new]], "lr": lrs[1], "is_new": is_new})
        self._noise_optimizer = torch.optim.Adam(noise_groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                                 fused=fused_kernel(noise_groups, tcfg))
        return make_optimizer(groups, tcfg)

    def own_optimizers(self):
        return [self._noise_optimizer] if self._noise_optimizer is not None else []

    # ---- the bound -----------------------------------------------------------------------------------
    def kl(self) -> torch.Tensor:
        return sum(gaussian_kl(t.weight, t.init, t.log_std, self.prior_log_std[t.is_new][t.prior_index])
                   for t in self.tensors)

    def bound_terms(self, n_train: int) -> BoundTerms:
        kl = self.kl()
        prior_std = torch.exp(torch.cat(list(self.prior_log_std.values())).double().mean())
        K = interpolate(prior_std, self.k_prior_std, self.k_values)
        cost = kl + self.cfg.log_inv_delta + self.cfg.prior_grid_log_count * len(self.tensors)
        gamma = torch.clamp(torch.sqrt(2 * cost / (3 * n_train)) / K, self.cfg.gamma_min, self.cfg.gamma_max)
        return BoundTerms(kl, K, gamma, MOMENT * gamma * K**2 + cost / (n_train * gamma))

    # ---- phases and hooks --------------------------------------------------------------------------
    def select(self, run):
        """Put the noise state beside the placed model, seed the noise, and estimate K from the training
        data when there is a stage 1 (before any step, as published)."""
        self.base.select(run)
        device = run.device
        for t in self.tensors:
            t.init = t.init.to(device)
            t.log_std.data = t.log_std.data.to(device)
        for b in self.prior_log_std.values():
            b.data = b.data.to(device)
        seed = int(run.cfg.seed) + run.accelerator.process_index
        self._rng = torch.Generator(device=device).manual_seed(seed)
        self.n_train = len(run.data.train)
        if int(self.cfg.stage1_epochs) > 0:
            self.estimate_K(run)

    def fit(self, loop) -> FitResult:
        """Stage 1 (the bound), stage 2 (p frozen); a resumed run continues in its stage."""
        stage1_steps = min(int(self.cfg.stage1_epochs) * loop.steps_per_epoch, loop.total_steps)
        self.facts["stage1_steps"] = stage1_steps
        if self.stage == 1:
            loop.train(until_step=stage1_steps)
            self.facts["stage1_train_time_s"] = loop.train_time_s
            self.facts["end_of_stage1"] = dict(self._last_terms) or None
            self.enter_stage2()
        loop.train()
        self.facts["stage2_train_time_s"] = loop.train_time_s - self.facts["stage1_train_time_s"]
        return loop.selected()

    def enter_stage2(self) -> None:
        """Freeze p at its learned value; the prior, θ0 and the noise optimizer are no longer needed."""
        self.stage = 2
        for t in self.tensors:
            t.log_std.requires_grad_(False)
            t.log_std.grad = None
            t.init = None
        self._noise_optimizer = None

    def training_loss(self, run, batch):
        noisy = {}
        for name, t in zip(self._names_in(run.model), self.tensors):
            eps = torch.randn(t.weight.shape, generator=self._rng, device=t.weight.device, dtype=t.weight.dtype)
            if self.cfg.noise_clip is not None:
                eps.clamp_(-self.cfg.noise_clip, self.cfg.noise_clip)
            noisy[name] = t.weight + torch.exp(t.log_std).to(t.weight.dtype) * eps
        loss = functional_call(run.model, noisy, args=(), kwargs=batch).loss
        if self.stage != 1:
            return loss
        terms = self.bound_terms(self.n_train)
        self._last_terms = {"pac_train_loss": loss.item(), "pac_kl": terms.kl.item(), "pac_K": terms.K.item(),
                            "pac_gamma": terms.gamma.item(), "pac_bound": loss.item() + terms.complexity.item()}
        return loss + terms.complexity.to(loss.dtype)

    def after_optimizer_step(self, run):
        """Stage 1: step p and b (the published schedule for new tensors) and log the bound's terms."""
        if self.stage != 1:
            return
        self._noise_steps += 1
        for group in self._noise_optimizer.param_groups:
            if group["is_new"]:
                group["lr"] = self._new_noise_lr(self._noise_steps)
        if run.accelerator.num_processes > 1:
            for group in self._noise_optimizer.param_groups:
                for param in group["params"]:
                    param.grad = run.accelerator.reduce(param.grad, reduction="mean")
        self._noise_optimizer.step()
        self._noise_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            noise_std = sum(torch.exp(t.log_std).sum(dtype=torch.float64) for t in self.tensors).item()
            prior_std = torch.exp(torch.cat(list(self.prior_log_std.values())).mean()).item()
        self._last_terms.update(step=run.step, pac_noise_std=noise_std / self.facts["noise_params"],
                                pac_prior_std=prior_std)
        run.log({"step": run.step, "pac_stage": 1, **self._last_terms})

    def _new_noise_lr(self, step: int) -> float:
        """The published lr of p and b for new tensors at noise step `step` (1-based): boosted, decaying."""
        cfg = self.cfg
        boost = cfg.new_noise_lr_boost * cfg.new_noise_lr_decay ** (step // cfg.new_noise_lr_decay_steps)
        return cfg.new_noise_lr * max(boost, 1.0)

    def _names_in(self, module: torch.nn.Module) -> list[str]:
        """The noisy tensors' names inside `module` (the trainer's model may wrap the one prepared)."""
        if self._names is None or self._names[0] != id(module):
            names = {id(p): name for name, p in module.named_parameters()}
            self._names = (id(module), [names[id(t.weight)] for t in self.tensors])
        return self._names[1]

    # ---- K ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_K(self, run) -> None:
        """K at each prior std of the grid, from the losses of random models around θ0 (before training)."""
        started = time.perf_counter()
        cfg = self.cfg
        rows = int(run.tcfg.eval_batch_size or run.tcfg.batch_size)  # the training batch unless a cap is set
        loader = run.accelerator.prepare_data_loader(DataLoader(run.data.train, batch_size=rows,
                                                                collate_fn=run.data.collator))
        device = run.device
        stds = torch.exp(torch.linspace(*map(float, cfg.k_log_prior_std), int(cfg.k_prior_points), dtype=torch.float64))
        gammas = torch.exp(torch.linspace(math.log(cfg.gamma_min), math.log(cfg.gamma_max), int(cfg.k_gamma_points),
                                          dtype=torch.float64)).tolist()
        names = self._names_in(run.model)
        values = []
        for std in stds.tolist():
            losses = []
            for _ in range(int(cfg.k_samples)):
                sample = {name: t.init + std * torch.randn(t.init.shape, generator=self._rng, device=device,
                                                            dtype=t.init.dtype)
                          for name, t in zip(names, self.tensors)}
                per_batch = []
                for batch in loader:
                    logits = functional_call(run.model, sample, args=(), kwargs=batch).logits
                    per_batch.append(run.accelerator.gather_for_metrics(per_example_loss(logits, batch["labels"])))
                losses.append(torch.cat(per_batch))
            values.append(moment_constant(torch.stack(losses), gammas))
        values = torch.tensor(values, dtype=torch.float64).cummax(0).values  # non-decreasing in σ, as published
        _need(values[0] > 0, "the training loss does not vary over random models at the smallest prior std "
                             "(K = 0), where the bound is undefined; raise the low end of method.k_log_prior_std")
        self.k_prior_std, self.k_values = stds.to(device), values.to(device)
        self.facts["K_estimate"] = {"prior_std": [round(s, 6) for s in stds.tolist()],
                                    "K": [round(k, 6) for k in values.tolist()],
                                    "time_s": round(time.perf_counter() - started, 3)}

    # ---- what is kept --------------------------------------------------------------------------------
    def state_dict(self):
        """p, b, θ0, K, the stage and the noise optimizer and generator: what a resumed run continues from."""
        return {
            "stage": self.stage,
            "noise_steps": self._noise_steps,
            "log_std": [t.log_std.detach().cpu() for t in self.tensors],
            "init": [t.init.cpu() for t in self.tensors] if self.stage == 1 else None,
            "prior_log_std": {k: b.detach().cpu() for k, b in self.prior_log_std.items()},
            "noise_optimizer": self._noise_optimizer.state_dict() if self._noise_optimizer else None,
            "K": (self.k_prior_std.cpu(), self.k_values.cpu()) if self.k_values is not None else None,
            "rng": self._rng.get_state(),
            "facts": dict(self.facts),
            "last_terms": dict(self._last_terms),
        }

    def load_state_dict(self, state):
        device = self.tensors[0].weight.device
        with torch.no_grad():
            for t, log_std in zip(self.tensors, state["log_std"]):
                t.log_std.copy_(log_std)
            for t, init in zip(self.tensors, state["init"] or []):
                t.init = init.to(device)
            for key, b in state["prior_log_std"].items():
                self.prior_log_std[key].copy_(b)
        if state["K"] is not None:
            self.k_prior_std, self.k_values = (v.to(device) for v in state["K"])
        self._rng.set_state(state["rng"])
        self._noise_steps = state["noise_steps"]
        self.facts, self._last_terms = dict(state["facts"]), dict(state["last_terms"])
        if state["stage"] == 2:
            self.enter_stage2()
        elif state["noise_optimizer"] is not None:
            self._noise_optimizer.load_state_dict(state["noise_optimizer"])

    def memory_plan(self, parts):
        raise SiftError("method=pac is not modelled by sift-memory: its noise scales and two-stage optimizer are not")

    def summary(self):
        base_info = self.base.summary()
        return {**self.facts, **({"base_info": base_info} if base_info else {})}
