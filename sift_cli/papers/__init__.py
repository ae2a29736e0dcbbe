"""Published numbers of the papers this project reproduces, one CSV file per paper, with where each comes from.

A file `NAME.csv` (lines starting with # are comments) has one row per published number:

- paper, table (as this project names it), setting (what the table's runs did), model (this project's name);
- task and method in this project's names, so the number meets our runs; `pretrained` is the paper's row for
  the model before any fine-tuning (our runs' `start_metrics`, from trainer.eval_on_start=true);
- method_config: `key=value` pairs joined by `;` that a run's `config.method` must have to be this row (the
  paper's two adapter placements are both our `adapter`), or empty;
- paper_method: the paper's own label for the row;
- metric: a key of our runs' `metrics`, or `a+b`, the mean of several (jiant's combined scores);
- value and std as printed (fractions x100; std over the paper's seeds where it prints one), value empty when
  the number is not recorded here;
- source: where the number was read (document and place in it);
- confidence: `high` (read in the paper's own table, or two sources agree), `medium` (one secondary source, or
  a doubt the note states, such as which metric the paper prints) or `unchecked` (not checked against the
  paper; always so for an empty value); anything but high needs a note saying why.

`sources.yaml` cites each paper.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from sift_cli.config import available_options
from sift_cli.errors import SiftError

PAPERS_DIR = Path(str(files("sift_cli.papers")))
COLUMNS = ("paper", "table", "setting", "model", "task", "method", "method_config", "paper_method", "metric",
           "value", "std", "source", "confidence", "note")
CONFIDENCE = ("high", "medium", "unchecked")
# The method name of a paper's row for the pre-trained model, before fine-tuning ("Vanilla").
PRETRAINED = "pretrained"


@dataclass(frozen=True)
class Published:
    paper: str
    table: str
    setting: str
    model: str
    task: str
    method: str
    method_config: tuple[tuple[str, str], ...]
    paper_method: str
    metric: str
    value: float  # NaN when not recorded
    std: float  # NaN when the paper prints none
    source: str
    confidence: str
    note: str
    decimals: int  # as the paper prints the value

    @property
    def uncertain(self) -> bool:
        return self.confidence != "high"

    @property
    def metric_parts(self) -> list[str]:
        """The metrics whose mean is this number (one, or several for a combined score)."""
        return self.metric.split("+")


def available_papers() -> list[str]:
    return sorted(p.stem for p in PAPERS_DIR.glob("*.csv"))


def citation(name: str) -> str:
    """One line naming the paper, for table headers."""
    source = yaml.safe_load((PAPERS_DIR / "sources.yaml").read_text())[name]
    return f"{source['authors']}, \"{source['title']}\", {source['venue']} (arXiv:{source['arxiv']})"


def _number(text: str, column: str, where: str) -> tuple[float, int]:
    """A printed number and its decimals, or NaN for an empty cell."""
    text = text.strip()
    if not text:
        return math.nan, 1
    try:
        value = float(text)
    except ValueError:
        raise SiftError(f"{where}: {column} must be a number or empty, got '{text}'") from None
    return value, len(text.partition(".")[2])


def _method_config(text: str, where: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not (sep and key and value):
            raise SiftError(f"{where}: method_config must be key=value pairs joined by ';', got '{text}'")
        pairs.append((key, value))
    return tuple(pairs)


def _row(values: dict, where: str, methods: set[str], tasks: set[str]) -> Published:
    missing = [c for c in COLUMNS if c not in values or values[c] is None]
    if missing:
        raise SiftError(f"{where}: missing {', '.join(missing)}")
    values = {c: values[c].strip() for c in COLUMNS}
    if values["method"] not in methods | {PRETRAINED}:
        raise SiftError(f"{where}: unknown method '{values['method']}'; choose from: "
                        f"{', '.join(sorted(methods | {PRETRAINED}))}")
    if values["task"] not in tasks:
        raise SiftError(f"{where}: unknown task '{values['task']}'; choose from: {', '.join(sorted(tasks))}")
    confidence = values["confidence"]
    if confidence not in CONFIDENCE:
        raise SiftError(f"{where}: confidence must be one of {', '.join(CONFIDENCE)}, got '{confidence}'")
    value, decimals = _number(values["value"], "value", where)
    std, _ = _number(values["std"], "std", where)
    if math.isnan(value) and confidence != "unchecked":
        raise SiftError(f"{where}: a row without a value must be confidence unchecked")
    if math.isnan(value) and not math.isnan(std):
        raise SiftError(f"{where}: a std without a value")
    if confidence != "high" and not values["note"]:
        raise SiftError(f"{where}: a {confidence} number needs a note saying why")
    for column in ("paper", "table", "setting", "model", "metric", "paper_method"):
        if not values[column]:
            raise SiftError(f"{where}: {column} is empty; every number names its source")
    if not math.isnan(value) and not values["source"]:
        raise SiftError(f"{where}: source is empty; every number names its source")
    if not all(values["metric"].split("+")):
        raise SiftError(f"{where}: metric '{values['metric']}' has an empty part")
    return Published(**{**values, "method_config": _method_config(values["method_config"], where),
                        "value": value, "std": std, "decimals": decimals})


def load_paper(name: str) -> list[Published]:
    """Every row of papers/NAME.csv, checked: each names its source, a known method and task, and how sure
    the number is."""
    path = PAPERS_DIR / f"{name}.csv"
    if not path.is_file():
        raise SiftError(f"unknown paper '{name}'; choose from: {', '.join(available_papers())}")
    methods = set(available_options("method"))
    tasks = {option.split("/")[-1] for option in available_options("task")}
    with open(path, newline="") as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if not line.startswith("#")]
    reader = csv.DictReader(line for _, line in lines)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise SiftError(f"{path}: the header must be {','.join(COLUMNS)}")
    rows, seen = [], set()
    for (number, _), values in zip(lines[1:], reader):
        row = _row(values, f"{path}:{number}", methods, tasks)
        if row.paper != name:
            raise SiftError(f"{path}:{number}: paper '{row.paper}' in the file of '{name}'")
        key = (row.table, row.setting, row.model, row.task, row.method, row.method_config, row.metric)
        if key in seen:
            raise SiftError(f"{path}:{number}: a second number for {', '.join(map(str, key))}")
        seen.add(key)
        rows.append(row)
    return rows
