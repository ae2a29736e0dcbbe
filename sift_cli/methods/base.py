"""The contract every fine-tuning method implements, with full fine-tuning's behaviour as the default.

A method declares its settings (`Settings`, a typed schema checked before anything loads), decides what
trains (`prepare`, and from data in `select`), how it is optimised (`create_optimizer`), what its memory
costs (`memory_plan`), and may add phases (`fit`) or act at fixed points of the one training loop (the
hooks). Hooks see the run through a `RunContext`, `fit` drives a `Loop` and returns a `FitResult`
(sift_cli/context.py). The runner and the trainer never ask which method runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from omegaconf import MISSING, DictConfig

from sift_cli.config import OPTIMIZERS
from sift_cli.errors import SiftError

if TYPE_CHECKING:
    from sift_cli.context import FitResult, Loop, RunContext
    from sift_cli.memory.model import Parts, Plan

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class ModelContext:
    """What a method may need to know about the model it adapts."""

    new_params: set[str] = field(default_factory=set)  # not in the checkpoint (the task head): always trained
    task_kind: str = "classification"

    @property
    def head_modules(self) -> list[str]:
        """The top-level modules holding the new parameters, e.g. ["classifier"] (RoBERTa's head is a
        module with two layers: peft must copy the whole module for the head to train)."""
        return sorted({name.split(".", 1)[0] for name in self.new_params})


# ---- settings -----------------------------------------------------------------------------------------
def is_count(value, least: int = 1) -> bool:
    """An integer (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass
class Settings:
    """`method.*` of every method: its name and its usual learning rate. A method's own settings extend
    this schema; `check` states their ranges and combinations, and runs before any model or data loads."""

    name: str = MISSING
    lr: Optional[float] = None  # the method's usual learning rate: the default of trainer.lr

    where: ClassVar[str] = "method"  # where these settings stand in the config (method.base for a base)

    def check(self, run: DictConfig | None) -> None:
        """Refuse out-of-range values and bad combinations; `run` is the whole config (None: the method alone)."""
        self.need(self.lr is None or self.lr > 0, "lr", "> 0")

    def need(self, ok: bool, key: str, requirement: str) -> None:
        if not ok:
            raise SiftError(f"{self.where}.{key} must be {requirement}, got {getattr(self, key)!r}")

    def refuse(self, message: str) -> None:
        raise SiftError(message)


# ---- the method ---------------------------------------------------------------------------------------
class Method:
    name = "base"
    Settings: ClassVar[type[Settings]] = Settings
    # Whether training_loss draws random weights (noise, masks) at each call, once per batch in the published
    # algorithm: trainer.train_tokens=auto then keeps batches whole, since micro-batches would each draw their own.
    draws_weights: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg  # method.* checked against `Settings` (build_method)

    def check_model(self, model: torch.nn.Module) -> None:
        """Checks of the settings against the model's modules, before the model loads: `model` is built from
        its config alone, without weights (target names that match nothing, layers that do not add up)."""

    # ---- what trains -------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, ctx: ModelContext) -> torch.nn.Module:
        """Mark the trainable parameters (or wrap the model) and return the model to train."""
        return model

    def select(self, run: "RunContext") -> None:
        """Once, with the model on its device and before the first step (and before the model is wrapped for
        data parallelism, which fixes what it synchronises): what the method decides from data, such as
        SIFT's and SAM's trainable entries or PAC's moment constant. The runner calls it as a step of its own."""

    def count_trainable(self, model: torch.nn.Module) -> int:
        """Number of trainable entries (a sparse method counts its selected entries, not whole tensors)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ---- how it is optimised -----------------------------------------------------------------------
    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if any(k in name for k in NO_DECAY) else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def create_optimizer(self, model: torch.nn.Module, tcfg: DictConfig) -> torch.optim.Optimizer:
        return make_optimizer(self.param_groups(model, tcfg.weight_decay), tcfg)

    def own_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers the method builds and steps itself besides the trainer's (PAC's noise scales), so that
        what its optimizers hold is counted (sift-bench, the contract test)."""
        return []

    def clip_gradients(self, run: "RunContext", max_norm: float) -> None:
        params = [p for p in run.model.parameters() if p.requires_grad]
        run.accelerator.clip_grad_norm_(params, max_norm)

    # ---- phases and hooks --------------------------------------------------------------------------
    def fit(self, loop: "Loop") -> "FitResult":
        """The whole training of a run; methods with extra phases run them around `loop.train()`."""
        loop.train()
        return loop.selected()

    def training_loss(self, run: "RunContext", batch: dict) -> torch.Tensor:
        return run.model(**batch).loss

    def on_train_begin(self, run: "RunContext") -> None:
        """When the loop builds its optimizer (the first `train`, or a resumed run), before the optimizer."""

    def after_optimizer_step(self, run: "RunContext") -> None:
        """After each optimizer step (not after accumulation micro-steps)."""

    # ---- what is kept --------------------------------------------------------------------------------
    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The parameters this method changes (for model selection and `save.weights`), on the CPU."""
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def export(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What `save.weights=true` stores: enough to rebuild the fine-tuned model from the pre-trained one."""
        return self.trainable_state(model)

    def load_trainable_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def state_dict(self) -> dict:
        """Method state beyond the trainable tensors that a resumed run needs (a phase, a learned scale)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """Method-specific facts for results.json (derived sizes, selected budget, ...)."""
        return {}

    # ---- what it costs ---------------------------------------------------------------------------------
    def memory_plan(self, parts: "Parts") -> "Plan":
        """What the method trains, adds and keeps on an architecture, for `sift-memory`'s prediction."""
        raise SiftError(f"method={self.name} is not modelled by sift-memory")


# Every hook of the contract: what a method built on another forwards to it unless it overrides it.
HOOKS = tuple(name for name, value in vars(Method).items()
              if inspect.isfunction(value) and not name.startswith("_"))


@dataclass
class WrapperSettings(Settings):
    base: Any = MISSING  # the base method's settings: a defaults entry `/method@base: NAME` of the method file


class Wrapper(Method):
    """A method built on another (`method.base`, composed by Hydra from conf/method/BASE.yaml, so that
    `method@method.base=NAME` picks it and `method.base.KEY=VALUE` sets its settings). Every hook of the
    contract goes to the base unless the wrapper overrides it."""

    Settings = WrapperSettings

    def __init__(self, cfg: DictConfig):
        from sift_cli.methods import build_method

        super().__init__(cfg)
        self.base = build_method(cfg.base, where=f"{WrapperSettings.where}.base")
        if self.base.name == self.name:
            raise SiftError(f"method.base must name another method than {self.name}")

    def overridden_by_base(self, hooks) -> list[str]:
        """The hooks among `hooks` whose base implementation is not the contract's default."""
        return [hook for hook in hooks if getattr(type(self.base), hook) is not getattr(Method, hook)]


def _forward(hook: str):
    def forward(self, *args, **kwargs):
        return getattr(self.base, hook)(*args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"The base method's `{hook}`."
    return forward


for _hook in HOOKS:
    setattr(Wrapper, _hook, _forward(_hook))


FUSED_DEVICES = ("cpu", "cuda")


def fused_kernel(param_groups: list[dict], tcfg: DictConfig) -> bool | None:
    """`fused=` for a torch optimizer over these groups: True (one kernel per step over all tensors, no
    temporaries) when `trainer.fused_optimizer` is on and every parameter is a float tensor on a CPU or a GPU;
    None (torch's default: tensor by tensor on a CPU, `foreach` on a GPU) otherwise. On a CPU the default's
    per-tensor loop (`_single_tensor_adam`) was about a fifth of a MiniLM full fine-tuning step."""
    params = [p for group in param_groups for p in group["params"]]
    wanted = bool(tcfg.get("fused_optimizer", True)) and bool(params)
    return True if wanted and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params) else None


def make_optimizer(groups: list[dict], tcfg: DictConfig, **defaults) -> torch.optim.Optimizer:
    """`trainer.optimizer` over `groups`, at `trainer.lr` where a group sets no lr of its own: AdamW, or plain
    SGD (no momentum; weight decay added to the gradient), which the grafting code fine-tunes with; either
    with its fused kernel where `fused_kernel` allows."""
    kind = tcfg.get("optimizer", "adamw")
    if kind not in OPTIMIZERS:
        raise SiftError(f"trainer.optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    optimizer = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    return optimizer(groups, lr=float(tcfg.lr), **{"fused": fused_kernel(groups, tcfg), **defaults})


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Freeze the embedding tables and every parameter named like an embedding (their LayerNorm too), as the
    PAC-tuning and grafting code do; returns the entries frozen."""
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    count = 0
    for name, param in model.named_parameters():
        if param.requires_grad and (id(param) in tables or "embed" in name.lower()):
            param.requires_grad_(False)
            count += param.numel()
    return count


def freeze_all_but(model: torch.nn.Module, keep) -> None:
    """Train exactly the parameters whose name satisfies `keep(name)`."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(keep(name)))
