"""`sift-table`: one comparison table (methods x tasks) from every results.json under some directories.

Scores are aggregated over seeds and printed the way papers print them (x100, one decimal, mean ± std).
A failed run is counted and shown, never turned into a number, and runs that should not be compared
(another model-selection split, few-shot k or model) are named on stderr instead of being averaged
silently, as are differing versions of torch, transformers or peft among the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sift_cli.errors import SiftError
from sift_cli.results import RESULTS_FILE, write_bytes_atomic

# Metric names (or name parts, as in eval_loss or ece_mm) for which the lowest value is the best.
LOWER_IS_BETTER = {"ece", "loss", "perplexity"}
# Not fractions, so printed as they are instead of x100.
UNSCALED = {"loss", "perplexity"}
# In a metric key, stands for each run's own main metric (see with_main_metric).
MAIN = "{main}"
# Protocol keys whose values must agree for the numbers in one table to be comparable.
PROTOCOL_KEYS = ("selection.on", "config.data.k_shot", "model")
# Libraries whose release can move a number by itself (results.json records their versions).
VERSIONED = ("torch", "transformers", "peft")
FIELDS = ("value", "std", "n", "failed")


@dataclass
class Table:
    """The aggregated cells plus what the formatters need to print them honestly."""

    cells: pd.DataFrame  # rows = group labels, columns = (field, task) with FIELDS; NaN where no run
    tasks: list[str]
    avg: pd.Series  # per row: mean over tasks of the cell values; NaN unless every task has a number
    trainable_pct: pd.Series  # per row: mean trainable_pct of its runs
    runs: pd.DataFrame  # the runs behind the table, with their row label ("row") and number ("score")
    group_by: list[str]
    metric: str  # what the numbers are, for titles: "accuracy", or "main score (accuracy, f1)"
    stat: str  # mean | median
    scale: float  # 100 for fractions, printed like papers do
    lower_is_better: bool


def _warn(message: str) -> None:
    print(f"sift-table: warning: {message}", file=sys.stderr)


def load_results(paths) -> pd.DataFrame:
    """Read every results.json under `paths`, one row per run, nested keys flattened to dotted columns
    (metrics.ece, selection.on, config.data.k_shot; a list of records by position) so any of them can be a
    filter or a row key."""
    records = []
    for root in map(Path, paths):
        if not root.exists():
            raise SiftError(f"{root} does not exist")
        for file in [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE)):
            try:
                record = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                _warn(f"skipping {file}: not valid JSON ({err})")
                continue
            if not isinstance(record, dict) or not {"status", "task", "method"} <= record.keys():
                _warn(f"skipping {file}: not a results file (no status, task or method)")
                continue
            records.append({**_numbered(record), "file": str(file)})
    if not records:
        raise SiftError(f"no readable {RESULTS_FILE} under {', '.join(map(str, paths))}")
    return pd.json_normalize(records)


def _numbered(value):
    """Lists of records become records keyed by position, so that their numbers get dotted keys too: the
    graft's sparsity sweep gives method_info.sparsity_sweep.3.gain_kept.grafted."""
    if isinstance(value, dict):
        return {key: _numbered(item) for key, item in value.items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {str(i): _numbered(item) for i, item in enumerate(value)}
    return value


def _label(value) -> str:
    """A key's value as text: 16.0 (an integer column with a missing value) as 16, a missing value as null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _column(df: pd.DataFrame, key: str) -> str:
    if key not in df.columns:
        raise SiftError(f"no run has the key '{key}' (keys look like method, seed or config.data.k_shot)")
    return key


def apply_filters(df: pd.DataFrame, filters: list[str]) -> pd.DataFrame:
    """Keep the runs matching every KEY=VALUE; a number matches numerically, so k_shot=16 matches 16.0."""
    for item in filters:
        key, _, wanted = item.partition("=")
        values = df[_column(df, key)]
        try:
            keep = pd.to_numeric(values, errors="coerce").eq(float(wanted))
        except ValueError:
            keep = values.map(_label).eq(wanted)
        df = df[keep]
    if df.empty:
        raise SiftError(f"no run matches {' '.join(filters)}")
    return df


def _natural(values: pd.Series) -> pd.Series:
    """Sort key: numbers as numbers (k_shot 8 before 16), anything else as text."""
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers if numbers.notna().sum() == values.notna().sum() else values.map(_label)


def _name_parts(metric: str | None) -> set[str]:
    return set(metric.split("_")) if metric else set()


def with_main_metric(df: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    """A key with `{main}` in it reads each run's own main metric there, so one key compares like with like
    across tasks: method_info.models.fine_tuned.{main} is a CoLA run's fine-tuned MCC and an SST-2 run's
    fine-tuned accuracy. The resolved numbers become a column named by the key itself."""
    if metric is None or MAIN not in metric:
        return df
    def own(run: pd.Series):
        return run.get(metric.replace(MAIN, str(run["main_metric"])))
    return df.assign(**{metric: df.apply(own, axis=1) if len(df) else []})


def aggregate(df: pd.DataFrame, group_by=("method",), metric: str | None = None, stat: str = "mean") -> Table:
    """Collapse seeds into one cell per (row, task): the mean or median of the runs that have a number, their
    std (ddof=1) and how many runs have none (failed, interrupted or a null score), which are counted, not
    averaged. `metric` picks a key of `metrics` or any dotted key (`{main}` in it: each run's main metric);
    None means each run's main_score."""
    group_by = [_column(df, key) for key in group_by]
    if "task" in group_by:
        raise SiftError("the columns are always tasks, so 'task' cannot be a row key")
    df = with_main_metric(df, metric)
    column = "main_score" if metric is None else f"metrics.{metric}"
    if metric is not None and column not in df.columns and metric in df.columns:
        column = metric  # another number a run records, e.g. method_info.models.fine_tuned.accuracy
    if column not in df.columns:
        recorded = sorted(c.removeprefix("metrics.") for c in df.columns if c.startswith("metrics."))
        raise SiftError(f"no run recorded the metric '{metric}'; recorded: {', '.join(recorded) or 'none'}")
    if metric is not None:
        has_metric = df[column].notna().groupby(df["task"]).any()
        if not has_metric.all():
            print(f"sift-table: note: no run of {', '.join(has_metric.index[~has_metric])} recorded "
                  f"'{metric}'; those tasks are left out", file=sys.stderr)
        df = df[df["task"].isin(has_metric.index[has_metric])]

    runs = df.sort_values(group_by, key=_natural, kind="stable").copy()
    for key in group_by:
        runs[key] = runs[key].map(_label)
    runs["row"] = runs[group_by].agg(", ".join, axis=1)
    runs["score"] = pd.to_numeric(runs[column], errors="coerce").where(runs["status"].eq("completed"))
    runs["trainable_pct"] = pd.to_numeric(runs["trainable_pct"], errors="coerce")

    scores = runs.groupby(group_by + ["task"], sort=False)["score"]
    cells = pd.DataFrame({"value": scores.agg(stat), "std": scores.std(ddof=1), "n": scores.count()})
    cells["failed"] = scores.size() - cells["n"]
    cells = cells.unstack("task")
    mains = list(runs["main_metric"].dropna().unique())
    # Without --metric the cells are main scores, whose name decides the direction and the scale (a table of
    # held-out losses is lower-is-better and unscaled); `check_one_kind` refuses main scores of both kinds.
    named = (metric or MAIN).replace(MAIN, mains[0] if mains else "")
    return Table(
        cells=cells,
        tasks=sorted(runs["task"].unique()),
        avg=cells["value"].mean(axis=1, skipna=False),
        trainable_pct=runs.groupby(group_by, sort=False)["trainable_pct"].mean().reindex(cells.index),
        runs=runs,
        group_by=group_by,
        metric=metric or f"main score ({', '.join(mains)})",
        stat=stat,
        scale=1.0 if _name_parts(named) & UNSCALED else 100.0,
        lower_is_better=bool(_name_parts(named) & LOWER_IS_BETTER),
    )


def check_one_kind(runs: pd.DataFrame) -> None:
    """Main scores share a table only when they share a direction and a scale."""
    mains = list(runs["main_metric"].dropna().unique())
    kinds = {(bool(_name_parts(m) & LOWER_IS_BETTER), bool(_name_parts(m) & UNSCALED)) for m in mains}
    if len(kinds) > 1:
        raise SiftError(f"the runs' main metrics ({', '.join(mains)}) are not all higher-is-better fractions; "
                        f"choose one with --metric or table fewer runs")


def protocol_warnings(table: Table) -> list[str]:
    """Numbers are comparable only under one protocol: name each protocol key whose values differ among
    the runs that contribute a number (a key that is also a row key separates them, so is not mixed)."""
    scored = table.runs[table.runs["score"].notna()]
    messages = []
    for key in PROTOCOL_KEYS:
        if key in table.group_by or key not in scored.columns:
            continue
        values = sorted(scored[key].map(_label).unique())
        if len(values) > 1:
            messages.append(f"the runs mix {key} = {', '.join(values)}; their numbers are not comparable "
                            f"(use --filter {key}=VALUE or --group-by {key})")
    # A replicate is a training seed and a data draw: runs that differ only in data.seed (LM-BFF's five
    # few-shot samples, for one) are the seeds of their cell, not repeats.
    replicate = ["task", "seed"] + [key for key in ("config.data.seed",) if key in scored.columns]
    repeated = scored.duplicated(list(dict.fromkeys(table.group_by + replicate)))
    if "seed" not in table.group_by and repeated.any():
        messages.append(f"{repeated.sum()} run(s) repeat a (row, task, seed, data seed) already in the table and "
                        f"count as extra seeds: {', '.join(scored.loc[repeated, 'file'])}")
    return messages


def version_warnings(table: Table) -> list[str]:
    """One line per library (torch, transformers, peft) whose recorded version differs among the runs that
    contribute a number: a new release can change results by itself, so such a table mixes more than methods."""
    scored = table.runs[table.runs["score"].notna()]
    messages = []
    for package in VERSIONED:
        column = f"versions.{package}"
        if column not in scored.columns:
            continue
        counts = scored[column].dropna().value_counts().sort_index()
        if len(counts) > 1:
            found = ", ".join(f"{version} ({n} run{'s' if n > 1 else ''})" for version, n in counts.items())
            messages.append(f"the runs used different {package} versions: {found}")
    return messages


def summary(n_read: int, table: Table) -> str:
    """One line saying how many runs are behind the table and what its numbers are."""
    status = table.runs["status"]
    failed = f"{status.ne('completed').sum()} failed"
    if status.eq("interrupted").any():
        failed += f" ({status.eq('interrupted').sum()} of them interrupted)"
    spread = "mean ± std" if table.stat == "mean" else "median"
    scale = " x100" if table.scale == 100 else ""
    return (f"{n_read} runs read, {len(table.runs)} in the table: {status.eq('completed').sum()} completed, "
            f"{failed}. {table.metric}{scale}, {spread} over seeds, "
            f"{'lower' if table.lower_is_better else 'higher'} is better")


def format_pct(pct: float, missing: str = "–") -> str:
    """Three significant digits but at least two decimals, so 0.0123 % does not print as 0.01."""
    if math.isnan(pct):
        return missing
    if pct <= 0:
        return f"{pct:.2f}"
    return f"{pct:.{max(2, 2 - math.floor(math.log10(pct)))}f}"


@dataclass(frozen=True)
class Style:
    bold: str  # format string around a best number
    pm: str
    missing: str


MARKDOWN = Style(bold="**{}**", pm=" ± ", missing="–")
LATEX = Style(bold=r"\textbf{{{}}}", pm=r" $\pm$ ", missing="--")


def _is_best(values: pd.Series, table: Table) -> pd.Series:
    """Best as printed (one decimal), so two cells that print alike are both bold."""
    shown = (values * table.scale).round(1)
    return shown.eq(shown.min() if table.lower_is_better else shown.max())


def _cell(value: float, std: float, n: float, failed: float, best: bool, table: Table, style: Style) -> str:
    """One task cell: missing (no run), failed (no run with a number), or the number with its spread."""
    if math.isnan(n):
        return style.missing
    if n == 0:
        return "failed"
    text = f"{value * table.scale:.1f}"
    if table.stat == "mean" and n > 1:
        text += f"{style.pm}{std * table.scale:.1f}"
    if best:
        text = style.bold.format(text)
    return f"{text} ({failed:.0f} failed)" if failed else text


def _avg_cell(value: float, best: bool, table: Table, style: Style) -> str:
    if math.isnan(value):
        return style.missing
    text = f"{value * table.scale:.1f}"
    return style.bold.format(text) if best else text


def format_cells(table: Table, style: Style = MARKDOWN) -> pd.DataFrame:
    """The table as text: row keys, one column per task, avg and trainable %."""
    out = table.cells.index.to_frame(index=False)
    for task in table.tasks:
        cell = table.cells.xs(task, axis=1, level="task")
        best = _is_best(cell["value"], table)
        out[task] = [_cell(*fields, is_best, table, style)
                     for fields, is_best in zip(cell[list(FIELDS)].itertuples(index=False), best)]
    out["avg"] = [_avg_cell(v, b, table, style) for v, b in zip(table.avg, _is_best(table.avg, table))]
    out["trainable %"] = [format_pct(p, style.missing) for p in table.trainable_pct]
    return out


def to_markdown(table: Table) -> str:
    return format_cells(table).to_markdown(index=False, disable_numparse=True)


_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(char, char) for char in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular; keys and labels are escaped, the cells carry their own markup."""
    text = format_cells(table, LATEX)
    keys = len(table.group_by)
    text[text.columns[:keys]] = text[text.columns[:keys]].map(_tex)
    lines = [
        rf"\begin{{tabular}}{{{'l' * keys}{'r' * (len(text.columns) - keys)}}}",
        r"\toprule",
        " & ".join(_tex(str(c)) for c in text.columns) + r" \\",
        r"\midrule",
        *(" & ".join(row) + r" \\" for row in text.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    """Raw numbers (not x100), one column per task and field, for further analysis."""
    out = table.cells.index.to_frame(index=False)
    for task in table.tasks:
        for field in FIELDS:
            values = table.cells[(field, task)].to_numpy()
            name = table.stat if field == "value" else field
            out[f"{task}_{name}"] = pd.array(values, dtype="Int64") if field in ("n", "failed") else values
    out["avg"] = table.avg.to_numpy()
    out["trainable_pct"] = table.trainable_pct.to_numpy()
    return out.to_csv(index=False)


def render(table: Table, fmt: str, header: str) -> str:
    """The output text; the header goes in as a line (Markdown) or a comment (LaTeX), CSV stays pure data."""
    if fmt == "csv":
        return to_csv(table)
    if fmt == "latex":
        return f"% {header}\n{to_latex(table)}\n"
    return f"{header}\n\n{to_markdown(table)}\n"


def _filter_arg(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sift-table", description="Compare the runs under some directories in one table (rows x tasks)."
    )
    parser.add_argument("paths", nargs="+", help="directories searched recursively for results.json")
    parser.add_argument("--metric", help="a key of `metrics` (e.g. ece, accuracy_mm) or any dotted key of results.json "
                                         "(method_info.models.fine_tuned.accuracy); default: each run's main_score")
    parser.add_argument("--stat", choices=("mean", "median"), default="mean", help="aggregate over seeds")
    parser.add_argument("--format", choices=("md", "latex", "csv"), default="md")
    parser.add_argument("--output", type=Path, help="write the table to this file instead of stdout")
    parser.add_argument("--group-by", default="method",
                        help="comma-separated row keys: method, model, seed or dotted paths like config.data.k_shot")
    parser.add_argument("--filter", type=_filter_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="keep only matching runs (repeatable; same keys as --group-by)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write the budget curve and per-task bars here")
    parser.add_argument("--paper", help="beside a paper's published numbers (sift_cli/papers/NAME.csv): "
                                        "sift, sam, design_spaces, pac, graft")
    parser.add_argument("--paper-table", help="which of the paper's tables (default: the one the runs match)")
    parser.add_argument("--claims", action="store_true",
                        help="with --paper: check the paper's claims (sift_cli/papers/claims.yaml) on the runs and on "
                             "its own numbers, each marked holds / does not hold")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        runs = load_results(args.paths)
        kept = apply_filters(runs, args.filter)
        group_by = [k.strip() for k in args.group_by.split(",")]
        if (args.paper_table or args.claims) and not args.paper:
            raise SiftError(f"{'--claims' if args.claims else '--paper-table'} needs --paper")
        if args.claims and args.format != "md":
            raise SiftError("--claims prints Markdown only")
        if args.paper and group_by != ["method"]:
            raise SiftError("--paper compares methods: leave --group-by at method (use --filter to pick runs)")
        if not (args.metric or args.paper):  # a paper's tables pick their own metrics
            check_one_kind(kept)
        table = aggregate(kept, group_by, args.metric, args.stat)
        for message in protocol_warnings(table) + version_warnings(table):
            _warn(message)
        header = summary(len(runs), table)
        if args.format == "csv" or args.paper:
            print(f"sift-table: {header}", file=sys.stderr)
        if args.claims:
            from sift_cli.papers.claims import check, render as render_claims

            text = render_claims(check(kept, args.paper))
        elif args.paper:
            from sift_cli.papers.compare import compare, render as render_paper

            text = render_paper(compare(kept, args.paper, args.paper_table, args.stat), args.format)
        else:
            text = render(table, args.format, header)
        if args.output:
            write_bytes_atomic(args.output, text.encode())
        else:
            sys.stdout.write(text)
        if args.plot:
            from sift_cli.plots import write_plots

            for path in write_plots(table, args.plot):
                print(f"sift-table: wrote {path}", file=sys.stderr)
    except (SiftError, OSError) as err:
        print(f"sift-table: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
