"""Load a model and its tokenizer from a hub id, a local directory or a folder inside a Python package.

Two model settings reach every method, because they change the model before any method sees it:
`model.head` picks the classification head (`default`: the architecture's own, e.g. BERT's pre-trained
pooler then a new linear layer; `cls_linear`: one new linear layer on the final hidden state of the first
token, after a dropout of `model.head_dropout`, with no pooler, as the PAC-tuning and grafting code build
it), and `model.dropout` sets every dropout probability of the model, the head's included (null: as
configured).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sift_cli.errors import SiftError

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    # Parameters that the checkpoint did not provide (the task head): every method trains them.
    new_params: set[str] = field(default_factory=set)
    total_params: int = 0


def resolve_location(spec: str | None) -> str | None:
    """`pkg:NAME/SUB/DIR` is a folder inside the installed package NAME; anything else is used as given."""
    if spec is None or not str(spec).startswith("pkg:"):
        return spec
    package, _, sub = str(spec)[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise SiftError(f"model location '{spec}': Python package '{package}' is not installed")
    path = Path(found.origin).parent / sub
    if not path.exists():
        raise SiftError(f"model location '{spec}': {path} does not exist")
    return str(path)


def load_tokenizer(mcfg: DictConfig):
    location = resolve_location(mcfg.tokenizer or mcfg.pretrained)
    if location is None:
        raise SiftError(f"model '{mcfg.name}' names neither a pretrained location nor a tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code, **_gguf_args(mcfg)
        )
    except (OSError, ValueError) as err:
        raise SiftError(f"cannot load the tokenizer of '{location}': {_first_line(err)}") from None
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, masked out by attention_mask
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_args(mcfg: DictConfig) -> dict:
    """`model.gguf_file`: a llama.cpp GGUF file in the model location, which holds weights and tokenizer."""
    gguf_file = mcfg.get("gguf_file")
    return {"gguf_file": gguf_file} if gguf_file else {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _head_params(model: torch.nn.Module) -> set[str]:
    """For a randomly initialised model: the parameters outside the backbone (what a checkpoint lacks)."""
    prefix = getattr(model, "base_model_prefix", "")
    return {name for name, _ in model.named_parameters() if prefix and not name.startswith(prefix + ".")}


@functools.lru_cache(maxsize=8)
def _stored_config(location: str, revision: str | None, trust_remote_code: bool, gguf_file: str | None):
    """A checkpoint's config (a GGUF file's takes seconds to parse: once per process)."""
    return AutoConfig.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code,
                                      **({"gguf_file": gguf_file} if gguf_file else {}))


# ---- the classification head and dropout ------------------------------------------------------------------
class FirstToken(torch.nn.Module):
    """In place of a BERT-style pooler: the final hidden state of the first token, unchanged (no parameters)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


class ClsLinearHead(torch.nn.Module):
    """In place of a RoBERTa-style head: dropout, then one linear layer on the first token's final state."""

    def __init__(self, out: torch.nn.Linear, dropout: float):
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.out = out

    def forward(self, features: torch.Tensor, **_) -> torch.Tensor:
        return self.out(self.dropout(features[:, 0]))


def use_cls_linear_head(model: torch.nn.Module, num_labels: int, dropout: float, seed: int) -> set[str]:
    """`model.head=cls_linear`: replace the model's head by one linear layer on the first token's final hidden
    state, initialised as torch.nn.Linear is (the published code creates it so) from `seed`; the pooler goes.
    Returns the new layer's parameter names."""
    base = model.base_model
    head = getattr(model, "classifier", None)
    config = model.config
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # the CPU generator only, restored afterwards
        torch.random.default_generator.manual_seed(seed)
        layer = torch.nn.Linear(config.hidden_size, num_labels)
    layer.to(device=reference.device, dtype=reference.dtype)
    if isinstance(head, torch.nn.Linear) and hasattr(base, "pooler") and hasattr(model, "dropout"):  # BERT
        base.pooler = FirstToken()
        model.dropout = torch.nn.Dropout(dropout)
        model.classifier = layer
        return {"classifier.weight", "classifier.bias"}
    if isinstance(head, torch.nn.Module) and hasattr(head, "out_proj"):  # RoBERTa
        model.classifier = ClsLinearHead(layer, dropout)
        return {"classifier.out.weight", "classifier.out.bias"}
    raise SiftError(f"model.head=cls_linear supports BERT- and RoBERTa-style sequence classifiers; "
                    f"{type(model).__name__} is neither")


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every dropout probability to `p` (dropout modules, and float rates read at run time); returns how
    many were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != p:
            module.p = p
            count += 1
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) != p:
                setattr(module, attr, p)
                count += 1
    return count


def head_dropout(mcfg: DictConfig) -> float:
    """The dropout before a `cls_linear` head: model.dropout when set, else model.head_dropout."""
    value = mcfg.get("dropout")
    return float(mcfg.get("head_dropout", 0.0) if value is None else value)


def skeleton(mcfg: DictConfig) -> torch.nn.Module | None:
    """The model's modules without weights (on the meta device), built from its config alone, for the checks
    that run before anything loads; None when the config cannot be read without a download."""
    auto_class = AutoModelForCausalLM if mcfg.get("kind", "encoder") == "causal_lm" else AutoModelForSequenceClassification
    overrides = OmegaConf.to_container(mcfg.config, resolve=True) if mcfg.config is not None else {}
    model_type = overrides.pop("model_type", None)
    try:
        if model_type is not None:
            config = AutoConfig.for_model(model_type, **overrides)
        else:
            config = copy.deepcopy(_stored_config(resolve_location(mcfg.pretrained), mcfg.revision,
                                                  bool(mcfg.trust_remote_code), mcfg.get("gguf_file")))
            for key, value in overrides.items():
                setattr(config, key, value)
        with torch.device("meta"):
            model = auto_class.from_config(config)
    except (OSError, ValueError, SiftError):
        return None
    if auto_class is AutoModelForSequenceClassification and mcfg.get("head", "default") == "cls_linear":
        use_cls_linear_head(model, config.num_labels, head_dropout(mcfg), 0)
    return model


def load_classifier(mcfg: DictConfig, num_labels: int, tokenizer, seed: int) -> LoadedModel:
    """A sequence-classification model (one output = regression, as for STS-B)."""
    label_args = {"num_labels": num_labels}
    if num_labels == 1:
        label_args["problem_type"] = "regression"
    loaded = load_auto_model(AutoModelForSequenceClassification, mcfg, tokenizer, seed, **label_args)
    if mcfg.get("head", "default") == "cls_linear":
        head = use_cls_linear_head(loaded.model, num_labels, head_dropout(mcfg), seed)
        names = {name for name, _ in loaded.model.named_parameters()}
        loaded.new_params = (loaded.new_params & names) | head
        loaded.total_params = sum(p.numel() for p in loaded.model.parameters())
    return loaded


def load_auto_model(auto_class, mcfg: DictConfig, tokenizer, seed: int, **config_args) -> LoadedModel:
    """A model of one `AutoModelFor...` class, pre-trained or (init=random) freshly initialised with `seed`."""
    dtype = _DTYPES[mcfg.dtype]
    overrides = OmegaConf.to_container(mcfg.config, resolve=True) if mcfg.config is not None else {}
    if mcfg.init == "random":
        overrides = dict(overrides)
        model_type = overrides.pop("model_type", None)
        if model_type is not None:
            config = AutoConfig.for_model(model_type, **overrides, **config_args)
        else:
            location = resolve_location(mcfg.pretrained)
            config = AutoConfig.from_pretrained(location, **overrides, **config_args)
        config.pad_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = auto_class.from_config(config, dtype=dtype)
        new_params = _head_params(model)
    else:
        location = resolve_location(mcfg.pretrained)
        try:
            model, info = auto_class.from_pretrained(
                location,
                revision=mcfg.revision,
                trust_remote_code=mcfg.trust_remote_code,
                use_safetensors=True,
                dtype=dtype,
                output_loading_info=True,
                **overrides,
                **config_args,
            )
        except (OSError, ValueError, EnvironmentError) as err:
            raise SiftError(f"cannot load model '{mcfg.name}' from '{location}': {_first_line(err)}") from None
        mismatched = {key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"]}
        new_params = set(info["missing_keys"]) | mismatched
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if mcfg.get("dropout") is not None:
        set_dropout(model, float(mcfg.dropout))
    total = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, new_params=new_params, total_params=total)


def load_causal_lm(mcfg: DictConfig, tokenizer, seed: int) -> LoadedModel:
    """A decoder-only language model for instruction tuning (`model.kind: causal_lm`).

    A GGUF file (`model.gguf_file`) is dequantised to `model.dtype` on loading. Training pads on the right
    and needs no key/value cache; generation turns the cache back on per call.
    """
    kind = mcfg.get("kind", "encoder")
    if kind != "causal_lm":
        raise SiftError(f"model '{mcfg.name}' has model.kind={kind}; instruction tuning needs a causal language "
                        f"model (model.kind=causal_lm), e.g. model=smollm2-135m or model=tiny-llama")
    if mcfg.init == "random" and mcfg.config is not None and "vocab_size" in mcfg.config:
        _check_vocabulary(mcfg, tokenizer, int(mcfg.config.vocab_size))  # before building the embedding
    loaded = load_auto_model(AutoModelForCausalLM, mcfg, tokenizer, seed, **_gguf_args(mcfg))
    _check_vocabulary(mcfg, tokenizer, loaded.model.get_input_embeddings().num_embeddings)
    tokenizer.padding_side = "right"
    loaded.model.config.use_cache = False
    return loaded


def _check_vocabulary(mcfg: DictConfig, tokenizer, embeddings: int) -> None:
    if len(tokenizer) > embeddings:
        raise SiftError(f"model '{mcfg.name}': the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                        f"{embeddings}")
