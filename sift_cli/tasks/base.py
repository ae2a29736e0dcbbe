"""The task protocol: what the runner, the loop and every method may ask of a task.

A task kind (classification, multiple choice, instruction tuning, ...) reads and tokenises its data into a
`TaskData`, loads the model that suits it, and scores an evaluation set. Which split picks the model
(`select_on`) is resolved here, once, when the task is built: the trainer, the methods and the task's own
data loading all read `task.select_on`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from datasets import Dataset

from sift_cli.errors import SiftError

if TYPE_CHECKING:
    from sift_cli.context import RunContext
    from sift_cli.models import LoadedModel


@dataclass
class EvalSet:
    split: str
    suffix: str  # appended to metric keys: "" or "_mm" for MNLI mismatched
    dataset: Dataset


@dataclass
class TaskData:
    train: Dataset
    select: EvalSet | None  # model selection set (k-shot dev or held-out slice); None: none or the test sets
    tests: list[EvalSet]
    collator: object
    info: dict = field(default_factory=dict)


class Task(Protocol):
    """What every task kind provides (classification.py, multiple_choice.py, instruct.py)."""

    main_metric: str  # the metric that selects the model and heads results.json
    maximize: bool  # whether a larger main metric is better
    select_on: str  # dev | validation | heldout | last, resolved once (`resolve_select_on`)

    def load(self) -> TaskData:
        """Read, check and tokenise the training, selection and test sets."""

    def load_model(self, mcfg, seed: int) -> "LoadedModel":
        """The model this task trains, with the names of the parameters the checkpoint lacks (the head)."""

    def evaluate(self, run: "RunContext", eval_set: EvalSet) -> dict[str, float]:
        """The metrics of the run's model on one evaluation set."""


def resolve_select_on(cfg, auto: str, allowed: tuple[str, ...], why_not: str = "") -> str:
    """Which split picks the best checkpoint: `trainer.select_on`, with `auto` replaced by the task kind's
    choice; a choice the task kind cannot serve is refused in one line (`why_not` says what it can)."""
    choice = cfg.trainer.select_on
    if choice == "auto":
        return auto
    if choice not in allowed:
        raise SiftError(f"trainer.select_on={choice} {why_not}".strip())
    return choice


def few_shot_select_on(cfg) -> str:
    """Classification and multiple choice: the k-shot dev set with data.k_shot, else validation (the
    published GLUE practice: the best validation evaluation is reported)."""
    few_shot = cfg.data.k_shot is not None
    allowed = ("dev", "validation", "heldout", "last") if few_shot else ("validation", "heldout", "last")
    return resolve_select_on(cfg, "dev" if few_shot else "validation", allowed,
                             "needs data.k_shot (the dev set is sampled with the k-shot train set)")
