"""Where a run's curves go: metrics.jsonl in the run directory, mirrored to Weights & Biases.

The runner owns `wandb.init` and `wandb.finish` (always called, in a `finally`), so a sweep of many jobs
in one process gives one W&B run per job. Only the main process records anything.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sift_cli.errors import SiftError
from sift_cli.results import METRICS_FILE, MetricsLog

WANDB_MODES = ("disabled", "offline", "online")


class Recorder:
    def __init__(self, run_dir: Path, lcfg: DictConfig, name: str, group: str | None, config: dict,
                 is_main: bool = True):
        self.metrics = MetricsLog(run_dir / METRICS_FILE if is_main else None)
        self.started = time.time()
        self.wandb = None
        if lcfg.mode not in WANDB_MODES:
            raise SiftError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got '{lcfg.mode}'")
        if is_main and lcfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=lcfg.project,
                entity=lcfg.entity,
                name=name,
                group=lcfg.group or group,
                tags=list(OmegaConf.to_container(lcfg.tags)) if lcfg.tags else None,
                config=config,
                dir=str(run_dir),
                mode=lcfg.mode,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, record: dict) -> None:
        record = {**record, "time_s": round(time.time() - self.started, 3)}
        self.metrics.write(record)
        if self.wandb is not None:
            split = record.get("split", "train")
            self.wandb.log({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                           step=int(record["step"]))

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for key, value in values.items():
                self.wandb.summary[key] = value

    def finish(self, failed: bool) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
