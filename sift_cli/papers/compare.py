"""`sift-table --paper NAME`: our runs beside a paper's published numbers, row by task, with the difference.

The rows are the paper's: each is one of our methods (with the `config.method` values the paper's row needs,
as for its two adapter placements), and only runs that match a row are shown; runs of methods the paper's
table does not have are counted under it. Each published number meets the runs of its task through its own
metric (a paper printing F1 for MRPC is compared with our runs' `f1`, whatever their main metric; `a+b` is
the mean of both), aggregated over seeds like `sift-table` does. A table published for several models is
compared for the model our runs used, or, for runs of a model the paper does not have, its first model.
Numbers not read with high confidence carry a `*` and their notes print under the table, with the sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sift_cli.errors import SiftError
from sift_cli.papers import PRETRAINED, Published, citation, load_paper
from sift_cli.table import UNSCALED, _label, _tex

MISSING = "–"


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    setting: str
    label: str


@dataclass(frozen=True)
class Row:
    """One row of the paper's table: the paper's label and the runs of ours it stands for."""
    method: str
    config: tuple[tuple[str, str], ...]
    label: str

    @property
    def ours(self) -> str:
        if self.method == PRETRAINED:
            return f"{PRETRAINED} (start_metrics)"
        return self.method + (f" ({', '.join(f'{k}={v}' for k, v in self.config)})" if self.config else "")


@dataclass(frozen=True)
class Cell:
    ours: float  # NaN without a completed run that recorded the metric
    std: float
    n: int
    paper: float  # NaN when the data has no number
    paper_std: float  # NaN when the paper prints none
    confidence: str  # of the published number; "unchecked" when there is none
    decimals: int  # as the paper prints its number

    @property
    def diff(self) -> float:
        return self.ours - self.paper

    @property
    def uncertain(self) -> bool:
        return self.confidence != "high"


@dataclass
class Comparison:
    paper: str
    table: str
    model: str  # the published model compared with
    rows: list[Published]  # the published numbers of that table and model
    columns: list[Column]
    paper_rows: list[Row]
    cells: dict[tuple[Row, Column], Cell]
    our_models: list[str]
    other_models: list[str]  # further models the paper's table has
    unmatched: dict[str, int]  # runs no row of the paper describes, by method
    stat: str


def _scale(metric: str) -> float:
    return 1.0 if set(metric.split("_")) & UNSCALED else 100.0


def _values(runs: pd.DataFrame, metric: str, before_training: bool = False) -> pd.Series:
    """Per run, the published metric (the mean of its `+` parts), scaled as the paper prints it; from the
    evaluation before the first step (`start_metrics`) for the paper's pre-trained row."""
    prefix = "start_metrics" if before_training else "metrics"
    parts = metric.split("+")
    if not all(f"{prefix}.{part}" in runs.columns for part in parts):
        return pd.Series(math.nan, index=runs.index, dtype=float)
    scaled = [pd.to_numeric(runs[f"{prefix}.{part}"], errors="coerce") * _scale(part) for part in parts]
    return sum(scaled) / len(scaled)


def _recorded(runs: pd.DataFrame, row: Published) -> bool:
    return _values(runs[runs["task"].eq(row.task)], row.metric, row.method == PRETRAINED).notna().any()


def pick_table(rows: list[Published], runs: pd.DataFrame, table: str | None) -> str:
    """The table asked for, or the one table with a number our runs also recorded."""
    tables = list(dict.fromkeys(r.table for r in rows))
    if table is not None:
        if table not in tables:
            raise SiftError(f"paper '{rows[0].paper}' has no table '{table}'; choose from: {', '.join(tables)}")
        return table
    matching = [t for t in tables if any(_recorded(runs, r) for r in rows if r.table == t)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise SiftError(f"no run recorded a number of paper '{rows[0].paper}' (its tables: {', '.join(tables)}); "
                        f"check the runs' tasks and metrics")
    raise SiftError(f"the runs match several tables of paper '{rows[0].paper}' ({', '.join(matching)}); "
                    f"pick one with --paper-table")


def _columns(rows: list[Published]) -> list[Column]:
    keys = list(dict.fromkeys((r.task, r.metric, r.setting) for r in rows))
    metrics_of = {task: {m for t, m, _ in keys if t == task} for task, _, _ in keys}
    several_settings = len({s for _, _, s in keys}) > 1
    columns = []
    for task, metric, setting in keys:
        label = (task + (f" {metric}" if len(metrics_of[task]) > 1 else "")
                 + (f" ({setting})" if several_settings else ""))
        columns.append(Column(task, metric, setting, label))
    return columns


def _same(value, wanted: str) -> bool:
    """A run's config value against a row's: numerically when both are numbers (8e-3 is 0.008)."""
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return _label(value) == wanted


def _matches(runs: pd.DataFrame, row: Row) -> pd.Series:
    """Which runs a paper row stands for: its method, with the config.method values it names."""
    if row.method == PRETRAINED:  # every run evaluates the pre-trained model first when asked to
        return pd.Series(True, index=runs.index)
    keep = runs["method"].eq(row.method)
    for key, wanted in row.config:
        column = f"config.method.{key}"
        keep &= runs[column].map(lambda value: _same(value, wanted)) if column in runs else False
    return keep


def compare(runs: pd.DataFrame, paper: str, table: str | None = None, stat: str = "mean") -> Comparison:
    """Cells of one published table: the paper's number and ours (stat over seeds of completed runs)."""
    rows = load_paper(paper)
    table = pick_table(rows, runs, table)
    rows = [r for r in rows if r.table == table]
    tasks = {r.task for r in rows}
    ours = runs[runs["task"].isin(tasks)]
    our_models = sorted(ours["model"].dropna().unique())
    models = list(dict.fromkeys(r.model for r in rows))
    model = next((m for m in models if m in our_models), models[0])
    if model in our_models:
        ours = ours[ours["model"].eq(model)]
    rows = [r for r in rows if r.model == model]
    columns = _columns(rows)
    labels: dict[tuple, str] = {}
    for r in rows:  # a row's label is the first the data gives it
        labels.setdefault((r.method, r.method_config), r.paper_method)
    paper_rows = [Row(method, config, label) for (method, config), label in labels.items()]
    published = {(r.method, r.method_config, r.task, r.metric, r.setting): r for r in rows}
    completed = ours[ours["status"].eq("completed")]
    cells = {}
    for paper_row in paper_rows:
        mine = completed[_matches(completed, paper_row)]
        for column in columns:
            number = published.get((paper_row.method, paper_row.config, column.task, column.metric, column.setting))
            values = _values(mine[mine["task"].eq(column.task)], column.metric,
                             paper_row.method == PRETRAINED).dropna()
            cells[(paper_row, column)] = Cell(
                ours=float(values.agg(stat)) if len(values) else math.nan,
                std=float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                n=len(values),
                paper=number.value if number else math.nan,
                paper_std=number.std if number else math.nan,
                confidence=number.confidence if number else "unchecked",
                decimals=number.decimals if number else 1,
            )
    described = pd.Series(False, index=ours.index)
    for paper_row in paper_rows:
        if paper_row.method != PRETRAINED:
            described |= _matches(ours, paper_row)
    unmatched = ours.loc[~described, "method"].value_counts().sort_index().to_dict()
    return Comparison(paper, table, model, rows, columns, paper_rows, cells, our_models,
                      [m for m in models if m != model], unmatched, stat)


def _number(value: float, decimals: int, signed: bool = False) -> str:
    if math.isnan(value):
        return MISSING
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _cell_text(cell: Cell, stat: str, pm: str) -> str:
    places = cell.decimals
    ours = _number(cell.ours, places)
    if stat == "mean" and cell.n > 1:
        ours += f"{pm}{cell.std:.{places}f}"
    paper = _number(cell.paper, places)
    if not math.isnan(cell.paper_std):
        paper += f"{pm}{cell.paper_std:.{places}f}"
    paper += "*" if cell.uncertain else ""
    return f"{ours} / {paper} / {_number(cell.diff, places, signed=True)}"


def _frame(comparison: Comparison, pm: str) -> pd.DataFrame:
    data = {"paper": [r.label for r in comparison.paper_rows], "ours": [r.ours for r in comparison.paper_rows]}
    for column in comparison.columns:
        data[column.label] = [_cell_text(comparison.cells[(r, column)], comparison.stat, pm)
                              for r in comparison.paper_rows]
    return pd.DataFrame(data)


def header_lines(comparison: Comparison) -> list[str]:
    settings = "; ".join(dict.fromkeys(r.setting for r in comparison.rows))
    spread = "mean ± std" if comparison.stat == "mean" else "median"
    ours = ", ".join(comparison.our_models) or "none"
    if comparison.model not in comparison.our_models:
        ours += f" (no run of {comparison.model}: ours stand in for it)"
    others = (f"; also published for {', '.join(comparison.other_models)} (compared when the runs are of that model)"
              if comparison.other_models else "")
    return [
        f"{citation(comparison.paper)}: {comparison.table} ({settings}); published model {comparison.model}, "
        f"ours {ours}{others}.",
        f"Each cell: ours ({spread} over seeds) / paper / ours - paper, as the paper prints them (fractions "
        f"x100; the paper's ± std over its seeds where it prints one); {MISSING} = no number; * = published "
        f"number not read with high confidence (notes below).",
    ]


def notes(comparison: Comparison) -> list[str]:
    """The sources of the numbers shown, each distinct note of the uncertain ones, and the runs left out."""
    sources: dict[str, int] = {}
    uncertain: dict[str, int] = {}
    for row in comparison.rows:
        if not math.isnan(row.value):
            sources[row.source] = sources.get(row.source, 0) + 1
        if row.uncertain:
            key = f"{row.confidence}: {row.note}"
            uncertain[key] = uncertain.get(key, 0) + 1
    lines = [f"* {count} cell(s), {note}" for note, count in uncertain.items()]
    lines += [f"Source of {count} number(s): {source}" for source, count in sources.items()]
    if comparison.unmatched:
        listed = ", ".join(f"{method} ({count})" for method, count in comparison.unmatched.items())
        lines.append(f"Runs no row of the paper's table describes (not shown): {listed}.")
    return lines


def to_csv(comparison: Comparison) -> str:
    out = pd.DataFrame({"paper": [r.label for r in comparison.paper_rows],
                        "method": [r.ours for r in comparison.paper_rows]})
    for column in comparison.columns:
        cells = [comparison.cells[(r, column)] for r in comparison.paper_rows]
        out[f"{column.label}_ours"] = [c.ours for c in cells]
        out[f"{column.label}_ours_std"] = [c.std for c in cells]
        out[f"{column.label}_n"] = [c.n for c in cells]
        out[f"{column.label}_paper"] = [c.paper for c in cells]
        out[f"{column.label}_diff"] = [c.diff for c in cells]
        out[f"{column.label}_uncertain"] = [c.uncertain for c in cells]
        out[f"{column.label}_paper_std"] = [c.paper_std for c in cells]
        out[f"{column.label}_confidence"] = [c.confidence for c in cells]
    return out.to_csv(index=False)


def to_latex(comparison: Comparison) -> str:
    frame = _frame(comparison, r" $\pm$ ")
    lines = [rf"\begin{{tabular}}{{ll{'r' * len(comparison.columns)}}}", r"\toprule",
             " & ".join(_tex(str(c)) for c in frame.columns) + r" \\", r"\midrule",
             *(" & ".join([_tex(row[0]), _tex(row[1]), *row[2:]]) + r" \\" for row in frame.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def render(comparison: Comparison, fmt: str) -> str:
    """Markdown with the header and notes around the table, LaTeX with them as comments, or plain CSV."""
    if fmt == "csv":
        return to_csv(comparison)
    head, tail = header_lines(comparison), notes(comparison)
    if fmt == "latex":
        return "".join(f"% {line}\n" for line in head) + to_latex(comparison) + "\n" + "".join(
            f"% {line}\n" for line in tail)
    table = _frame(comparison, " ± ").to_markdown(index=False, disable_numparse=True)
    return "\n".join([*head, "", table, "", *tail]) + "\n"
