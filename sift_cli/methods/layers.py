"""Per-layer PEFT strategies for BERT/RoBERTa encoders: where each attaches, and what one layer of it costs.

`adapter`, `prefix` and `s4` all place strategies on chosen layers, so the attachment and the
parameter-cost model live here once. Every strategy states its cost per layer as `fixed + unit * size`
(`LayerCost`), which is what the S4 budget rule solves for; the tests check that the modules attached
have exactly that many parameters.

Adapters and prefixes are our own modules (adapters attached with forward hooks, prefixes through the
attention interface), so the checkpoint's parameter names stay as they are (BitFit still finds its biases
by name): peft has no bottleneck adapter, and its prefix tuning feeds a cache to the whole model, so it
cannot put a prefix on some layers only. LoRA
goes through peft (`layers_to_transform` picks the layers, `rank_pattern` gives each layer its rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from sift_cli.errors import SiftError

STRATEGIES = ("adapter", "prefix", "bitfit", "lora")
PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}  # Houlsby et al. 2019; Pfeiffer et al. 2021


@dataclass(frozen=True)
class LayerCost:
    """Trainable parameters one layer gains from a strategy of integer size s: fixed + unit * s."""

    fixed: int
    unit: int  # 0: the strategy has no size (BitFit)

    def at(self, size: int) -> int:
        return self.fixed + self.unit * size


# ---- the encoder ------------------------------------------------------------------------------------
def encoder_layers(model: nn.Module, method: str) -> nn.ModuleList:
    """The transformer layers of a BERT or RoBERTa model (`<base>.encoder.layer`), checked for what we hook."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        hasattr(layer, "attention") and hasattr(layer.attention, "self") and hasattr(layer.attention, "output")
        and hasattr(layer, "output") and hasattr(layer.attention.self, "key") for layer in layers
    )
    if not ok:
        raise SiftError(f"method={method} supports BERT/RoBERTa encoders only, not {type(model).__name__}")
    return layers


def layer_names(model: nn.Module, layers: nn.ModuleList) -> list[str]:
    """Each layer's module path, e.g. 'bert.encoder.layer.3'."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def _hidden(layer: nn.Module) -> int:
    return layer.attention.self.key.in_features


def _kv_width(layer: nn.Module) -> int:
    return layer.attention.self.key.out_features


# ---- bottleneck adapters --------------------------------------------------------------------------
class Adapter(nn.Module):
    """x + up(relu(down(x))); `up` starts at zero, so the adapted model starts as the pretrained one."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))

    def after(self, module, args, output):
        """Forward hook: adapt a sub-layer's output before its residual sum and LayerNorm."""
        return self(output)


def adapter_cost(layer: nn.Module, placement: str) -> LayerCost:
    hidden = _hidden(layer)
    per_adapter = LayerCost(fixed=hidden, unit=2 * hidden + 1)  # down (h*s + s) + up (s*h + h)
    n = len(PLACEMENTS[placement])
    return LayerCost(per_adapter.fixed * n, per_adapter.unit * n)


def attach_adapters(layer: nn.Module, bottleneck: int, placement: str) -> list[nn.Module]:
    """Adapters after the attention output and/or the FFN output projection (after its dropout)."""
    if placement not in PLACEMENTS:
        raise SiftError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    sublayers = {"attention": layer.attention.output, "ffn": layer.output}
    added = []
    for where in PLACEMENTS[placement]:
        sublayer = sublayers[where]
        sublayer.adapter = Adapter(_hidden(layer), bottleneck)
        sublayer.dropout.register_forward_hook(sublayer.adapter.after)
        added.append(sublayer.adapter)
    return added


# ---- prefix tuning --------------------------------------------------------------------------------
# The prefix enters through transformers' documented AttentionInterface: the model's attention implementation
# is switched to one of ours, which prepends a module's prefix keys and values and widens the mask, then runs
# sdpa or eager attention. It relies on no argument name of the attention modules, and a forward hook checks
# on every call that the prefix was applied, so a release that routes around it fails loudly, never silently.
PREFIX_ATTENTION = "sift_prefix_"  # + the attention it wraps: sift_prefix_sdpa, sift_prefix_eager


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + additive mask) v, the textbook attention (transformers keeps one per model)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.dropout(torch.softmax(weights, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _prefix_attention(base: str):
    from transformers import AttentionInterface

    inner = _eager_attention if base == "eager" else AttentionInterface()[base]

    def attention(module, query, key, value, attention_mask, **kwargs):
        prefix = getattr(module, "prefix", None)
        if isinstance(prefix, Prefix):
            key, value, attention_mask = prefix.extend(key, value, attention_mask)
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_prefix_attention(model: nn.Module) -> None:
    """Switch the model to the prefix-aware version of its attention (sdpa or eager); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    current = model.config._attn_implementation
    if current.startswith(PREFIX_ATTENTION):
        return
    if current not in ("sdpa", "eager"):
        raise SiftError(f"prefix tuning supports sdpa or eager attention, not {current!r}")
    name = PREFIX_ATTENTION + current
    AttentionInterface.register(name, _prefix_attention(current))
    AttentionMaskInterface.register(name, AttentionMaskInterface()[current])  # the masks `current` gets
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise SiftError(f"{type(model).__name__} does not let prefix tuning set its attention implementation")


class Prefix(nn.Module):
    """Li & Liang (2021) prefix of one layer: `length` key/value vectors made by a small MLP from free vectors.

    The MLP (hidden -> mlp_hidden -> tanh -> 2 * kv width) is the reparameterisation that stabilises
    training; it trains, so it counts. It belongs to this layer alone, so every layer's cost is its own.
    """

    def __init__(self, hidden: int, kv_width: int, num_heads: int, length: int, mlp_hidden: int):
        super().__init__()
        self.num_heads, self.length = num_heads, length
        self.embedding = nn.Parameter(torch.randn(length, hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, 2 * kv_width))
        self.applied = False  # set by the attention in each forward; checked by the forward hook

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values shaped (1, heads, length, head size), as the attention holds them."""
        keys, values = self.mlp(self.embedding).view(self.length, 2, self.num_heads, -1).permute(1, 2, 0, 3)
        return keys.unsqueeze(0), values.unsqueeze(0)

    def extend(self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None):
        """Prepend the prefix to keys and values (batch, heads, positions, head size) and let every query see it.

        The mask is boolean (True: attend) or additive (0: attend), shaped (..., queries, positions), or None.
        """
        keys, values = self.key_values()
        if key.dim() != 4 or key.shape[1] != self.num_heads or key.shape[-1] != keys.shape[-1] \
                or value.shape != key.shape:
            raise SiftError(f"prefix tuning: the attention's keys {tuple(key.shape)} and values {tuple(value.shape)} "
                            f"are not (batch, {self.num_heads} heads, positions, {keys.shape[-1]})")
        if mask is not None:
            if mask.shape[-1] != key.shape[2]:
                raise SiftError(f"prefix tuning: the attention mask {tuple(mask.shape)} does not cover the "
                                f"{key.shape[2]} key positions")
            attend = torch.ones if mask.dtype == torch.bool else torch.zeros
            mask = torch.cat([attend(*mask.shape[:-1], self.length, dtype=mask.dtype, device=mask.device), mask], -1)
        batch = key.shape[0]
        key = torch.cat([keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([values.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        self.applied = True
        return key, value, mask

    def before(self, module, args):
        self.applied = False

    def after(self, module, args, output):
        if not self.applied:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise SiftError(f"prefix tuning: the self-attention ran without its prefix (attention implementation "
                            f"{implementation!r}); this transformers release dispatches attention differently")


def prefix_cost(layer: nn.Module, mlp_hidden: int) -> LayerCost:
    hidden, kv = _hidden(layer), _kv_width(layer)
    mlp = hidden * mlp_hidden + mlp_hidden + mlp_hidden * 2 * kv + 2 * kv
    return LayerCost(fixed=mlp, unit=hidden)


def attach_prefix(model: nn.Module, layer: nn.Module, length: int, mlp_hidden: int) -> list[nn.Module]:
    """A prefix on one layer's self-attention (and the model switched to the prefix-aware attention)."""
    use_prefix_attention(model)
    attention = layer.attention.self
    attention.prefix = Prefix(_hidden(layer), _kv_width(layer), attention.num_attention_heads, length, mlp_hidden)
    attention.register_forward_pre_hook(attention.prefix.before)
    attention.register_forward_hook(attention.prefix.after)
    return [attention.prefix]


# ---- BitFit ----------------------------------------------------------------------------------------
def layer_biases(layer: nn.Module) -> list[nn.Parameter]:
    """The layer's own bias terms (call before attaching anything that brings biases of its own)."""
    return [param for name, param in layer.named_parameters() if name.endswith("bias")]


def bitfit_cost(layer: nn.Module) -> LayerCost:
    return LayerCost(fixed=sum(p.numel() for p in layer_biases(layer)), unit=0)


# ---- LoRA (peft) -------------------------------------------------------------------------------------
def _lora_targets(layer: nn.Module, targets: list[str]) -> list[nn.Linear]:
    found = [module for name, module in layer.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not found or not all(isinstance(m, nn.Linear) for m in found):
        raise SiftError(f"LoRA targets {targets} must name Linear modules of each layer")
    return found


def lora_cost(layer: nn.Module, targets: list[str]) -> LayerCost:
    return LayerCost(fixed=0, unit=sum(m.in_features + m.out_features for m in _lora_targets(layer, targets)))


def attach_lora(model: nn.Module, ranks: dict[int, int], targets: list[str], alpha_per_rank: float,
                dropout: float) -> list[nn.Module]:
    """LoRA on the `targets` of the layers in `ranks` (layer index -> rank), one peft injection."""
    layers = encoder_layers(model, "lora")
    names = layer_names(model, layers)
    for index in ranks:
        _lora_targets(layers[index], targets)
    first_rank = next(iter(ranks.values()))
    patterns = {re.escape(names[i]) + r"\..*": r for i, r in ranks.items()}
    config = LoraConfig(
        r=first_rank,
        lora_alpha=alpha_per_rank * first_rank,
        lora_dropout=dropout,
        target_modules=list(targets),
        layers_to_transform=sorted(ranks),
        layers_pattern="layer",
        rank_pattern=patterns,
        alpha_pattern={key: alpha_per_rank * r for key, r in patterns.items()},
    )
    inject_adapter_in_model(config, model)
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]


# ---- what trains -----------------------------------------------------------------------------------
def train_only(model: nn.Module, modules: list[nn.Module], params: list[nn.Parameter], head: set[str]) -> None:
    """Train the given modules' and parameters' entries and the task head; freeze everything else."""
    keep = {id(p) for module in modules for p in module.parameters()} | {id(p) for p in params}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in keep or name in head)
