"""`sift-table RUNS --paper PAPER --claims`: each claim of a paper checked on the runs and on the paper's own numbers.

`claims.yaml` states, per paper, what its tables claim as a comparison of two sides over tasks:

- `a` and `b`: rows as sift-table makes them (a method, or a `group_by` label such as a PAC-tuning arm), each
  read through `a_metric` / `b_metric` (any key `sift-table --metric` takes; default: the runs' main score).
  `b` may list several rows; the claim then holds only against each of them;
- `margin`: a - b >= margin, in the points tables print (fractions x100); or `ratio`: a >= ratio x b;
- `over`: `average` (the mean over the tasks both sides ran, the default) or `each` (every such task);
- `source`: where the paper makes the claim;
- `paper_methods`: the published row (a method of papers/PAPER.csv) each label stands for, where the label is
  not one; `paper_table`: which of the paper's tables the claim is about;
- `missing`: why a side can have no number (said when it has none).

The verdict is taken on the means over seeds: `holds` or `does not hold`, marked "within one standard error"
when the margin lies inside one standard error of the difference (two rows: independent runs; one row with two
metrics: the runs' paired differences), or `not testable` with the reason when a side has no number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import yaml

from sift_cli.errors import SiftError
from sift_cli.papers import PAPERS_DIR, load_paper
from sift_cli.table import aggregate, with_main_metric

CLAIMS_FILE = PAPERS_DIR / "claims.yaml"
KEYS = {"claim", "source", "a", "b", "a_metric", "b_metric", "margin", "ratio", "over", "group_by",
        "paper_methods", "paper_table", "missing"}


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    source: str
    a: str
    b: tuple[str, ...]
    a_metric: str | None = None
    b_metric: str | None = None
    margin: float | None = None
    ratio: float | None = None
    over: str = "average"
    group_by: tuple[str, ...] = ("method",)
    paper_methods: dict = field(default_factory=dict, hash=False)
    paper_table: str | None = None
    missing: str | None = None

    @property
    def test(self) -> str:
        """The claim's test as a formula, for the table."""
        b = self.b[0] if len(self.b) == 1 else "each of " + ", ".join(self.b)
        two_metrics = self.a_metric != self.b_metric
        a_side = self.a + (f" ({self.a_metric or 'main score'})" if two_metrics else "")
        b_side = b + (f" ({self.b_metric or 'main score'})" if two_metrics else "")
        if self.ratio is not None:
            return f"{a_side} ≥ {self.ratio:g} × {b_side}"
        return f"{a_side} − {b_side} ≥ {self.margin:+g}" if self.margin else f"{a_side} ≥ {b_side}"

    def passes(self, a: float, b: float) -> bool:
        return a >= self.ratio * b if self.ratio is not None else a - b >= self.margin

    def shortfall(self, a: float, b: float) -> float:
        """How far the claim is from failing (negative: it fails), in the sides' units."""
        return a - self.ratio * b if self.ratio is not None else a - b - self.margin


@dataclass
class Verdict:
    claim: Claim
    paper: str  # the claim on the published numbers, as text
    ours: str  # the claim on our runs, as text
    verdict: str  # holds | does not hold | not testable, with what qualifies it


def load_claims(paper: str) -> list[Claim]:
    """The claims of one paper, checked: known keys, one test, rows the paper's CSV names."""
    data = yaml.safe_load(CLAIMS_FILE.read_text()) or {}
    if paper not in data:
        raise SiftError(f"no claims recorded for paper '{paper}' in {CLAIMS_FILE.name}; "
                        f"papers with claims: {', '.join(sorted(data))}")
    published = {r.method for r in load_paper(paper)}
    claims = []
    for number, item in enumerate(data[paper], start=1):
        where = f"{CLAIMS_FILE.name}: {paper} claim {number}"
        unknown = set(item) - KEYS
        if unknown:
            raise SiftError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KEYS))}")
        if not {"claim", "source", "a", "b"} <= item.keys():
            raise SiftError(f"{where}: needs claim, source (where the paper says it), a and b")
        if ("margin" in item) == ("ratio" in item):
            raise SiftError(f"{where}: give one of margin and ratio")
        if item.get("over", "average") not in ("average", "each"):
            raise SiftError(f"{where}: over must be average or each")
        b = tuple(item["b"]) if isinstance(item["b"], list) else (item["b"],)
        claim = Claim(paper=paper, text=item["claim"], source=item["source"], a=item["a"], b=b,
                      a_metric=item.get("a_metric"), b_metric=item.get("b_metric"),
                      margin=float(item["margin"]) if "margin" in item else None,
                      ratio=float(item["ratio"]) if "ratio" in item else None,
                      over=item.get("over", "average"),
                      group_by=tuple(k.strip() for k in item.get("group_by", "method").split(",")),
                      paper_methods=dict(item.get("paper_methods", {})),
                      paper_table=item.get("paper_table"), missing=item.get("missing"))
        for label in (claim.a, *claim.b):
            method = claim.paper_methods.get(label, label)
            if method not in published:
                raise SiftError(f"{where}: '{label}' is no row of papers/{paper}.csv; map it with paper_methods "
                                f"(rows: {', '.join(sorted(published))})")
        claims.append(claim)
    return claims


# ---- our runs --------------------------------------------------------------------------------------------
def _cells(runs: pd.DataFrame, claim: Claim, metric: str | None):
    """(table, per-run scores) of one metric, rows labelled by the claim's group_by; (None, None) when no run
    recorded the metric."""
    if metric is not None:
        runs = with_main_metric(runs, metric)
        column = f"metrics.{metric}" if f"metrics.{metric}" in runs else metric
        if column not in runs or pd.to_numeric(runs[column], errors="coerce").notna().sum() == 0:
            return None, None
    table = aggregate(runs, claim.group_by, metric)
    return table, table.runs


def _side_cells(table, label: str) -> pd.DataFrame:
    """Per task: value, std, n of one row (points as printed), only the tasks with a number."""
    if table is None:
        return pd.DataFrame(columns=["value", "std", "n"])
    labels = [", ".join(key) if isinstance(key, tuple) else key for key in table.cells.index]
    if label not in labels:
        return pd.DataFrame(columns=["value", "std", "n"])
    position = labels.index(label)
    row = pd.DataFrame({f: table.cells[f].iloc[position] for f in ("value", "std", "n")})
    row[["value", "std"]] *= table.scale
    return row[row["n"] > 0]


def _paired(claim: Claim, a_runs: pd.DataFrame, b_runs: pd.DataFrame, scale: float, tasks) -> pd.DataFrame:
    """Per task, mean and std of each run's own a - k b (one row read through two metrics)."""
    k = claim.ratio if claim.ratio is not None else 1.0
    a = a_runs[a_runs["row"].eq(claim.a)]["score"]
    b = b_runs[b_runs["row"].eq(claim.a)]["score"]
    both = pd.DataFrame({"d": (a - k * b) * scale, "task": a_runs.loc[a.index, "task"]}).dropna()
    grouped = both.groupby("task")["d"]
    return pd.DataFrame({"std": grouped.std(ddof=1), "n": grouped.count()}).reindex(list(tasks))


def _standard_error(claim: Claim, a: pd.DataFrame, b: pd.DataFrame, paired: pd.DataFrame | None) -> float:
    """Of (mean a - k mean b) over the tasks of `a` (rows aligned): paired runs, or independent rows."""
    k = claim.ratio if claim.ratio is not None else 1.0
    if paired is not None:
        variance = (paired["std"] ** 2 / paired["n"]).sum(min_count=len(paired))
    else:
        variance = (a["std"] ** 2 / a["n"] + k * k * b["std"] ** 2 / b["n"]).sum(min_count=len(a))
    return math.sqrt(variance) / len(a) if not math.isnan(variance) else math.nan


def _number(value: float) -> str:
    return f"{value:+.1f}" if not math.isnan(value) else "–"


def _compare_text(claim: Claim, a: float, b: float, se: float) -> str:
    """a - b ± se, or a / b as a percentage, ± se / b (the standard error of a - ratio b, relative to b)."""
    if claim.ratio is not None:
        return f"{100 * a / b:.0f}%" + (f" ± {100 * se / b:.0f}%" if not math.isnan(se) else "")
    return _number(a - b) + (f" ± {se:.1f}" if not math.isnan(se) else "")


def check_runs(runs: pd.DataFrame, claim: Claim) -> tuple[str, str, list[str]]:
    """(what our runs give, the verdict, the tasks compared) for one claim."""
    a_table, a_runs = _cells(runs, claim, claim.a_metric)
    b_table, b_runs = (a_table, a_runs) if claim.b_metric == claim.a_metric else _cells(runs, claim, claim.b_metric)
    parts, verdicts, compared = [], [], set()
    for b_label in claim.b:
        a, b = _side_cells(a_table, claim.a), _side_cells(b_table, b_label)
        tasks = sorted(set(a.index) & set(b.index))
        compared |= set(tasks)
        if not tasks:
            empty = [f"{label} ({metric or 'main score'})" for label, metric, side in
                     ((claim.a, claim.a_metric, a), (b_label, claim.b_metric, b)) if side.empty]
            reason = f"no run recorded {' or '.join(empty)}" if empty else "the two sides share no task"
            parts.append(f"vs {b_label}: –" if len(claim.b) > 1 else "–")
            verdicts.append(f"not testable: {reason}" + (f" ({claim.missing})" if claim.missing else ""))
            continue
        paired = _paired(claim, a_runs, b_runs, a_table.scale, tasks) if b_label == claim.a else None
        groups = [[t] for t in tasks] if claim.over == "each" else [tasks]
        texts, passed, close = [], [], []
        for group in groups:
            a_g, b_g = a.loc[group], b.loc[group]
            mean_a, mean_b = a_g["value"].mean(), b_g["value"].mean()
            se = _standard_error(claim, a_g, b_g, None if paired is None else paired.loc[group])
            texts.append((f"{group[0]} " if claim.over == "each" else "") + _compare_text(claim, mean_a, mean_b, se))
            passed.append(claim.passes(mean_a, mean_b))
            close.append(not math.isnan(se) and abs(claim.shortfall(mean_a, mean_b)) < se)
        runs_n = int(min(a["n"].loc[tasks].min(), b["n"].loc[tasks].min()))
        head = f"vs {b_label}: " if len(claim.b) > 1 else ""
        tail = "" if claim.over == "each" else f" over {', '.join(tasks)}"
        parts.append(f"{head}{'; '.join(texts)}{tail} (n ≥ {runs_n})")
        verdicts.append(("holds" if all(passed) else "does not hold")
                        + (" (within one standard error)" if any(close) else ""))
    return "; ".join(parts), _join_verdicts(verdicts), sorted(compared)


def _join_verdicts(verdicts: list[str]) -> str:
    """One verdict for several comparisons: the first untestable one, else the first failure, else holds."""
    for first in ("not testable", "does not hold"):
        found = [v for v in verdicts if v.startswith(first)]
        if found:
            return found[0]
    return next((v for v in verdicts if v != "holds"), "holds")


# ---- the paper's numbers ---------------------------------------------------------------------------------
def check_paper(claim: Claim, tasks: list[str] | None) -> str:
    """The claim on the published numbers, over `tasks` (those our runs compared) where the paper has them."""
    stated = f"stated in {claim.source}; no published numbers for it recorded"
    if claim.a_metric != claim.b_metric:
        return stated
    rows = load_paper(claim.paper)
    if claim.paper_table:
        rows = [r for r in rows if r.table == claim.paper_table]
    model = rows[0].model if rows else None
    values = {}
    for r in rows:
        if r.model == model and not r.method_config and not math.isnan(r.value):
            values.setdefault(r.method, {})[r.task] = r.value
    a = values.get(claim.paper_methods.get(claim.a, claim.a), {})
    texts, passed = [], []
    for b_label in claim.b:
        b = values.get(claim.paper_methods.get(b_label, b_label), {})
        common = sorted(set(a) & set(b) & set(tasks or a))
        if not common:
            return stated
        groups = [[t] for t in common] if claim.over == "each" else [common]
        shown = []
        for group in groups:
            mean_a = sum(a[t] for t in group) / len(group)
            mean_b = sum(b[t] for t in group) / len(group)
            value = f"{100 * mean_a / mean_b:.0f}%" if claim.ratio is not None else _number(mean_a - mean_b)
            shown.append((f"{group[0]} " if claim.over == "each" else "") + value)
            passed.append(claim.passes(mean_a, mean_b))
        texts.append(("vs " + b_label + ": " if len(claim.b) > 1 else "") + "; ".join(shown)
                     + ("" if claim.over == "each" else f" over {', '.join(common)}"))
    return f"{'; '.join(texts)} ({model}): {'holds' if all(passed) else 'does not hold'}"


def check(runs: pd.DataFrame, paper: str) -> list[Verdict]:
    verdicts = []
    for claim in load_claims(paper):
        ours, verdict, tasks = check_runs(runs, claim)
        verdicts.append(Verdict(claim, check_paper(claim, tasks or sorted(runs["task"].dropna().unique())),
                                ours, verdict))
    return verdicts


def render(verdicts: list[Verdict]) -> str:
    """A Markdown table: the claim and its test, the paper's numbers, ours, the verdict at this scale."""
    lines = ["Each claim's test is on means over seeds, in the points tables print (ratios as %); ± is one "
             "standard error of the difference.", "",
             "| claim | test | paper | ours | at this scale |", "|:--|:--|:--|:--|:--|"]
    for v in verdicts:
        cells = [v.claim.text, v.claim.test, v.paper, v.ours, f"**{v.verdict}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
