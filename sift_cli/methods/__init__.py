"""Fine-tuning methods, one module each, registered by name (the `name` of a `method/` config).

`build_method` checks a method's settings against its typed schema (`Method.Settings`) and its `check`
before anything else happens, so a bad setting costs one line and no work.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from sift_cli.errors import SiftError
from sift_cli.methods.base import Method, ModelContext

log = logging.getLogger("sift_cli")
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is registered twice")
    METHODS[cls.name] = cls
    return cls


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def typed_settings(cls: type[Method], cfg, run: DictConfig | None = None, where: str = "method") -> DictConfig:
    """`cfg` merged into the method's schema (types converted), then checked.

    Keys the schema lacks are left out with a warning: a sweep over methods sets one method's keys on every
    method (`-m method=lora,sift ++method.r=16`), and an experiment file lists several methods' keys."""
    given = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    schema = OmegaConf.structured(cls.Settings)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        log.warning("%s: %s not a setting of method=%s, ignored", where, ", ".join(unknown), cls.name)
    try:
        typed = OmegaConf.merge(schema, {k: v for k, v in given.items() if k not in unknown})
        settings = OmegaConf.to_object(typed)
    except ValidationError as err:
        raise SiftError(f"{where}.{err.full_key}: {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        raise SiftError(f"{where}: {_first_line(err)}") from None
    settings.where = where
    settings.check(run)
    return typed


def build_method(cfg, run: DictConfig | None = None, where: str = "method") -> Method:
    """The method `cfg` names, its settings checked (with `run`, the whole config, their combinations with
    the rest of the run too)."""
    if not OmegaConf.is_dict(cfg) and not isinstance(cfg, dict):
        raise SiftError(f"{where}={cfg}: name the method with the config group, "
                        f"{'method=NAME' if where == 'method' else f'method@{where}=NAME'} (its settings are then "
                        f"{where}.KEY)")
    name = cfg.get("name")
    if name not in METHODS:
        where_ = "" if where == "method" else f"{where}: "
        raise SiftError(f"{where_}unknown method '{name}'; choose from: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(typed_settings(cls, cfg, run, where))


from sift_cli.methods import adapter, bitfit, diff_pruning, fisher, full_ft, graft, linear_probe, lora, magnitude, mixout, pac, prefix, random_mask, s4, sam, sift, unipelt  # noqa: E402,F401,E501  (each registers itself)

__all__ = ["METHODS", "Method", "ModelContext", "build_method", "register_method"]
