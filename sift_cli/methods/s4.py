"""S4 designs (Chen et al., ICLR 2023, "Parameter-Efficient Fine-Tuning Design Spaces"): strategies per layer group.

A design splits the encoder's layers into consecutive groups (`method.groups`, layer counts), gives each
group a set of strategies from {adapter, prefix, bitfit, lora} (`method.assignment`; an empty set leaves
the group frozen) and a total budget (`method.budget`, a fraction of the model's parameters). The sizes
(adapter bottleneck, prefix length, LoRA rank; BitFit has none) follow from the budget by the rule in
`derive_sizes`, and are recorded in results.json under `method_info`. The task head trains on top of
the budget, as in every method, and is counted apart (`head_params`).

The strategies compute what AdapterHub's do (the S4 code is built on it): adapters as its HoulsbyConfig or
PfeifferConfig (swish or relu, N(0, 0.02) init), LoRA with alpha = rank. Differences kept, because a design
allocates a budget per layer: each layer's prefix has its own narrow MLP (AdapterHub shares one 512-wide MLP
across layers and drops it after training), and nothing is gated. The official code itself has no grouping:
its `PEFT` configuration is the gated union of prefix, Pfeiffer adapter and LoRA on every layer, our `unipelt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import List, Optional

from omegaconf import MISSING, OmegaConf

from sift_cli.errors import SiftError
from sift_cli.methods import register_method
from sift_cli.methods.base import Method, Settings, is_count
from sift_cli.methods.layers import (
    PLACEMENTS, STRATEGIES, LayerCost, adapter_cost, attach_adapters, attach_lora, attach_prefix, bitfit_cost,
    encoder_layers, layer_biases, lora_cost, prefix_cost, train_only,
)

ALLOCATIONS = ("uniform", "increasing", "decreasing")
BUDGET_TOLERANCE = 0.05  # the realised strategy parameters may miss budget x total by this fraction at most
SIZE_NAMES = {"adapter": "bottleneck", "prefix": "length", "lora": "rank"}


@dataclass(frozen=True)
class Design:
    groups: list[int]  # layers per group, first to last
    assignment: list[tuple[str, ...]]  # strategies per group
    allocation: str

    def layers_of(self, group: int) -> range:
        start = ([0] + list(accumulate(self.groups)))[group]
        return range(start, start + self.groups[group])


def read_design(cfg, num_layers: int | None = None) -> Design:
    """The design in `method.*`, checked; its fit to the model (layer count, one set of strategies per group)
    only when the model's layer count is given."""
    groups = OmegaConf.to_container(cfg.groups) if OmegaConf.is_config(cfg.groups) else cfg.groups
    if not isinstance(groups, list) or not groups or not all(isinstance(n, int) and n >= 1 for n in groups):
        raise SiftError(f"method.groups must be a list of positive layer counts, got {groups!r}")
    if num_layers is not None and sum(groups) != num_layers:
        raise SiftError(f"method.groups {groups} covers {sum(groups)} layers, but the model has {num_layers}")
    assignment = OmegaConf.to_container(cfg.assignment) if OmegaConf.is_config(cfg.assignment) else cfg.assignment
    if not isinstance(assignment, list) or (num_layers is not None and len(assignment) != len(groups)):
        raise SiftError(f"method.assignment must list one set of strategies per group ({len(groups)}), "
                        f"got {assignment!r}")
    for strategies in assignment:
        unknown = [s for s in strategies if s not in STRATEGIES] if isinstance(strategies, list) else [strategies]
        if unknown or len(set(strategies)) != len(strategies):
            raise SiftError(f"method.assignment: {strategies!r} must be a list of distinct strategies "
                            f"from {', '.join(STRATEGIES)}")
    if not any(assignment):
        raise SiftError("method.assignment tunes no group")
    if cfg.allocation not in ALLOCATIONS:
        raise SiftError(f"method.allocation must be one of {', '.join(ALLOCATIONS)}, got {cfg.allocation!r}")
    ordered = [tuple(s for s in STRATEGIES if s in strategies) for strategies in assignment]
    return Design(groups, ordered, cfg.allocation)


def allocation_weights(num_groups: int, allocation: str) -> list[int]:
    """Relative parameters per layer in each group: equal, or growing/shrinking with depth (the paper's rules)."""
    if allocation == "uniform":
        return [1] * num_groups
    rising = list(range(1, num_groups + 1))
    return rising if allocation == "increasing" else rising[::-1]


def _fill_layer(costs: dict[str, LayerCost], target: float, group: int) -> dict[str, int]:
    """Sizes for one layer of a group whose count comes closest to `target`, the sized strategies sharing it.

    Every sized strategy starts at size 1; then the one that has spent least grows by one while the layer
    stays within the target; a last step over the target is taken when it lands closer.
    """
    sized = {s: c for s, c in costs.items() if c.unit > 0}
    sizes = dict.fromkeys(sized, 1)
    count = sum(c.at(sizes.get(s, 0)) for s, c in costs.items())
    if count > target:
        raise SiftError(f"method.budget is too small for group {group + 1} ({'+'.join(costs)}): one layer needs "
                        f"at least {count} parameters, the budget gives it {target:.0f}")
    while fits := [s for s in sized if count + sized[s].unit <= target]:
        grow = min(fits, key=lambda s: sizes[s] * sized[s].unit)
        sizes[grow] += 1
        count += sized[grow].unit
    finest = min(sized, key=lambda s: sized[s].unit)
    if target - count > sized[finest].unit / 2:
        sizes[finest] += 1
    return sizes


def derive_sizes(costs: list[dict[str, LayerCost]], groups: list[int], budget_params: int,
                 allocation: str = "uniform") -> list[dict[str, int]]:
    """The uniform-allocation rule: every tuned layer gets the same share of the budget (weighted by group
    for the other allocations), and each group's sizes fill its layers' share as closely as integers allow.

    `costs[g]` maps group g's strategies to their cost per layer. Groups with BitFit alone have a fixed
    size: they take what they cost, and the rest of the budget is shared among the other tuned layers.
    Raises SiftError when a layer's share cannot hold its strategies at size 1, or when the realised
    total misses the budget by more than BUDGET_TOLERANCE.
    """
    weights = allocation_weights(len(costs), allocation)
    sizable = [g for g, c in enumerate(costs) if any(x.unit > 0 for x in c.values())]
    fixed_only = [g for g, c in enumerate(costs) if c and g not in sizable]
    spare = budget_params - sum(groups[g] * sum(x.fixed for x in costs[g].values()) for g in fixed_only)
    weight_total = sum(weights[g] * groups[g] for g in sizable)
    sizes: list[dict[str, int]] = [{} for _ in costs]
    for g in sizable:
        sizes[g] = _fill_layer(costs[g], spare * weights[g] / weight_total, g)
    total = sum(groups[g] * sum(c.at(sizes[g].get(s, 0)) for s, c in costs[g].items()) for g in range(len(costs)))
    if abs(total - budget_params) > BUDGET_TOLERANCE * budget_params:
        raise SiftError(f"method.budget: the design's strategies need {total} parameters, more than "
                        f"{BUDGET_TOLERANCE:.0%} away from the budget of {budget_params}")
    return sizes


@dataclass
class S4Settings(Settings):
    groups: List[int] = MISSING  # layers per group, first to last
    assignment: List[List[str]] = MISSING  # strategies per group
    budget: float = MISSING  # the strategies' parameters as a fraction of the model's
    allocation: str = MISSING  # uniform | increasing | decreasing
    adapter_placement: str = MISSING
    prefix_mlp_hidden: int = MISSING
    lora_targets: List[str] = MISSING
    lora_alpha_per_rank: float = MISSING
    lora_dropout: float = MISSING
    label: Optional[str] = None  # a free-form tag recorded with the run (sift-design's design id)

    def check(self, run) -> None:
        super().check(run)
        read_design(self)
        self.need(0 < self.budget < 1, "budget", "a fraction in (0, 1)")
        self.need(self.adapter_placement in PLACEMENTS, "adapter_placement", f"one of {', '.join(PLACEMENTS)}")
        self.need(is_count(self.prefix_mlp_hidden), "prefix_mlp_hidden", "a positive integer")
        self.need(bool(self.lora_targets), "lora_targets", "a non-empty list of module names")
        self.need(self.lora_alpha_per_rank > 0, "lora_alpha_per_rank", "> 0")
        self.need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")


@register_method
class S4(Method):
    name = "s4"
    Settings = S4Settings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info = {}

    def check_model(self, model):
        read_design(self.cfg, len(encoder_layers(model, self.name)))

    def strategy_cost(self, layer, strategy: str) -> LayerCost:
        cfg = self.cfg
        if strategy == "adapter":
            return adapter_cost(layer, cfg.adapter_placement)
        if strategy == "prefix":
            return prefix_cost(layer, int(cfg.prefix_mlp_hidden))
        if strategy == "lora":
            return lora_cost(layer, list(cfg.lora_targets))
        return bitfit_cost(layer)

    def prepare(self, model, ctx):
        cfg = self.cfg
        layers = encoder_layers(model, self.name)
        design = read_design(cfg, len(layers))
        self.info = {"label": cfg.label, "groups": design.groups, "assignment": [list(a) for a in design.assignment],
                     "allocation": design.allocation}
        total_params = sum(p.numel() for p in model.parameters())
        budget_params = round(float(cfg.budget) * total_params)
        costs = [{s: self.strategy_cost(layers[design.layers_of(g)[0]], s) for s in strategies}
                 for g, strategies in enumerate(design.assignment)]
        sizes = derive_sizes(costs, design.groups, budget_params, design.allocation)

        biases, modules, lora_ranks = [], [], {}
        for g, strategies in enumerate(design.assignment):
            for index in design.layers_of(g):
                layer = layers[index]
                if "bitfit" in strategies:
                    biases += layer_biases(layer)
                if "adapter" in strategies:
                    modules += attach_adapters(layer, sizes[g]["adapter"], cfg.adapter_placement)
                if "prefix" in strategies:
                    modules += attach_prefix(model, layer, sizes[g]["prefix"], int(cfg.prefix_mlp_hidden))
                if "lora" in strategies:
                    lora_ranks[index] = sizes[g]["lora"]
        if lora_ranks:
            modules += attach_lora(model, lora_ranks, list(cfg.lora_targets), float(cfg.lora_alpha_per_rank),
                                   float(cfg.lora_dropout))
        train_only(model, modules, biases, ctx.new_params)

        per_layer = [sum(c.at(sizes[g].get(s, 0)) for s, c in costs[g].items()) for g in range(len(costs))]
        strategy_params = sum(n * count for n, count in zip(design.groups, per_layer))
        self.info.update(
            budget=float(cfg.budget),
            budget_params=budget_params,
            strategy_params=strategy_params,
            realised_budget=strategy_params / total_params,
            head_params=sum(p.numel() for n, p in model.named_parameters() if n in ctx.new_params),
            group_plans=[
                {"layers": list(design.layers_of(g)), "strategies": list(design.assignment[g]),
                 "sizes": {f"{s}_{SIZE_NAMES[s]}": n for s, n in sizes[g].items()}, "params_per_layer": per_layer[g]}
                for g in range(len(costs))
            ],
            adapter_placement=cfg.adapter_placement,
            prefix_mlp_hidden=int(cfg.prefix_mlp_hidden),
            lora_targets=list(cfg.lora_targets),
        )
        return model

    def summary(self):
        return self.info
