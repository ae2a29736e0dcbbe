"""Multiple-choice tasks (SuperGLUE COPA): each example has a context and a few choices, one of them right.

Every choice is encoded as the sentence pair (context, choice) and scored by `AutoModelForMultipleChoice`,
whose logits have one column per choice, so prediction, accuracy, ECE, the few-shot sampler (classes are
the right choice's position) and every method see an ordinary classifier. The context is the task's
`context_columns` joined by spaces, followed, when the task names a `question_column`, by the sentence
`questions` maps that row's question to (COPA: "cause" -> "What was the cause of this?").
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForMultipleChoice

from sift_cli.data import line_of, load_split
from sift_cli.errors import SiftError
from sift_cli.metrics import check_metric_names, glue_metrics
from sift_cli.models import load_auto_model
from sift_cli.tasks import register_task_kind
from sift_cli.tasks.base import EvalSet, TaskData, few_shot_select_on
from sift_cli.tasks.classification import capped, split_training_set


class ChoiceCollator:
    """Pads the (batch x choices) encodings as one flat batch, then restores the choices axis."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        choices = len(features[0]["input_ids"])
        keys = [k for k in features[0] if k != "labels"]
        flat = [{k: f[k][i] for k in keys} for f in features for i in range(choices)]
        batch = self.tokenizer.pad(flat, return_tensors="pt")
        batch = {k: v.view(len(features), choices, -1) for k, v in batch.items()}
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


@register_task_kind("multiple_choice")
class MultipleChoiceTask:
    maximize = True  # accuracy

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.task = cfg.task
        self.tokenizer = tokenizer
        if len(self.task.choice_columns) < 2:
            raise SiftError(f"task '{self.task.name}': choice_columns must name at least two columns")
        check_metric_names(self.task.metrics, regression=False)
        if self.task.main_metric not in self.task.metrics:
            raise SiftError(f"task.main_metric '{self.task.main_metric}' is not among task.metrics")
        self.select_on = few_shot_select_on(cfg)

    @property
    def num_labels(self) -> int:
        return len(self.task.choice_columns)

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    # ---- data -------------------------------------------------------------------------------------
    def _read(self, split: str) -> Dataset:
        ds, source = load_split(self.task, split, self.cfg.data.dir)
        question = self.task.get("question_column")
        needed = [*self.task.context_columns, *self.task.choice_columns, self.task.label_column]
        missing = [c for c in needed + ([question] if question else []) if c not in ds.column_names]
        if missing:
            raise SiftError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names)}")
        for column in [*self.task.context_columns, *self.task.choice_columns]:
            for i, text in enumerate(ds[column]):
                if not isinstance(text, str):
                    raise SiftError(f"{line_of(source, i)}: column '{column}' must be text, got {text!r}")
        if question:
            for i, value in enumerate(ds[question]):
                if value not in self.task.questions:
                    raise SiftError(f"{line_of(source, i)}: {question} {value!r} is not one of "
                                    f"{', '.join(self.task.questions)} (task.questions)")
        for i, label in enumerate(ds[self.task.label_column]):
            if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < self.num_labels):
                raise SiftError(f"{line_of(source, i)}: label {label!r} out of range "
                                f"(expected an integer in [0, {self.num_labels - 1}])")
        return ds

    def context(self, row: dict) -> str:
        parts = [row[c] for c in self.task.context_columns]
        question = self.task.get("question_column")
        if question:
            parts.append(self.task.questions[row[question]])
        return " ".join(parts)

    def _classes(self, ds: Dataset) -> np.ndarray:
        return np.asarray(ds[self.task.label_column], dtype=int)

    def _tokenize(self, ds: Dataset) -> Dataset:
        max_length = int(self.task.max_length)
        choice_columns = list(self.task.choice_columns)

        def encode(row):
            context = self.context(row)
            encoded = self.tokenizer([context] * len(choice_columns), [row[c] for c in choice_columns],
                                     truncation=True, max_length=max_length)
            return {**encoded, "labels": row[self.task.label_column]}

        return ds.map(encode, remove_columns=ds.column_names, load_from_cache_file=False)

    def load(self) -> TaskData:
        data = self.cfg.data
        info = {"k_shot": data.k_shot, "data_seed": data.seed, "select_on": self.select_on}
        train, select = split_training_set(self._read(self.task.train_split), self._classes, data, self.select_on)
        tests = [EvalSet(split, suffix or "", capped(self._read(split), data))
                 for split, suffix in self.task.eval_splits.items()]
        info["n_train"] = len(train)
        info["n_select"] = len(select.dataset) if select else 0
        info["n_eval"] = {t.split: len(t.dataset) for t in tests}
        return TaskData(
            train=self._tokenize(train),
            select=EvalSet(select.split, "", self._tokenize(select.dataset)) if select else None,
            tests=[EvalSet(t.split, t.suffix, self._tokenize(t.dataset)) for t in tests],
            collator=ChoiceCollator(self.tokenizer),
            info=info,
        )

    def load_model(self, mcfg, seed: int):
        if mcfg.get("kind", "encoder") != "encoder":
            raise SiftError(f"task '{self.task.name}' is multiple choice, which needs an encoder model "
                            f"(model.kind=encoder); model '{mcfg.name}' is {mcfg.kind}")
        return load_auto_model(AutoModelForMultipleChoice, mcfg, self.tokenizer, seed)

    # ---- scoring ----------------------------------------------------------------------------------
    def evaluate(self, run, eval_set: EvalSet) -> dict[str, float]:
        return self.score(*run.predict(eval_set), suffix=eval_set.suffix)

    def score(self, logits: torch.Tensor, labels: torch.Tensor, suffix: str = "") -> dict[str, float]:
        return glue_metrics(logits.float().cpu().numpy(), labels.float().cpu().numpy(), self.task.metrics, suffix)
