"""The memory model: the sizes of an architecture, what a method trains on it (`Method.memory_plan`), and
the bytes of one training step that follow (`predict`).

Parts (bytes; GiB = 2^30 bytes, what torch reports, and what the SIFT paper's "GB" turn out to be):
weights (with the parameters a method adds: LoRA, adapters, sparse values), buffers (sparse indices and
copies of pre-trained weights), gradients, master weights (optional), AdamW's m and v, and activations
(sift_cli/memory/activations.py): the tensors autograd keeps for the backward at the end of the forward,
plus, under gradient checkpointing, the one block rebuilt during the backward. `evaluation_bytes` is the
transient of a forward pass without gradients over one evaluation batch (trainer.eval_tokens tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from sift_cli.config import CONFIG_DIR
from sift_cli.errors import SiftError

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
INDEX_BYTES = 8  # int64
LORA_BYTES = 4  # peft keeps LoRA weights in fp32 even on a 16-bit model (autocast_adapter_dtype)
SPARSE_LAYOUTS = ("sift-run", "paper")
ENCODER_TYPES = ("bert", "roberta")
DECODER_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class Architecture:
    """The dimensions memory depends on.

    `encoder`: post-LayerNorm BERT/RoBERTa, GELU MLP, sequence-classification head (this project's GLUE runs);
    `decoder`: pre-RMSNorm LLaMA, gated SiLU MLP, language-model head (the SIFT paper's instruction tuning).
    """

    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None
    positions: int = 0  # learned position embeddings (encoders)
    token_types: int = 0
    tied_embeddings: bool = False
    roberta_head: bool = False  # a new dense + out_proj head; BERT's pooler comes with the checkpoint

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * (self.kv_heads or self.heads)


# Public architecture facts, for models whose config is not at hand (conf/model's copies name hub ids).
_LLAMA_7B = Architecture("decoder", hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
KNOWN_ARCHITECTURES = {
    "llama-7b": _LLAMA_7B,
    "llama-2-7b": _LLAMA_7B,
    "llama-13b": Architecture("decoder", hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32000),
}


@dataclass(frozen=True)
class Linear:
    name: str  # as in the model, e.g. "attention.self.query" (in every block) or "pooler.dense"
    fan_in: int
    fan_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + self.fan_out * self.bias


@dataclass(frozen=True)
class Setting:
    """One training step to predict: the batch and how its numbers are stored."""

    batch: int = 1
    seq: int = 512
    precision: str = "fp32"  # weights and activations: fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    master_weights: bool = False  # an fp32 copy of 16-bit trainable weights (mixed precision)
    adam_dtype: str = "fp32"  # fp32 | weights (torch's AdamW keeps m and v in the parameter's dtype)
    attention: str = "sdpa"  # sdpa (transformers' default) | eager (keeps scores and probabilities)
    device: str = "cuda"  # dropout masks are 1-byte bools on a GPU, activation-sized on a CPU
    sparse_layout: str = "sift-run"  # sift-run: SparseLinear on the targets | paper: in place, every parameter
    num_labels: int = 2


@dataclass(frozen=True)
class Training:
    """What trains, as the activations see it: each linear's mode and the extra modules."""

    linears: dict[str, str]  # linear name -> dense | sparse | mixed (mixout) | lora | bias | frozen
    norms: str = "all"  # all | bias | frozen (every LayerNorm/RMSNorm, the embedding LayerNorm too)
    embeddings: bool = True  # the embedding tables
    lora_rank: int = 0
    lora_dropout: bool = False
    adapter_width: int = 0
    adapter_places: tuple[str, ...] = ()
    adapter_activation: str = "relu"  # relu keeps only its output; swish and gelu their input too
    adapter_reads_norm: bool = False  # Pfeiffer: the adapter reads LN(h + x), a LayerNorm more per place
    prefix: int = 0
    dropout: bool = True


@dataclass
class Plan:
    """What a method adds and trains: (entries, bytes per entry) pairs, and the buffers it adds."""

    training: Training
    trainable: list[tuple[int, int]]
    added: list[tuple[int, int]] = field(default_factory=list)
    buffers: int = 0


PARTS = ("weights", "buffers", "gradients", "master_weights", "optimizer", "activations", "recompute")


@dataclass
class Breakdown:
    """The predicted bytes, part by part (PARTS)."""

    weights: int
    buffers: int
    gradients: int
    master_weights: int
    optimizer: int
    activations: int  # kept for the backward at the end of the forward
    recompute: int  # the block rebuilt during the backward (gradient checkpointing)
    trainable_params: int
    total_params: int

    @property
    def after_forward(self) -> int:
        return self.total - self.recompute

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in PARTS)


# ---- architecture ---------------------------------------------------------------------------------------
def architecture_of(config) -> Architecture:
    """An Architecture from a transformers config (BERT, RoBERTa, LLaMA, Mistral)."""
    kind = config.model_type
    common = dict(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                  intermediate=config.intermediate_size, vocab=config.vocab_size)
    if kind in ENCODER_TYPES:
        return Architecture("encoder", **common, positions=config.max_position_embeddings,
                            token_types=config.type_vocab_size, roberta_head=kind == "roberta")
    if kind in DECODER_TYPES:
        return Architecture("decoder", **common, kv_heads=getattr(config, "num_key_value_heads", None),
                            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
    raise SiftError(f"model type '{kind}' is not modelled; supported: {', '.join(ENCODER_TYPES + DECODER_TYPES)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_architecture(spec: str) -> Architecture:
    """A known architecture (`llama-7b`), a config folder or config.json, or a model name of conf/model/.

    Hub ids are read from the local Hugging Face cache only: this never downloads.
    """
    from transformers import AutoConfig

    from sift_cli.models import resolve_location

    if spec in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[spec]
    path = Path(spec)
    if path.exists():
        try:
            return architecture_of(AutoConfig.from_pretrained(path.parent if path.is_file() else path))
        except (OSError, ValueError) as err:
            raise SiftError(f"cannot read a model config from {path}: {_first_line(err)}") from None
    model_file = Path(CONFIG_DIR) / "model" / f"{spec}.yaml"
    if not model_file.exists():
        names = sorted(KNOWN_ARCHITECTURES) + sorted(p.stem for p in model_file.parent.glob("*.yaml"))
        raise SiftError(f"unknown model '{spec}': give a config folder or one of {', '.join(names)}")
    mcfg = OmegaConf.load(model_file)
    overrides = dict(OmegaConf.to_container(mcfg.config)) if mcfg.config is not None else {}
    model_type = overrides.pop("model_type", None)
    if model_type is not None:
        return architecture_of(AutoConfig.for_model(model_type, **overrides))
    location = resolve_location(mcfg.pretrained)
    if mcfg.get("gguf_file"):  # a GGUF file holds the config with the (quantised) weights
        overrides["gguf_file"] = mcfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(location, revision=mcfg.revision, local_files_only=True, **overrides)
    except (OSError, ValueError):
        raise SiftError(f"model '{spec}': the config of '{location}' is not in the local Hugging Face cache; "
                        f"pass a folder holding its config.json") from None
    return architecture_of(config)


def block_linears(arch: Architecture) -> list[Linear]:
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_width
    if arch.family == "encoder":
        return [Linear("attention.self.query", h, h, True), Linear("attention.self.key", h, h, True),
                Linear("attention.self.value", h, h, True), Linear("attention.output.dense", h, h, True),
                Linear("intermediate.dense", h, i, True), Linear("output.dense", i, h, True)]
    return [Linear("self_attn.q_proj", h, h, False), Linear("self_attn.k_proj", h, kv, False),
            Linear("self_attn.v_proj", h, kv, False), Linear("self_attn.o_proj", h, h, False),
            Linear("mlp.gate_proj", h, i, False), Linear("mlp.up_proj", h, i, False),
            Linear("mlp.down_proj", i, h, False)]


def head_linears(arch: Architecture, num_labels: int) -> list[Linear]:
    """The task head: new parameters, so every method trains them (none for a language-model head)."""
    h = arch.hidden
    if arch.family == "decoder":
        return []
    if arch.roberta_head:
        return [Linear("classifier.dense", h, h, True), Linear("classifier.out_proj", h, num_labels, True)]
    return [Linear("classifier", h, num_labels, True)]


def backbone_top_linears(arch: Architecture) -> list[Linear]:
    """Linear layers after the blocks that come with the checkpoint (BERT's pooler, an untied LM head)."""
    if arch.family == "encoder":
        return [] if arch.roberta_head else [Linear("pooler.dense", arch.hidden, arch.hidden, True)]
    return [] if arch.tied_embeddings else [Linear("lm_head", arch.hidden, arch.vocab, False)]


def norm_params(arch: Architecture) -> int:
    """Entries of one LayerNorm (weight and bias) or RMSNorm (weight)."""
    return 2 * arch.hidden if arch.family == "encoder" else arch.hidden


def embedding_params(arch: Architecture) -> int:
    return arch.hidden * (arch.vocab + arch.positions + arch.token_types)


def pretrained_tensor_sizes(arch: Architecture) -> list[int]:
    """The entries of every tensor that comes with the checkpoint (the task head left out), one per tensor:
    what a sparse method with `target_modules=all_params` chooses from."""
    h = arch.hidden
    embeddings = [h * arch.vocab] + [h * n for n in (arch.positions, arch.token_types) if n]
    norm = [h, h] if arch.family == "encoder" else [h]  # LayerNorm weight and bias, or RMSNorm weight
    block = [size for lin in block_linears(arch) for size in [lin.fan_in * lin.fan_out] + [lin.fan_out] * lin.bias]
    top = [size for lin in backbone_top_linears(arch) for size in [lin.fan_in * lin.fan_out] + [lin.fan_out] * lin.bias]
    return embeddings + norm + (block + 2 * norm) * arch.layers + top


def total_params(arch: Architecture, num_labels: int) -> int:
    block = sum(lin.params for lin in block_linears(arch)) + 2 * norm_params(arch)
    after = sum(lin.params for lin in backbone_top_linears(arch) + head_linears(arch, num_labels))
    # encoders: the embedding LayerNorm; decoders: the final RMSNorm
    return embedding_params(arch) + norm_params(arch) + arch.layers * block + after

# ---- what a method trains (each method's memory_plan reads these) ---------------------------------------
def is_target(name: str, targets) -> bool:
    """The suffix rule of `find_targets` (sift_cli/methods/sparse.py) and of peft's target_modules."""
    return targets == "all_linear" or any(name == t or name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class Parts:
    """The model as a method's memory plan sees it."""

    arch: Architecture
    setting: Setting

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.setting.precision]

    @property
    def blocks(self) -> list[Linear]:
        return block_linears(self.arch)

    @property
    def top(self) -> list[Linear]:
        return backbone_top_linears(self.arch)

    @property
    def head(self) -> list[Linear]:
        return head_linears(self.arch, self.setting.num_labels)

    @property
    def head_params(self) -> int:
        return sum(lin.params for lin in self.head)

    @property
    def head_modes(self) -> dict[str, str]:
        return {lin.name: "dense" for lin in self.head}

    @property
    def dense_modes(self) -> dict[str, str]:
        """Every linear layer trained densely (full fine-tuning)."""
        return {lin.name: "dense" for lin in self.blocks + self.top + self.head}

    @property
    def pretrained_tensor_sizes(self) -> list[int]:
        return pretrained_tensor_sizes(self.arch)

    @property
    def everything(self) -> int:
        return total_params(self.arch, self.setting.num_labels)

    def matching(self, targets, with_head: bool = False) -> tuple[list[Linear], list[Linear]]:
        """The block linears and the linears after the blocks (with the head, if asked) that `targets` names."""
        targets = targets if isinstance(targets, str) else list(targets)
        after = self.top + (self.head if with_head else [])
        return ([lin for lin in self.blocks if is_target(lin.name, targets)],
                [lin for lin in after if is_target(lin.name, targets)])

    def encoder_only(self, method: str) -> None:
        if self.arch.family != "encoder":
            raise SiftError(f"method={method} supports BERT/RoBERTa encoders only")


# ---- the prediction ------------------------------------------------------------------------------------
def method_for(name: str, overrides: dict | None = None):
    """Method `name` as conf/method/NAME.yaml defines it, with `overrides` (None values keep the file's)."""
    from sift_cli.config import compose
    from sift_cli.methods import build_method

    if not (Path(CONFIG_DIR) / "method" / f"{name}.yaml").exists():
        choices = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
        raise SiftError(f"unknown method '{name}'; choose from: {', '.join(choices)}")
    chosen = {key: value for key, value in (overrides or {}).items() if value is not None}
    cfg = compose([f"method={name}", *(f"method.{key}={value}" for key, value in chosen.items())])
    return build_method(cfg.method)


def predict(arch: Architecture, method, setting: Setting, method_overrides: dict | None = None) -> Breakdown:
    """The bytes of one training step of `method` (a built method, or a conf/method name with overrides)."""
    from sift_cli.memory.activations import Activations

    _check_setting(setting)
    if isinstance(method, str):
        method = method_for(method, method_overrides)
    plan = method.memory_plan(Parts(arch, setting))
    w = DTYPE_BYTES[setting.precision]
    everything = total_params(arch, setting.num_labels)
    model_buffers = 2 * arch.positions * INDEX_BYTES if arch.family == "encoder" else 0  # position, type ids

    def adam_bytes(dtype_bytes: int) -> int:
        return 4 if setting.adam_dtype == "fp32" or setting.master_weights else dtype_bytes

    activations, recompute = Activations(arch, setting, plan.training).measure()
    return Breakdown(
        weights=everything * w + sum(n * b for n, b in plan.added),
        buffers=model_buffers + plan.buffers,
        gradients=sum(n * b for n, b in plan.trainable),
        master_weights=sum(4 * n for n, b in plan.trainable if b < 4) if setting.master_weights else 0,
        optimizer=sum(2 * n * adam_bytes(b) for n, b in plan.trainable),
        activations=activations,
        recompute=recompute,
        trainable_params=sum(n for n, _ in plan.trainable),
        total_params=everything,
    )


def evaluation_bytes(arch: Architecture, tokens: int, precision: str, logit_positions: int) -> int:
    """The widest moment of a forward pass without gradients over one evaluation batch of `tokens` tokens:
    nothing is kept for a backward, so a block's tensors are freed as it goes. Counted: the residual
    stream, the normed input and the attention's query, output and projection (PyTorch's fused attention keeps
    no sequence x sequence scores, on a CPU too), or the MLP's widest moment (a gated MLP holds the SiLU of the
    gate, the up-projection and their product; a GELU MLP its input and output); a language model adds the
    fp32 logits of `logit_positions` positions and their log-softmax (sift_cli/batching.py)."""
    act = DTYPE_BYTES[precision]
    mlp = 3 * arch.intermediate if arch.family == "decoder" else 2 * arch.intermediate
    widest = act * tokens * (2 * arch.hidden + max(mlp, 3 * arch.hidden + 2 * arch.kv_width))
    logits = (act + 2 * 4) * logit_positions * arch.vocab if arch.family == "decoder" else 0
    return widest + logits


def _check_setting(setting: Setting) -> None:
    checks = [(setting.batch >= 1, f"the batch must be at least 1, got {setting.batch}"),
              (setting.seq >= 1, f"the sequence length must be at least 1, got {setting.seq}"),
              (setting.precision in DTYPE_BYTES, f"precision must be one of {', '.join(DTYPE_BYTES)}"),
              (setting.attention in ("sdpa", "eager"), "attention must be sdpa or eager"),
              (setting.device in ("cuda", "cpu"), "device must be cuda or cpu"),
              (setting.sparse_layout in SPARSE_LAYOUTS, f"sparse layout must be one of {', '.join(SPARSE_LAYOUTS)}"),
              (setting.num_labels >= 1, f"the number of labels must be at least 1, got {setting.num_labels}")]
    for ok, message in checks:
        if not ok:
            raise SiftError(message)

