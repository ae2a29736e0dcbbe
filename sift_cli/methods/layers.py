"""Per-layer PEFT strategies for BERT/RoBERTa encoders: where each attaches, and what one layer of it costs.

`adapter`, `prefix`, `s4` and `unipelt` all place strategies on chosen layers, so the attachment and the
parameter-cost model live here once. Every strategy states its cost per layer as `fixed + unit * size`
(`LayerCost`), which is what the S4 budget rule solves for; the tests check that the modules attached
have exactly that many parameters.

Adapters and prefixes are our own modules (adapters attached with forward hooks, prefixes through the
attention interface), so the checkpoint's parameter names stay as they are (BitFit still finds its biases
by name): peft has no bottleneck adapter, and its prefix tuning feeds a cache to the whole model, so it
cannot put a prefix on some layers only. LoRA goes through peft (`layers_to_transform` picks the layers,
`rank_pattern` gives each layer its rank), except UniPELT's gated LoRA, which peft does not have.
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
# AdapterHub's computation (the S4 code is built on it): the adapter reads the sub-layer's output h (Houlsby)
# or LN(h + x), the sub-layer's own LayerNorm over h plus its residual input x (Pfeiffer); its output f is
# added to h, and the sub-layer then applies its LayerNorm to h + f + x as usual. With a gate (UniPELT), f is
# scaled by the mean over positions of sigmoid(gate(adapter input)).
ADAPTER_ACTIVATIONS = {"relu": nn.functional.relu, "swish": nn.functional.silu, "gelu": nn.functional.gelu}
PLACEMENT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's HoulsbyConfig, PfeifferConfig
ADAPTER_INITS = ("bert", "houlsby", "identity")


class Adapter(nn.Module):
    """h + up(activation(down(a))), a = h or LN(h + x) (`norm`: the sub-layer's LayerNorm, read only).

    `init`: `bert`, AdapterHub's default (every weight N(0, 0.02), biases 0); `houlsby`, Houlsby et al.'s
    near-identity (weights N(0, 1e-2) truncated at two standard deviations); `identity`, down N(0, 1e-2) and
    up 0, so the adapted model starts exactly as the pre-trained one.
    """

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", init: str = "bert",
                 gated: bool = False, norm: nn.Module | None = None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.gate = nn.Linear(hidden, 1) if gated else None
        self.activation = ADAPTER_ACTIVATIONS[activation]
        self._norm = (norm,)  # not a submodule: the LayerNorm belongs to the model
        self.residual: torch.Tensor | None = None  # the sub-layer's residual input, for the Pfeiffer placement
        for linear in (self.down, self.up, self.gate):
            if linear is not None:
                nn.init.zeros_(linear.bias)
        if init == "bert":
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=0.02)
        elif init == "houlsby":
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.up.weight)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        norm = self._norm[0]
        read = hidden_states if norm is None else norm(hidden_states + residual)
        out = self.up(self.activation(self.down(read)))
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(read)).mean(dim=1, keepdim=True)
        return hidden_states + out

    def before(self, module, args, kwargs):
        """Forward pre-hook on the sub-layer: keep its residual input x (its second argument)."""
        self.residual = args[1] if len(args) > 1 else kwargs.get("input_tensor")

    def after(self, module, args, output):
        """Forward hook on the sub-layer's dropout: adapt its output before the residual sum and LayerNorm."""
        if self._norm[0] is None:
            return self(output)
        residual, self.residual = self.residual, None
        if residual is None or residual.shape != output.shape:
            raise SiftError("adapter (pfeiffer placement): the sub-layer's residual input did not reach the adapter")
        return self(output, residual)


def adapter_cost(layer: nn.Module, placement: str, gated: bool = False) -> LayerCost:
    hidden = _hidden(layer)
    per_adapter = LayerCost(fixed=hidden + (hidden + 1 if gated else 0), unit=2 * hidden + 1)  # down, up (+gate)
    n = len(PLACEMENTS[placement])
    return LayerCost(per_adapter.fixed * n, per_adapter.unit * n)


def attach_adapters(layer: nn.Module, bottleneck: int, placement: str, activation: str | None = None,
                    init: str = "bert", gated: bool = False) -> list[nn.Module]:
    """Adapters after the attention output and/or the FFN output projection (after its dropout);
    `activation` None is AdapterHub's for the placement."""
    if placement not in PLACEMENTS:
        raise SiftError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    sublayers = {"attention": layer.attention.output, "ffn": layer.output}
    added = []
    for where in PLACEMENTS[placement]:
        sublayer = sublayers[where]
        sublayer.adapter = Adapter(_hidden(layer), bottleneck, activation or PLACEMENT_ACTIVATION[placement], init,
                                   gated, norm=sublayer.LayerNorm if placement == "pfeiffer" else None)
        if placement == "pfeiffer":
            sublayer.register_forward_pre_hook(sublayer.adapter.before, with_kwargs=True)
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
    """Li & Liang (2021) prefix of one layer: `length` key/value vectors made by an MLP from free vectors.

    The MLP (hidden -> mlp_hidden -> tanh -> 2 * kv width) is the reparameterisation that stabilises
    training; it trains, so it counts. By default it belongs to this layer alone, so every layer's cost is its
    own; given a `pool` (a PrefixPool), the layer's keys and values are its share of the pool's output instead.
    With a gate (UniPELT), the layer's own keys and values are scaled by the mean over positions of
    sigmoid(gate(layer input)), as the design-spaces code does.
    """

    def __init__(self, hidden: int, kv_width: int, num_heads: int, length: int, mlp_hidden: int,
                 pool: "PrefixPool | None" = None, index: int = 0, gated: bool = False):
        super().__init__()
        self.num_heads, self.length = num_heads, length
        if pool is None:
            self.embedding = nn.Parameter(torch.randn(length, hidden))
            self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, 2 * kv_width))
        self._pool = (pool, index)  # not a submodule: the pool is the model's, shared by the layers
        self.gate = nn.Linear(hidden, 1) if gated else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)  # the bias keeps nn.Linear's default, as in that code
        self.layer_input: torch.Tensor | None = None
        self.applied = False  # set by the attention in each forward; checked by the forward hook

    def generated(self) -> torch.Tensor:
        """(length, 2 * kv width): the keys, then the values, of every prefix position."""
        pool, index = self._pool
        return self.mlp(self.embedding) if pool is None else pool.layer_output(index)

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values shaped (1, heads, length, head size), as the attention holds them."""
        keys, values = self.generated().view(self.length, 2, self.num_heads, -1).permute(1, 2, 0, 3)
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
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(self.layer_input)).mean(dim=1).view(batch, 1, 1, 1)
            key, value = key * gate, value * gate
        key = torch.cat([keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([values.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        self.applied = True
        return key, value, mask

    def before(self, module, args):
        self.applied = False
        self.layer_input = args[0] if self.gate is not None else None

    def after(self, module, args, output):
        if not self.applied:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise SiftError(f"prefix tuning: the self-attention ran without its prefix (attention implementation "
                            f"{implementation!r}); this transformers release dispatches attention differently")


def prefix_cost(layer: nn.Module, mlp_hidden: int) -> LayerCost:
    hidden, kv = _hidden(layer), _kv_width(layer)
    mlp = hidden * mlp_hidden + mlp_hidden + mlp_hidden * 2 * kv + 2 * kv
    return LayerCost(fixed=mlp, unit=hidden)


class PrefixPool(nn.Module):
    """The reparameterisation of Li & Liang (2021) and AdapterHub: one MLP (hidden -> mlp_hidden -> tanh ->
    layers x 2 x kv width) makes every layer's prefix from `length` free vectors. Only its output is needed
    after training (`kept` entries); the MLP trains, so it counts."""

    def __init__(self, hidden: int, kv_width: int, layers: int, length: int, mlp_hidden: int):
        super().__init__()
        self.layers, self.length = layers, length
        self.embedding = nn.Parameter(torch.randn(length, hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, layers * 2 * kv_width))
        self.kept = length * layers * 2 * kv_width

    def layer_output(self, index: int) -> torch.Tensor:
        return self.mlp(self.embedding).view(self.length, self.layers, -1)[:, index]


def prefix_pool_cost(hidden: int, kv_width: int, layers: int, length: int, mlp_hidden: int) -> int:
    return length * hidden + hidden * mlp_hidden + mlp_hidden + mlp_hidden * layers * 2 * kv_width + layers * 2 * kv_width


def attach_prefix(model: nn.Module, layer: nn.Module, length: int, mlp_hidden: int,
                  pool: PrefixPool | None = None, index: int = 0, gated: bool = False) -> list[nn.Module]:
    """A prefix on one layer's self-attention (and the model switched to the prefix-aware attention)."""
    use_prefix_attention(model)
    attention = layer.attention.self
    attention.prefix = Prefix(_hidden(layer), _kv_width(layer), attention.num_attention_heads, length, mlp_hidden,
                              pool, index, gated)
    attention.register_forward_pre_hook(attention.prefix.before)
    attention.register_forward_hook(attention.prefix.after)
    return [attention.prefix]


def attach_shared_prefix(model: nn.Module, length: int, mlp_hidden: int, gated: bool = False) -> list[nn.Module]:
    """A prefix on every layer, all made by one PrefixPool (held by the encoder as `prefix_pool`)."""
    layers = encoder_layers(model, "prefix")
    pool = PrefixPool(_hidden(layers[0]), _kv_width(layers[0]), len(layers), length, mlp_hidden)
    model.base_model.encoder.prefix_pool = pool
    return [pool, *(p for i, layer in enumerate(layers) for p in attach_prefix(model, layer, length, mlp_hidden,
                                                                                 pool, i, gated))]


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


class GatedLoRA(nn.Module):
    """LoRA with a gate, as the design-spaces code builds it for UniPELT: y + g * (x A^T B^T), where
    g = mean over positions of sigmoid(gate(x)) takes the place of alpha / r; A is nn.Linear's init, B zero."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.gate = nn.Linear(linear.in_features, 1)
        nn.init.normal_(self.gate.weight, std=0.02)

    def after(self, module, args, output):
        x = args[0]
        return output + (x @ self.A.T @ self.B.T) * torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)


def attach_gated_lora(layer: nn.Module, targets: list[str], rank: int) -> list[nn.Module]:
    added = []
    for linear in _lora_targets(layer, targets):
        linear.gated_lora = GatedLoRA(linear, rank)
        linear.register_forward_hook(linear.gated_lora.after)
        added.append(linear.gated_lora)
    return added


# ---- what trains -----------------------------------------------------------------------------------
def train_only(model: nn.Module, modules: list[nn.Module], params: list[nn.Parameter], head: set[str]) -> None:
    """Train the given modules' and parameters' entries and the task head; freeze everything else."""
    keep = {id(p) for module in modules for p in module.parameters()} | {id(p) for p in params}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in keep or name in head)
