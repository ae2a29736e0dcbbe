"""What a method and a task see of a run: the narrow contract between them and the one training loop.

Hooks (`Method.select`, `training_loss`, `clip_gradients`, `on_train_begin`, `after_optimizer_step`) and a
task's `evaluate` receive a `RunContext`: the run's config, model, data and position, and the few things
they may do — log a record, write a file into the run directory, run the model over an evaluation set or
the first training batches. `Method.fit` receives a `Loop`, which can also train (in phases) and report the
model the loop selected. A method hands back a `FitResult`; the runner records it. Nothing here lets a
method change the loop's bookkeeping (its selection, clocks or checkpoints' contents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from sift_cli.tasks.base import EvalSet, Task, TaskData
    from sift_cli.trainer import Trainer


@dataclass
class FitResult:
    """What `Method.fit` hands to the runner: the model the run reports and how it was chosen."""

    state: dict | None = None  # trainable state to load before the final evaluation; None: the model as it is
    metrics: dict | None = None  # that model's test metrics, when fit already has them; None: the runner evaluates
    selection: dict = field(default_factory=dict)  # results.json "selection": on, metric, step, score
    extra_time_s: dict = field(default_factory=dict)  # {"train": s, "eval": s} of phases outside the loop


class RunContext:
    """A read-only view of a run, with the few actions a hook or an evaluation may take."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer

    # ---- what it may read ----------------------------------------------------------------------------
    @property
    def cfg(self) -> "DictConfig":
        return self._trainer.cfg

    @property
    def tcfg(self) -> "DictConfig":
        return self._trainer.tcfg

    @property
    def accelerator(self) -> "Accelerator":
        return self._trainer.accelerator

    @property
    def device(self) -> torch.device:
        return self._trainer.accelerator.device

    @property
    def model(self) -> torch.nn.Module:
        """The model as the loop calls it (wrapped for data parallelism once training is set up)."""
        return self._trainer.model

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self._trainer.unwrapped_model

    @property
    def task(self) -> "Task":
        return self._trainer.task

    @property
    def data(self) -> "TaskData":
        return self._trainer.data

    @property
    def select_on(self) -> str:
        return self._trainer.task.select_on

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._trainer.step

    @property
    def total_steps(self) -> int:
        return self._trainer.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self._trainer.steps_per_epoch

    @property
    def stop_requested(self) -> str | None:
        """The signal's name when SIGINT/SIGTERM asked the run to stop, else None."""
        return self._trainer.stop_requested

    @property
    def show_progress(self) -> bool:
        return self._trainer.show_progress

    @property
    def run_dir(self) -> Path | None:
        """Where a method or task may write files of its own (None: a run that keeps nothing)."""
        return self._trainer.run_dir

    # ---- what it may do -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """One record of the run's curve (metrics.jsonl, W&B); it must hold `step`."""
        self._trainer.recorder.log(record)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table for W&B at the current step (nothing without W&B)."""
        self._trainer.recorder.table(key, columns, rows, self.step)

    def first_batches(self, count: int) -> Iterator[dict]:
        """The first `count` training batches, the ones training starts with, without consuming them."""
        return self._trainer.first_batches(count)

    def eval_batches(self, dataset, desc: str, collator=None) -> Iterator[tuple[list[int], dict]]:
        """This process's share of an evaluation set as (row indices, batch on the device), in batches of at
        most trainer.eval_tokens tokens, longest rows first (sift_cli/batching.py); a batch that only evens
        the processes' counts comes with no indices, and its results must be left out."""
        return self._trainer.eval_batches(dataset, desc, collator)

    def predict(self, eval_set: "EvalSet") -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of an evaluation set, gathered from every process (no time is charged)."""
        return self._trainer.predict(eval_set)


class Loop(RunContext):
    """What `Method.fit` drives: the one training loop, in phases, and the model it selected."""

    def train(self, until_step: int | None = None) -> None:
        """Optimizer steps until `until_step` (default: the end of training); a later call continues."""
        self._trainer.train(until_step)

    @property
    def train_time_s(self) -> float:
        """Seconds spent in the loop's training so far."""
        return self._trainer.train_time_s

    def checkpoint(self) -> None:
        """Save the loop's state now (once training has begun), e.g. before a method stops in a later phase."""
        if self._trainer.optimizer is not None:
            self._trainer.save_checkpoint()

    def selected(self) -> FitResult:
        """The loop's model selection as a fit result: the best state (none when selecting the last step),
        and its validation metrics when the validation sets selected it."""
        return self._trainer.selected()
