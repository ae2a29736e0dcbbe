"""Where the configs live, and the range checks a composed config must pass before any work starts."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig

from sift_cli.errors import SiftError

CONFIG_DIR = str(files("sift_cli.conf"))

SELECT_ON = ("auto", "dev", "validation", "heldout", "last")
PRECISIONS = ("auto", "no", "bf16", "fp16")
MODEL_INITS = ("pretrained", "random")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("linear", "constant", "linear_nominal")
OPTIMIZERS = ("adamw", "sgd")
MODEL_HEADS = ("default", "cls_linear")


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The config `sift-run OVERRIDES` would run, composed outside a Hydra app (sift-bench, sift-memory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def sweep_size(experiment: str) -> int:
    """How many jobs `sift-run -m experiment=NAME` launches: the product of its swept keys' value counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose([f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params or {}
    parser = OverridesParser.create()
    size = 1
    for key, value in params.items():
        [override] = parser.parse_overrides([f"{key}={value}"])
        size *= len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    return size


def available_options(group: str) -> list[str]:
    """The names a config group accepts (`task` lists `glue/sst2`, ...)."""
    folder = Path(CONFIG_DIR) / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SiftError(message)


def _positive_int(value, key: str, allow_null: bool = False) -> None:
    if value is None and allow_null:
        return
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"{key} must be a positive integer{' or null' if allow_null else ''}, got {value!r}")


def _choice(value, key: str, options) -> None:
    _need(value in options, f"{key} must be one of {', '.join(map(str, options))}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Reject out-of-range values with one line naming the key, before any data or model is loaded."""
    t, d, m = cfg.trainer, cfg.data, cfg.model
    _need(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed must be a non-negative integer, got {cfg.seed!r}")
    _need(isinstance(t.lr, (int, float)) and t.lr > 0, f"trainer.lr must be > 0, got {t.lr!r}")
    for key in ("batch_size", "grad_accum", "log_every"):
        _positive_int(t[key], f"trainer.{key}")
    _need(t.eval_tokens == "auto" or (isinstance(t.eval_tokens, int) and not isinstance(t.eval_tokens, bool)
                                      and t.eval_tokens >= 1),
          f"trainer.eval_tokens must be a positive integer or auto, got {t.eval_tokens!r}")
    train_tokens = t.get("train_tokens")
    _need(train_tokens in ("auto", None) or (isinstance(train_tokens, int) and not isinstance(train_tokens, bool)
                                            and train_tokens >= 1),
          f"trainer.train_tokens must be a positive integer, auto or null, got {train_tokens!r}")
    _need(isinstance(t.memory_check, bool), f"trainer.memory_check must be true or false, got {t.memory_check!r}")
    for key in ("max_steps", "eval_every", "eval_batch_size"):
        _positive_int(t[key], f"trainer.{key}", allow_null=True)
    if t.max_steps is None:
        _positive_int(t.epochs, "trainer.epochs")
    _need(0 <= t.warmup_ratio < 1, f"trainer.warmup_ratio must be in [0, 1), got {t.warmup_ratio!r}")
    _need(t.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {t.weight_decay!r}")
    _need(t.max_grad_norm is None or t.max_grad_norm >= 0,
          f"trainer.max_grad_norm must be >= 0 or null, got {t.max_grad_norm!r}")
    _choice(t.select_on, "trainer.select_on", SELECT_ON)
    _choice(t.schedule, "trainer.schedule", SCHEDULES)
    nominal = t.get("nominal_epochs")
    if t.schedule == "linear_nominal":
        _need(isinstance(nominal, (int, float)) and not isinstance(nominal, bool) and nominal > 0,
              f"trainer.schedule=linear_nominal needs trainer.nominal_epochs > 0, got {nominal!r}")
    else:
        _need(nominal is None, f"trainer.nominal_epochs={nominal!r} is used only by trainer.schedule=linear_nominal, "
                               f"not {t.schedule}")
    _choice(t.precision, "trainer.precision", PRECISIONS)
    _choice(t.device, "trainer.device", ("auto", "cpu"))
    _choice(t.get("optimizer", "adamw"), "trainer.optimizer", OPTIMIZERS)
    for key, default in (("fused_optimizer", True), ("compile", False)):
        value = t.get(key, default)
        _need(isinstance(value, bool), f"trainer.{key} must be true or false, got {value!r}")
    _positive_int(d.k_shot, "data.k_shot", allow_null=True)
    _need(isinstance(d.seed, int) and d.seed >= 0, f"data.seed must be a non-negative integer, got {d.seed!r}")
    for key in ("max_train_samples", "max_eval_samples"):
        _positive_int(d[key], f"data.{key}", allow_null=True)
    _positive_int(d.heldout_size, "data.heldout_size")
    _choice(m.init, "model.init", MODEL_INITS)
    _choice(m.dtype, "model.dtype", DTYPES)
    _need(m.init == "random" or m.pretrained is not None, f"model '{m.name}': model.pretrained is not set")
    _check_head(cfg)


def _rate(value, key: str) -> None:
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
          f"{key} must be in [0, 1), got {value!r}")


def _check_head(cfg: DictConfig) -> None:
    """model.head, model.head_dropout and model.dropout (sift_cli/models.py)."""
    m = cfg.model
    head = m.get("head", "default")
    _choice(head, "model.head", MODEL_HEADS)
    _rate(m.get("head_dropout", 0.0), "model.head_dropout")
    if m.get("dropout") is not None:
        _rate(m.dropout, "model.dropout")
    if head != "default":
        prompt = " with a prompt" if cfg.task.get("prompt") else ""
        _need(cfg.task.kind == "classification" and not prompt,
              f"model.head={head} replaces a classifier's head: it needs a classification task without "
              f"task.prompt (task '{cfg.task.name}' is {cfg.task.kind}{prompt})")
