"""Load a model and its tokenizer from a hub id, a local directory or a folder inside a Python package."""

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
            return auto_class.from_config(config)
    except (OSError, ValueError, SiftError):
        return None


def load_classifier(mcfg: DictConfig, num_labels: int, tokenizer, seed: int) -> LoadedModel:
    """A sequence-classification model (one output = regression, as for STS-B)."""
    label_args = {"num_labels": num_labels}
    if num_labels == 1:
        label_args["problem_type"] = "regression"
    return load_auto_model(AutoModelForSequenceClassification, mcfg, tokenizer, seed, **label_args)


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
