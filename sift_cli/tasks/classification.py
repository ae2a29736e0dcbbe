"""Sentence(-pair) classification and regression in the GLUE layout, with the LM-BFF few-shot protocol.

`task.prompt` switches to prompt-based fine-tuning (sift_cli/tasks/prompt.py). `task.extra_eval` lists more
evaluation sets with the task's label space (out-of-distribution sets: MNLI mismatched for a matched run,
another sentiment set for SST-2); each is scored with every test evaluation, its metric keys suffixed
`_NAME`. An entry is {name, split} (a split of this task's folder, or of `local_dir` under data.dir) or
{name, path} (a .jsonl/.parquet/.csv file), with optional `text_columns` and `label_column` when the file
names its columns differently; labels must already be the task's label ids.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import DataCollatorWithPadding

from sift_cli.data import (LOCAL_FORMATS, find_local_split, line_of, load_split, log, read_local,
                           sample_k_shot, seeds_before, split_off, whole_sentences)
from sift_cli.errors import SiftError
from sift_cli.metrics import check_metric_names, glue_metrics
from sift_cli.models import load_classifier
from sift_cli.tasks import register_task_kind
from sift_cli.tasks.base import EvalSet, TaskData, few_shot_select_on
from sift_cli.tasks.prompt import PromptTemplate, load_prompt_model

EXTRA_EVAL_KEYS = {"name", "split", "path", "local_dir", "text_columns", "label_column"}
K_SHOT_POOLS = ("all", "whole_sentences")


def split_training_set(train: Dataset, classes, data, select_on: str, seed_chain=None
                       ) -> tuple[Dataset, EvalSet | None]:
    """The rows that train and the set that selects the model: with `data.k_shot`, k rows per class each
    (`classes(train)` gives the class of each row; `seed_chain`: the task's k_shot_seed_chain); otherwise a
    held-out slice when selecting on it, and at most `data.max_train_samples` rows drawn with `data.seed`."""
    if data.k_shot is not None:
        earlier = seeds_before(seed_chain, int(data.seed))
        train_rows, dev_rows = sample_k_shot(classes(train), int(data.k_shot), int(data.seed), earlier)
        return train.select(train_rows), EvalSet("dev", "", train.select(dev_rows))
    select = None
    if select_on == "heldout":
        kept, held = split_off(len(train), int(data.heldout_size), int(data.seed))
        select = EvalSet("heldout", "", train.select(held))
        train = train.select(kept)
    if data.max_train_samples is not None and data.max_train_samples < len(train):
        rows = np.random.RandomState(int(data.seed)).permutation(len(train))[: data.max_train_samples]
        train = train.select(np.sort(rows))
    return train, select


def capped(ds: Dataset, data) -> Dataset:
    """The first `data.max_eval_samples` rows of an evaluation set (all of them when unset)."""
    return ds if data.max_eval_samples is None else ds.select(range(min(int(data.max_eval_samples), len(ds))))


@register_task_kind("classification")
class ClassificationTask:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.task = cfg.task
        self.tokenizer = tokenizer
        self.regression = self.task.num_labels == 1
        check_metric_names(self.task.metrics, self.regression)
        if self.task.main_metric not in self.task.metrics:
            raise SiftError(f"task.main_metric '{self.task.main_metric}' is not among task.metrics")
        prompt = self.task.get("prompt")
        self.prompt = (PromptTemplate(prompt, tokenizer, self.num_labels, list(self.task.text_columns))
                       if prompt else None)
        self.select_on = few_shot_select_on(cfg)

    @property
    def num_labels(self) -> int:
        return int(self.task.num_labels)

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    maximize = True  # every GLUE main metric is better when larger

    # ---- data -------------------------------------------------------------------------------------
    def _read(self, split: str) -> Dataset:
        ds, source = load_split(self.task, split, self.cfg.data.dir)
        self._check_rows(ds, source)
        return ds

    def _check_rows(self, ds: Dataset, source: str) -> None:
        needed = list(self.task.text_columns) + [self.task.label_column]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise SiftError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names)}")
        for column in self.task.text_columns:
            for i, text in enumerate(ds[column]):
                if not isinstance(text, str):
                    raise SiftError(f"{line_of(source, i)}: column '{column}' must be text, got {text!r}")
        labels = ds[self.task.label_column]
        for i, label in enumerate(labels):
            if self.regression:
                ok = isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label)
            else:
                ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < self.num_labels
            if not ok:
                expected = "a finite number" if self.regression else f"an integer in [0, {self.num_labels - 1}]"
                raise SiftError(f"{line_of(source, i)}: label {label!r} out of range (expected {expected})")

    def _classes(self, ds: Dataset) -> np.ndarray:
        labels = np.asarray(ds[self.task.label_column])
        if self.regression:
            buckets = self.task.k_shot_buckets
            if not buckets:
                raise SiftError(f"task '{self.task.name}' is a regression: set task.k_shot_buckets for data.k_shot")
            return np.digitize(labels, np.asarray(buckets, dtype=float))
        return labels.astype(int)

    def _seed_chain(self) -> list[int]:
        chain = self.task.get("k_shot_seed_chain")
        if chain is None:
            return []
        seeds = list(chain) if OmegaConf.is_list(chain) else None
        if seeds is None or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise SiftError(f"task.k_shot_seed_chain must be a list of integer seeds or null, got {chain}")
        return seeds

    def _tokenize(self, ds: Dataset) -> Dataset:
        columns = list(self.task.text_columns)
        label_column = self.task.label_column
        max_length = int(self.task.max_length)

        def encode(batch):
            texts = [batch[c] for c in columns]
            if self.prompt is None:
                encoded = self.tokenizer(*texts, truncation=True, max_length=max_length)
            else:
                ids = [self.prompt.encode(example, max_length) for example in zip(*texts)]
                encoded = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
            encoded["labels"] = [float(x) for x in batch[label_column]] if self.regression else batch[label_column]
            return encoded

        out = ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)
        return out.with_format("torch")

    def load(self) -> TaskData:
        data = self.cfg.data
        select_on = self.select_on
        info = {"k_shot": data.k_shot, "data_seed": data.seed, "select_on": select_on}
        chain = self._seed_chain()
        if data.k_shot is not None:
            info["k_shot_shuffle_seeds"] = [*seeds_before(chain, int(data.seed)), int(data.seed)]
        train = self._read(self.task.train_split)
        if data.k_shot is not None:
            train = self._k_shot_pool(train, info)
        train, select = split_training_set(train, self._classes, data, select_on, chain)
        tests = [EvalSet(split, suffix or "", capped(self._read(split), data))
                 for split, suffix in self.task.eval_splits.items()]
        tests += [EvalSet(name, f"_{name}", capped(ds, data)) for name, ds in self._extra_eval_sets(tests)]
        info["n_train"] = len(train)
        info["n_select"] = len(select.dataset) if select else 0
        info["n_eval"] = {t.split: len(t.dataset) for t in tests}
        return TaskData(
            train=self._tokenize(train),
            select=EvalSet(select.split, "", self._tokenize(select.dataset)) if select else None,
            tests=[EvalSet(t.split, t.suffix, self._tokenize(t.dataset)) for t in tests],
            collator=DataCollatorWithPadding(self.tokenizer),
            info=info,
        )

    def _k_shot_pool(self, train: Dataset, info: dict) -> Dataset:
        """The rows LM-BFF's training file holds: `task.k_shot_pool=whole_sentences` keeps a phrase-level
        file's whole sentences (SST-2: GLUE's 67,349 rows hold every phrase of the treebank's parse trees,
        LM-BFF's SST-2 train its 6,920 sentences; the rows no other row contains are 6,885)."""
        pool = self.task.get("k_shot_pool") or "all"
        if pool not in K_SHOT_POOLS:
            raise SiftError(f"task.k_shot_pool must be one of {', '.join(K_SHOT_POOLS)}, got '{pool}'")
        info["k_shot_pool"] = pool
        if pool == "all":
            return train
        if len(self.task.text_columns) != 1:
            raise SiftError("task.k_shot_pool=whole_sentences reads one text column; this task has "
                            f"{len(self.task.text_columns)}")
        rows = whole_sentences(train[self.task.text_columns[0]])
        log.info("data: %s k-shot rows drawn from the %d of %d training rows no other row contains "
                 "(task.k_shot_pool=whole_sentences)", self.task.name, len(rows), len(train))
        info["k_shot_pool_rows"] = len(rows)
        return train.select(rows)

    def _extra_eval_sets(self, tests: list[EvalSet]):
        """(name, rows) of each `task.extra_eval` entry, its columns renamed to the task's own."""
        taken = {t.split for t in tests} | {t.suffix.lstrip("_") for t in tests}
        for entry in self.task.get("extra_eval") or []:
            unknown = set(entry) - EXTRA_EVAL_KEYS
            name = str(entry.get("name") or "")
            if unknown or not re.fullmatch(r"\w+", name) or ("split" in entry) == ("path" in entry):
                raise SiftError(f"task.extra_eval entries are {{name, split or path, [local_dir, text_columns, "
                                f"label_column]}} with a name of letters, digits or _; got {dict(entry)}")
            if name in taken:
                raise SiftError(f"task.extra_eval: the name '{name}' is used twice or by an evaluation split")
            taken.add(name)
            ds, source = self._read_extra(entry, name)
            text_columns = list(entry.get("text_columns") or self.task.text_columns)
            if len(text_columns) != len(self.task.text_columns):
                raise SiftError(f"task.extra_eval '{name}': text_columns must name {len(self.task.text_columns)} "
                                f"column(s), like task.text_columns; got {text_columns}")
            renames = dict(zip(text_columns, self.task.text_columns))
            renames[entry.get("label_column") or self.task.label_column] = self.task.label_column
            missing = [c for c in renames if c not in ds.column_names]
            if missing:
                raise SiftError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names)}")
            renames = {old: new for old, new in renames.items() if old != new}
            ds = ds.remove_columns([c for c in ds.column_names if c in renames.values() and c not in renames])
            ds = ds.rename_columns(renames)
            self._check_rows(ds, source)
            yield name, ds

    def _read_extra(self, entry, name: str) -> tuple[Dataset, str]:
        if "path" in entry:
            path = Path(entry.path)
            if path.suffix not in LOCAL_FORMATS or not path.is_file():
                raise SiftError(f"task.extra_eval '{name}': {path} is not a .jsonl, .parquet or .csv file")
            return read_local(path), str(path)
        if entry.get("local_dir"):
            if not self.cfg.data.dir:
                raise SiftError(f"task.extra_eval '{name}': local_dir needs data.dir (or SIFT_DATA_DIR)")
            path = find_local_split(self.cfg.data.dir, entry.local_dir, entry.split)
            return read_local(path), str(path)
        return load_split(self.task, entry.split, self.cfg.data.dir)

    def load_model(self, mcfg, seed: int):
        if self.prompt is not None:
            return load_prompt_model(mcfg, self.tokenizer, seed, self.prompt)
        return load_classifier(mcfg, self.num_labels, self.tokenizer, seed)

    # ---- scoring ----------------------------------------------------------------------------------
    def evaluate(self, run, eval_set: EvalSet) -> dict[str, float]:
        return self.score(*run.predict(eval_set), suffix=eval_set.suffix)

    def score(self, logits: torch.Tensor, labels: torch.Tensor, suffix: str = "") -> dict[str, float]:
        return glue_metrics(logits.float().cpu().numpy(), labels.float().cpu().numpy(), self.task.metrics, suffix)

